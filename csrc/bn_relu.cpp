// CPU kernel of densenet_fast::bn_relu (schema: ops/schema.py): norm2-relu2 of a dense layer,
// the 3x3 convolution's input.
//
// One pass: read x, write relu(x * scale + shift) rounded to x's dtype, in x's dtype or in
// float32. ATen needs two passes for it (the eval-mode BN kernel, then clamp_min_), and a
// third, a conversion, where the 3x3 convolution of bfloat16/float16 data runs in float32
// (ops/lowp_conv.py): the float32 copy of bfloat16 values is written here directly, so no
// low-precision activation exists beside it.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>

#include "kernel_common.h"

namespace densenet_fast {
namespace {

// Elements per parallel work item, about a core's L2 share of reading and writing.
constexpr int64_t kBnReluGrain = 1 << 15;

void check_bn_relu_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                        const at::Tensor& weight, const at::Tensor& bias,
                        at::ScalarType out_type) {
  check_data(x, "x");
  check_bn_vectors(x, "x", x.size(1), mean, invstd, weight, bias);
  const auto stats_type = stats_type_for(x);
  TORCH_CHECK_TYPE(out_type == x.scalar_type() || out_type == stats_type,
                   "dtype must be x's dtype (", x.scalar_type(), ") or ", stats_type,
                   ", got ", out_type);
}

// Calls row(offset) for each pixel of pixel-major x (its channels at x's data + offset), or
// plane(offset, c) for each image's channel-c plane of NCHW x, in parallel; x is dense.
template <typename RowFn, typename PlaneFn>
void for_each_run(const at::Tensor& x, const RowFn& row, const PlaneFn& plane) {
  const int64_t channels = x.size(1), plane_size = x.size(2) * x.size(3);
  if (is_pixel_major(x)) {
    const int64_t grain = std::max<int64_t>(1, kBnReluGrain / std::max<int64_t>(channels, 1));
    at::parallel_for(0, x.size(0) * plane_size, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) row(p * channels);
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kBnReluGrain / std::max<int64_t>(plane_size, 1));
  at::parallel_for(0, x.size(0) * channels, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) plane(item * plane_size, item % channels);
  });
}

// relu(bn(x)) into out, which may be x itself: then each element is read, then overwritten,
// by one iteration, in loops of their own (the helpers' __restrict__ operands must not alias).
template <typename scalar_t, typename out_t>
void bn_relu_into(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                  const at::Tensor& weight, const at::Tensor& bias, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const auto [scale_t, shift_t] = scale_shift<acc_t>(mean, invstd, weight, bias);
  const acc_t* scale = scale_t.template const_data_ptr<acc_t>();
  const acc_t* shift = shift_t.template const_data_ptr<acc_t>();
  const scalar_t* src = x.const_data_ptr<scalar_t>();
  out_t* dst = out.mutable_data_ptr<out_t>();
  const int64_t channels = x.size(1), plane = x.size(2) * x.size(3);
  const bool in_place = out.is_same(x);
  for_each_run(
      x,
      [&](int64_t at) {
        if (!in_place) return bn_relu_row(src + at, scale, shift, dst + at, channels);
        for (int64_t c = 0; c < channels; ++c) {
          dst[at + c] = bn_relu_value<scalar_t, acc_t, out_t>(src[at + c], scale[c], shift[c]);
        }
      },
      [&](int64_t at, int64_t c) {
        if (!in_place) return bn_relu_channel(src + at, scale[c], shift[c], dst + at, plane);
        for (int64_t i = 0; i < plane; ++i) {
          dst[at + i] = bn_relu_value<scalar_t, acc_t, out_t>(src[at + i], scale[c], shift[c]);
        }
      });
}

at::Tensor bn_relu_cpu(const at::Tensor& x_in, const at::Tensor& mean, const at::Tensor& invstd,
                       const at::Tensor& weight, const at::Tensor& bias,
                       std::optional<at::ScalarType> dtype) {
  const at::ScalarType out_type = dtype.value_or(x_in.scalar_type());
  check_bn_relu_args(x_in, mean, invstd, weight, bias, out_type);
  const at::Tensor x = is_pixel_major(x_in) ? x_in : x_in.contiguous();
  at::Tensor out = at::empty_like(x, x.options().dtype(out_type));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu", [&] {
    if (out_type == x.scalar_type()) {
      bn_relu_into<scalar_t, scalar_t>(x, mean, invstd, weight, bias, out);
    } else {
      bn_relu_into<scalar_t, at::opmath_type<scalar_t>>(x, mean, invstd, weight, bias, out);
    }
  });
  return out;
}

void bn_relu_inplace_cpu(at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                         const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_relu_args(x, mean, invstd, weight, bias, x.scalar_type());
  TORCH_CHECK_VALUE(is_pixel_major(x) || x.is_contiguous(),
                    "x must be dense (NCHW or channels-last) to be overwritten, got strides ",
                    x.strides());
  at::Tensor out = x;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_relu_inplace",
                                  [&] { bn_relu_into<scalar_t, scalar_t>(x, mean, invstd, weight,
                                                                         bias, out); });
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("bn_relu", &bn_relu_cpu);
  m.impl("bn_relu_inplace", &bn_relu_inplace_cpu);
}

}  // namespace densenet_fast
