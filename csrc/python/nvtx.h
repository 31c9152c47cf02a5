// NVTX ranges in the "longattn" domain around every public op, so Nsight Systems timelines
// and Nsight Compute --nvtx filters find them. NVTX3 is header-only (from the CUDA
// toolkit); without it the ranges compile to nothing.
#pragma once

#if defined(LONGATTN_WITH_NVTX) && __has_include(<nvtx3/nvToolsExt.h>)
#include <nvtx3/nvToolsExt.h>
#define LONGATTN_HAVE_NVTX 1

namespace longattn {
struct NvtxRange {
  explicit NvtxRange(const char* name) {
    static nvtxDomainHandle_t domain = nvtxDomainCreateA("longattn");
    nvtxEventAttributes_t attr = {};
    attr.version = NVTX_VERSION;
    attr.size = NVTX_EVENT_ATTRIB_STRUCT_SIZE;
    attr.messageType = NVTX_MESSAGE_TYPE_ASCII;
    attr.message.ascii = name;
    domain_ = domain;
    nvtxDomainRangePushEx(domain_, &attr);
  }
  ~NvtxRange() { nvtxDomainRangePop(domain_); }
  nvtxDomainHandle_t domain_;
};
}  // namespace longattn
#else
#define LONGATTN_HAVE_NVTX 0
namespace longattn {
struct NvtxRange {
  explicit NvtxRange(const char*) {}
};
}  // namespace longattn
#endif
