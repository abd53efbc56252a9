// A program that uses grove as a user's project would: built by tests/consumer/find_package
// (against an installed grove) and tests/consumer/fetch_content (grove pulled in with FetchContent).
#include <grove/grove.hpp>

#if GROVE_CONSUMER_WITH_IO
#if __has_include(<grove/io.hpp>)
#include <grove/io.hpp>
#endif
#include <nlohmann/json.hpp>  // grove::io brings nlohmann_json's include path along
#endif

#if GROVE_CONSUMER_WITH_MPI
#include <grove/mpi.hpp>  // grove::mpi brings MPI's include path and libraries along
#endif

#include <cmath>
#include <cstdio>
#include <utility>

int main(int argc, char** argv) {
  const grove::layer_dims dims{.hidden = 16, .experts = 8, .groups = 4,
                               .expert_intermediate = 8, .adjugate_intermediate = 4};
  grove::layer layer(grove::dynamic_config<>(dims, 2, 0.05),
                     grove::layer_parameters<float>::random(dims, 42, 0.1));

  grove::row_matrix<float> x(3, dims.hidden);
  for (grove::index t = 0; t < x.rows(); ++t)
    for (grove::index c = 0; c < x.cols(); ++c) x(t, c) = std::sin(static_cast<float>(1 + t * x.cols() + c));
  const grove::row_matrix<float> y = layer.forward(x);

  bool ok = y.rows() == x.rows() && y.cols() == dims.hidden && y.allFinite() && y.norm() > 0.0f;
#if GROVE_CONSUMER_WITH_IO
  const nlohmann::json summary = {{"hidden", dims.hidden}, {"experts", dims.experts}};
  ok = ok && summary.at("experts").get<int>() == 8;
#endif
#if GROVE_CONSUMER_WITH_MPI
  // One process, started without mpirun (MPI's singleton start): the expert-parallel layer on
  // one rank is the layer itself, bit for bit.
  MPI_Init(&argc, &argv);
  {
    grove::mpi_communicator comm;
    grove::expert_parallel_layer parallel(comm, grove::group_placement::balanced(dims.groups, comm.size()),
                                          layer.config(), layer.weights());
    const grove::row_matrix<float> y_parallel = parallel.forward(x);
    ok = ok && comm.size() == 1 && y_parallel == y;
  }
  MPI_Finalize();
#else
  (void)argc;
  (void)argv;
#endif
  std::printf("grove consumer: %s (grove %s, |y| = %g)\n", ok ? "ok" : "FAILED", GROVE_VERSION_STRING,
              static_cast<double>(y.norm()));
  return ok ? 0 : 1;
}
