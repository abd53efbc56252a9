// Must NOT compile: G = 3 does not divide E = 8 (expects GROVE_GROUP_COUNT_MUST_DIVIDE_EXPERT_COUNT)
#include <grove/config/layer_config.hpp>

static_assert(sizeof(grove::layer_config<8, 3, 2, grove::ratio<1, 20>>) > 0);
