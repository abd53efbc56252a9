// Must NOT compile: Scalar = int, not a format of the format table (expects
// GROVE_SCALAR_MUST_BE_A_WEIGHT_FORMAT)
#include <grove/config/layer_config.hpp>

static_assert(sizeof(grove::layer_config<8, 4, 2, grove::ratio<1, 20>, int>) > 0);
