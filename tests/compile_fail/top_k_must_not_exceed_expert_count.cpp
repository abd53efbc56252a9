// Must NOT compile: k = 9 > E = 8 (expects GROVE_TOP_K_MUST_NOT_EXCEED_EXPERT_COUNT)
#include <grove/config/layer_config.hpp>

static_assert(sizeof(grove::layer_config<8, 4, 9, grove::ratio<1, 20>>) > 0);
