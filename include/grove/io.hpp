// grove checkpoint I/O: safetensors files, sharded Hugging Face checkpoints, config.json, and
// loading/saving one Grove layer (docs/io.md). Needs nlohmann/json besides the core's Eigen.
#pragma once

#include "grove/grove.hpp"
#include "grove/io/dtype.hpp"
#include "grove/io/safetensors.hpp"
#include "grove/io/checkpoint.hpp"
#include "grove/io/layer_io.hpp"
#include "grove/io/hf_config.hpp"
#include "grove/io/upcycle.hpp"
