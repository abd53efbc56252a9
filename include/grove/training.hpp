// grove training helpers (docs/training.md): exact CPU backward of a Grove layer, load
// balancing (auxiliary-loss-free bias, Switch-style auxiliary loss), upcycling a plain MoE
// layer, AdamW and RMSNorm. Needs only what <grove/grove.hpp> needs (Eigen).
#pragma once

#include "grove/grove.hpp"
#include "grove/kernels/cpu/expert_backward.hpp"
#include "grove/training/router_backward.hpp"
#include "grove/training/backward.hpp"
#include "grove/training/load_balancing.hpp"
#include "grove/weights/upcycle.hpp"
#include "grove/training/adamw.hpp"
#include "grove/training/rms_norm.hpp"
