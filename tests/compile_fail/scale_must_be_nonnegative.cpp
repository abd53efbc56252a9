// Must NOT compile: lambda = -1/20 (expects GROVE_SCALE_MUST_BE_NONNEGATIVE)
#include <grove/config/layer_config.hpp>

static_assert(sizeof(grove::layer_config<8, 4, 2, grove::ratio<-1, 20>>) > 0);
