// Must NOT compile: k = 0 (expects GROVE_TOP_K_MUST_BE_AT_LEAST_ONE)
#include <grove/config/layer_config.hpp>

static_assert(sizeof(grove::layer_config<8, 4, 0, grove::ratio<1, 20>>) > 0);
