// MUST compile: the same lambda = 0.05 > G/E = 4/128, with the explicit opt-out.
#include <grove/config/layer_config.hpp>

static_assert(sizeof(grove::layer_config<128, 4, 8, grove::ratio<1, 20>, float, grove::unchecked_scale_bound>) > 0);
int main() {}
