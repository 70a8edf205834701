// Pieces shared by the CPU kernels: argument checks, the data's layout, rounding to the data's
// dtype, BN-ReLU of one channel's run of elements, and the folded BN parameters.
//
// Messages and exception types match ops/schema.py's checks (ValueError for shapes,
// TypeError for dtypes, RuntimeError for devices), whichever backend serves the call.
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>
#include <ATen/OpMathType.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <utility>
#include <vector>

namespace densenet_fast {
namespace {

// Independent partial sums per reduction along a run of elements: the compiler vectorises
// across the lanes without reordering any one sum (no -ffast-math).
constexpr int kLanes = 16;

// x (called `name` in messages) is 4-D data of a floating dtype the kernels serve.
inline void check_data(const at::Tensor& x, const char* name) {
  TORCH_CHECK_VALUE(x.dim() == 4, name, " must be 4-D [N, C, H, W], got shape ", x.sizes());
  TORCH_CHECK_TYPE(x.scalar_type() == at::kFloat || x.scalar_type() == at::kDouble ||
                       x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
                   name, " must be a floating-point tensor (float32, float64, bfloat16 or ",
                   "float16), got ", x.scalar_type());
}

// The statistics' dtype for data x: float32, float64 for float64 data.
inline at::ScalarType stats_type_for(const at::Tensor& x) {
  return x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
}

// x is data the kernels serve and grad a gradient of it: same shape, dtype and device.
inline void check_grad_of_data(const at::Tensor& grad, const at::Tensor& x) {
  check_data(x, "x");
  TORCH_CHECK_VALUE(grad.sizes() == x.sizes(), "grad must have x's shape ", x.sizes(),
                    ", got ", grad.sizes());
  TORCH_CHECK_TYPE(grad.scalar_type() == x.scalar_type(), "grad dtype ", grad.scalar_type(),
                   " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(grad.device() == x.device(), "grad is on ", grad.device(), " but x is on ",
              x.device());
}

// t (called `name`), which an op adds into in place, has no two elements at one address (an
// expanded tensor): ATen's rule for in-place writes, which the kernels' own loops would not
// enforce (their sums would race or fold into one another).
inline void check_writable(const at::Tensor& t, const char* name) {
  TORCH_CHECK(at::has_internal_overlap(t) != at::MemOverlap::Yes, name,
              " has elements that share one memory location (an expanded tensor?); the op ",
              "adds into it in place: pass a tensor of its own (clone() it)");
}

// One BN vector `what` of data x that `channels` channels of it are normalised with: a
// (channels,) floating vector on x's device, with `stats_dtype` in the statistics' dtype
// (float32, float64 for float64 data).
inline void check_bn_vector(const at::Tensor& x, const char* name, int64_t channels,
                            const at::Tensor& t, const char* what, bool stats_dtype) {
  const auto stats_type = stats_type_for(x);
  TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == channels, what, " must have shape (",
                    channels, ",), got ", t.sizes());
  TORCH_CHECK_TYPE(t.is_floating_point(), what, " must be floating point, got ",
                   t.scalar_type());
  TORCH_CHECK_TYPE(!stats_dtype || t.scalar_type() == stats_type, what, " must be ",
                   stats_type == at::kDouble ? "float64" : "float32", " for ",
                   x.scalar_type(), " data, got ", t.scalar_type());
  TORCH_CHECK(t.device() == x.device(), what, " is on ", t.device(), " but ", name,
              " is on ", x.device());
}

// The BN arguments of data x that `channels` channels of it are normalised with: the
// statistics in the statistics' dtype, the affine parameters in any floating dtype.
inline void check_bn_vectors(const at::Tensor& x, const char* name, int64_t channels,
                             const at::Tensor& mean, const at::Tensor& invstd,
                             const at::Tensor& weight, const at::Tensor& bias) {
  check_bn_vector(x, name, channels, mean, "mean", true);
  check_bn_vector(x, name, channels, invstd, "invstd", true);
  check_bn_vector(x, name, channels, weight, "bn_weight", false);
  check_bn_vector(x, name, channels, bias, "bn_bias", false);
}

// A 4-D tensor dense in channels-last order (and not also dense in NCHW order: one pixel, or
// one channel, is both).
inline bool is_pixel_major(const at::Tensor& t) {
  return t.is_contiguous(at::MemoryFormat::ChannelsLast) && !t.is_contiguous();
}

// t itself where it is dense in NCHW or channels-last order, else an NCHW copy: the kernels
// walk pixel rows of C values or channel planes of H*W values.
inline at::Tensor dense_buffer(const at::Tensor& t) {
  if (t.is_contiguous() || is_pixel_major(t)) return t;
  return t.contiguous();
}

// The layout the kernels walk a dense_buffer in.
inline at::MemoryFormat buffer_layout(const at::Tensor& data) {
  return is_pixel_major(data) ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
}

// t (a gradient) dense in the layout of `data`, a dense_buffer.
inline at::Tensor like_buffer(const at::Tensor& t, const at::Tensor& data) {
  return t.contiguous(buffer_layout(data));
}

// v stored in the data's dtype, rounded to nearest even. For bfloat16 by the bit trick
// c10::BFloat16 uses, without its branch on NaN (a select instead), so that the element
// loops vectorise; NaN stays NaN.
template <typename scalar_t, typename acc_t>
inline scalar_t to_data(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint32_t bits;
    std::memcpy(&bits, &v, sizeof(bits));
    const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
    const uint16_t out = v != v ? uint16_t(0x7FC0) : static_cast<uint16_t>(rounded);
    return c10::BFloat16(out, c10::BFloat16::from_bits());
  } else {
    return static_cast<scalar_t>(v);
  }
}

// Element i of data p in the accumulation dtype. bfloat16 is loaded as its bits and shifted,
// the conversion c10::BFloat16 makes: GCC vectorises no load of the class itself.
template <typename scalar_t>
inline at::opmath_type<scalar_t> load_acc(const scalar_t* p, int64_t i) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    const uint32_t bits = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(p)[i]) << 16;
    float out;
    std::memcpy(&out, &bits, sizeof(out));
    return out;
  } else {
    return static_cast<at::opmath_type<scalar_t>>(p[i]);
  }
}

// v rounded to the data's precision: a bfloat16 or float16 buffer is what autocast makes
// of torchvision's concatenation, whose BN-ReLU output (the 1x1 convolution's input) autocast
// rounds to that dtype too; the GEMMs then take exact low-precision operands and accumulate
// in float32, as autocast's convolutions do.
template <typename scalar_t, typename acc_t>
inline acc_t in_data_precision(acc_t v) {
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    return v;
  } else {
    return static_cast<acc_t>(to_data<scalar_t>(v));
  }
}

// The element loops live in functions of their own: GCC honours __restrict__ on parameters
// (not on locals), which it needs to vectorise them.

// a = relu(x * scale + shift), rounded to the data's precision and stored as out_t (acc_t
// scratch, the data's dtype, or float32 for a float32 convolution of low-precision data).
template <typename scalar_t, typename acc_t, typename out_t>
inline out_t bn_relu_value(scalar_t x, acc_t scale, acc_t shift) {
  const acc_t a = std::max(static_cast<acc_t>(x) * scale + shift, acc_t(0));
  return to_data<out_t>(in_data_precision<scalar_t>(a));
}

// bn_relu_value for n contiguous elements of one channel.
template <typename scalar_t, typename acc_t, typename out_t>
void bn_relu_channel(const scalar_t* __restrict__ x, acc_t scale, acc_t shift,
                     out_t* __restrict__ act, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    act[i] = bn_relu_value<scalar_t, acc_t, out_t>(x[i], scale, shift);
  }
}

// bn_relu_value for n contiguous elements with per-element scale and shift (one pixel's
// channels of channels-last data).
template <typename scalar_t, typename acc_t, typename out_t>
void bn_relu_row(const scalar_t* __restrict__ x, const acc_t* __restrict__ scale,
                 const acc_t* __restrict__ shift, out_t* __restrict__ act, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    act[i] = bn_relu_value<scalar_t, acc_t, out_t>(x[i], scale[i], shift[i]);
  }
}

// The values of t, a 1-D tensor of any floating dtype and stride, as acc_t in out[0, size).
template <typename acc_t>
void read_as(const at::Tensor& t, acc_t* out) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, t.scalar_type(), "read_as", [&] {
    const scalar_t* src = t.const_data_ptr<scalar_t>();
    const int64_t stride = t.stride(0);
    for (int64_t c = 0; c < t.size(0); ++c) out[c] = static_cast<acc_t>(src[c * stride]);
  });
}

// A BN vector (1-D, any floating dtype) read as acc_t: the tensor's own memory where it is
// acc_t with unit stride, else a converted copy. The kernels read their per-channel vectors
// through it instead of ATen conversions: at small shapes the dispatch of each (a detach, a
// to, a mul...) cost more than the kernel's arithmetic.
template <typename acc_t>
class AccVector {
 public:
  explicit AccVector(const at::Tensor& t) {
    if (t.scalar_type() == c10::CppTypeToScalarType<acc_t>::value &&
        (t.size(0) <= 1 || t.stride(0) == 1)) {
      data_ = t.const_data_ptr<acc_t>();
    } else {
      copy_.resize(t.size(0));
      read_as(t, copy_.data());
      data_ = copy_.data();
    }
  }
  AccVector(const AccVector&) = delete;  // data_ may point into copy_
  AccVector& operator=(const AccVector&) = delete;

  const acc_t* data() const { return data_; }
  acc_t operator[](int64_t c) const { return data_[c]; }

 private:
  std::vector<acc_t> copy_;
  const acc_t* data_ = nullptr;
};

// Mirrors densenet_fast.ops.batchnorm.scale_shift, in acc_t: scale = invstd * weight,
// shift = bias - mean * scale, each product rounded to acc_t as the reference's tensor ops
// round it. One loop over the channels, two allocations, no ATen operations.
template <typename acc_t>
std::pair<at::Tensor, at::Tensor> scale_shift(const at::Tensor& mean, const at::Tensor& invstd,
                                              const at::Tensor& weight, const at::Tensor& bias) {
  const int64_t channels = mean.size(0);
  const auto options = mean.options().dtype(c10::CppTypeToScalarType<acc_t>::value);
  at::Tensor scale_t = at::empty({channels}, options), shift_t = at::empty({channels}, options);
  acc_t* scale = scale_t.mutable_data_ptr<acc_t>();
  acc_t* shift = shift_t.mutable_data_ptr<acc_t>();
  read_as(weight, scale);
  read_as(bias, shift);
  const AccVector<acc_t> m(mean), s(invstd);
  for (int64_t c = 0; c < channels; ++c) {
    scale[c] = s[c] * scale[c];
    // Rounded before the subtraction, as the reference's two tensor operations round it:
    // GCC contracts `b - m * s` into a fused multiply-add (-ffp-contract=fast is its default
    // for C++), which differs in the last bit; volatile keeps the product a product.
    const volatile acc_t centred = m[c] * scale[c];
    shift[c] = shift[c] - centred;
  }
  return {scale_t, shift_t};
}

}  // namespace
}  // namespace densenet_fast
