// The doctest main of the MPI tests: every rank runs every test case, in one order (their
// checks are collective); the exit code is the worst of all ranks', so that mpirun and ctest see
// a failure on any rank.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include <mpi.h>

int main(int argc, char** argv) {
  MPI_Init(&argc, &argv);
  int rank = 0;
  MPI_Comm_rank(MPI_COMM_WORLD, &rank);
  doctest::Context context(argc, argv);
  // One summary is enough; failures are printed by whichever rank has them.
  if (rank != 0) context.setOption("minimal", true);
  int result = context.run();
  int worst = 0;
  MPI_Allreduce(&result, &worst, 1, MPI_INT, MPI_MAX, MPI_COMM_WORLD);
  MPI_Finalize();
  return worst;
}
