// Must NOT compile: lambda = 0.05 > G/E = 4/128 (expects GROVE_SCALE_EXCEEDS_PAPER_BOUND)
#include <grove/config/layer_config.hpp>

static_assert(sizeof(grove::layer_config<128, 4, 8, grove::ratio<1, 20>>) > 0);
