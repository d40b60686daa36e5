// Shape/dtype checks shared by the CPU and CUDA front-ends of ARP. The Python API validates
// first with friendlier messages; these guard direct torch.ops.busseg calls.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace busseg {

inline void check_arp_args(const at::Tensor& feat, const at::Tensor& value, int64_t kernel_size,
                           int64_t dilation) {
  TORCH_CHECK_VALUE(feat.dim() == 4, "feat must be (B, C, H, W), got ", feat.sizes());
  TORCH_CHECK_VALUE(value.dim() == 4, "value must be (B, K, H, W), got ", value.sizes());
  TORCH_CHECK_VALUE(feat.size(0) == value.size(0) && feat.size(2) == value.size(2) &&
                        feat.size(3) == value.size(3),
                    "feat ", feat.sizes(), " and value ", value.sizes(),
                    " must share batch and spatial sizes");
  TORCH_CHECK_VALUE(kernel_size >= 1 && kernel_size % 2 == 1,
                    "kernel_size must be odd and >= 1, got ", kernel_size);
  TORCH_CHECK_VALUE(dilation >= 1, "dilation must be >= 1, got ", dilation);
  TORCH_CHECK_TYPE(feat.scalar_type() == value.scalar_type(), "feat (", feat.scalar_type(),
                   ") and value (", value.scalar_type(), ") must have the same dtype");
  TORCH_CHECK_VALUE(feat.device() == value.device(), "feat and value must be on the same device");
}

}  // namespace busseg
