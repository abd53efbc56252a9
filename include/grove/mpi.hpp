// grove over MPI (target grove::mpi, docs/distributed.md): the expert-parallel layer and the
// communicator that runs it over an MPI communicator. Needs <mpi.h>; the core never does.
#pragma once

#include "grove/distributed/communicator.hpp"
#include "grove/distributed/expert_parallel.hpp"
#include "grove/distributed/placement.hpp"
#include "grove/mpi/mpi_communicator.hpp"
