// C++ signatures of the native ops' schemas (csrc/<op>/schema.cpp), for typed dispatcher calls:
// the autograd kernels' (csrc/<op>/autograd.cpp) and the Python entry points'
// (csrc/python_module.cpp). typed<>() checks each against its schema when it is looked up.
#pragma once
#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace busseg::signature {

using Tensor = at::Tensor;
using Tensors = std::vector<at::Tensor>;

using adjacent_relation_propagation = std::tuple<Tensor, Tensor>(const Tensor& feat,
                                                                 const Tensor& value,
                                                                 int64_t kernel_size,
                                                                 int64_t dilation, double scale,
                                                                 bool valid_padding);
using adjacent_relation_propagation_backward = std::tuple<Tensor, Tensor>(
    const Tensor& grad_out, const Tensor& feat, const Tensor& value, const Tensor& weights,
    int64_t kernel_size, int64_t dilation, double scale, bool valid_padding, bool need_grad_feat,
    bool need_grad_value);

using cross_layer_alignment_loss = std::tuple<Tensor, Tensor, Tensors>(
    at::TensorList feats, at::TensorList proxies, c10::string_view reduction, double eps,
    int64_t block_rows, bool grad_proxies);
using cross_layer_alignment_loss_backward = std::tuple<Tensors, Tensors>(
    const Tensor& grad_loss, at::TensorList feats, at::TensorList proxies, const Tensor& lse,
    c10::string_view reduction, double eps, int64_t block_rows, bool need_grad_feats,
    bool need_grad_proxies);

using memory_contrastive_loss = std::tuple<Tensor, Tensor, Tensor>(
    const Tensor& anchors, const Tensor& anchor_labels, const Tensor& negatives,
    const Tensor& negative_labels, const Tensor& positives, const Tensor& has_positive,
    double temperature, bool save_weighted_negatives);
using memory_contrastive_loss_backward = std::tuple<Tensor, Tensor>(
    const Tensor& grad_loss, const Tensor& anchors, const Tensor& anchor_labels,
    const Tensor& negatives, const Tensor& negative_labels, const Tensor& positives,
    const Tensor& has_positive, const Tensor& lse, const Tensor& weighted_negatives,
    double temperature, bool need_grad_negatives);

using patch_entropy_hardness = Tensor(const Tensor& x, int64_t patch_h, int64_t patch_w,
                                      bool from_logits, double eps);
using patch_entropy_hardness_backward = Tensor(const Tensor& grad, const Tensor& x, int64_t patch_h,
                                               int64_t patch_w, bool from_logits, double eps);

using greedy_proxy_sampling = Tensor(const Tensor& feat, const Tensor& first, int64_t num_proxies,
                                     double scale);

using adaptive_patch_cutmix = Tensors(at::TensorList tensors, const Tensor& patch_mask);

}  // namespace busseg::signature
