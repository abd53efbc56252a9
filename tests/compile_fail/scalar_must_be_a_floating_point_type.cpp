// Must NOT compile: Scalar = int (expects GROVE_SCALAR_MUST_BE_A_FLOATING_POINT_TYPE)
#include <grove/config/layer_config.hpp>

static_assert(sizeof(grove::layer_config<8, 4, 2, grove::ratio<1, 20>, int>) > 0);
