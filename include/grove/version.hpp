// grove: header-only Grove MoE layers (arXiv 2508.07785).
#pragma once

#define GROVE_VERSION_MAJOR 0
#define GROVE_VERSION_MINOR 2
#define GROVE_VERSION_PATCH 0
#define GROVE_VERSION_STRING "0.2.0"

// Everything public lives in grove::v0 (an inline namespace, as fmt does), so a future
// ABI-breaking release can live beside this one in the same program without ODR clashes.
#define GROVE_BEGIN_NAMESPACE \
  namespace grove {           \
  inline namespace v0 {
#define GROVE_END_NAMESPACE \
  }                         \
  }
