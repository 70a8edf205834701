// CPU kernels of densenet_fast::add_stats_term and densenet_fast::add_stats_coefficients
// (schemas: ops/schema.py): a dense layer's new channels' gradient, read out of the block's
// gradient buffer with the gradient through the batch statistics added, and the per-channel
// coefficients of that term, which every BN reading a channel adds to.
//
// The block's backward adds that term, kx * x + k0 per channel, once per channel, just before
// the layer that wrote the channel reads its gradient, which the 3x3 convolution's backward
// wants dense. ATen makes it three strided passes over channel slices of the buffers (addcmul,
// add_, a copy), each bfloat16 slice converted to float32 and back on the way: 17 ms for a
// [8, 32, 56, 56] bfloat16 slice of a channels-last buffer on an Intel Xeon (family 6, model
// 167, 2 threads), against float32's 1.7 ms. Here it is one pass that reads both slices in
// place and writes the dense result.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "kernel_common.h"

namespace densenet_fast {
namespace {

// Elements per parallel work item.
constexpr int64_t kStatsTermGrain = 1 << 15;

void check_stats_term_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& kx,
                           const at::Tensor& k0) {
  check_grad_of_data(grad, x);
  const auto stats_type = stats_type_for(x);
  const std::pair<const char*, const at::Tensor*> vectors[] = {{"kx", &kx}, {"k0", &k0}};
  for (const auto& [what, t] : vectors) {
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == x.size(1), what, " must have shape (",
                      x.size(1), ",), got ", t->sizes());
    TORCH_CHECK_TYPE(t->scalar_type() == stats_type, what, " must be ",
                     stats_type == at::kDouble ? "float64" : "float32", " for ",
                     x.scalar_type(), " data, got ", t->scalar_type());
    TORCH_CHECK(t->device() == x.device(), what, " is on ", t->device(), " but x is on ",
                x.device());
  }
}

// out = g + (kx * x + k0), rounded to the data's dtype: the reference's addcmul, then add.
template <typename scalar_t, typename acc_t>
inline scalar_t stats_term_value(scalar_t g, scalar_t x, acc_t kx, acc_t k0) {
  const acc_t term = k0 + static_cast<acc_t>(x) * kx;
  return to_data<scalar_t>(static_cast<acc_t>(g) + term);
}

// One pixel's n channels (channels-last rows): per-element coefficients.
template <typename scalar_t, typename acc_t>
void stats_term_row(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                    const acc_t* __restrict__ kx, const acc_t* __restrict__ k0,
                    scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = stats_term_value(g[i], x[i], kx[i], k0[i]);
}

// n elements of one channel (NCHW rows): one coefficient pair.
template <typename scalar_t, typename acc_t>
void stats_term_run(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, acc_t kx,
                    acc_t k0, scalar_t* __restrict__ out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = stats_term_value(g[i], x[i], kx, k0);
}

// Whether t's elements along `dim` lie next to each other (a size-1 dim trivially does).
bool unit_stride(const at::Tensor& t, int64_t dim) {
  return t.size(dim) == 1 || t.stride(dim) == 1;
}

template <typename scalar_t>
void add_stats_term_into(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& kx_t,
                         const at::Tensor& k0_t, at::Tensor& out) {
  using acc_t = at::opmath_type<scalar_t>;
  const acc_t* kx = kx_t.const_data_ptr<acc_t>();
  const acc_t* k0 = k0_t.const_data_ptr<acc_t>();
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  scalar_t* dst = out.mutable_data_ptr<scalar_t>();
  const int64_t n = x.size(0), c = x.size(1), h = x.size(2), w = x.size(3);
  if (is_pixel_major(out)) {  // rows: pixels, each c channels long in all three
    const int64_t grain = std::max<int64_t>(1, kStatsTermGrain / std::max<int64_t>(c, 1));
    at::parallel_for(0, n * h * w, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        const int64_t image = p / (h * w), row = (p / w) % h, col = p % w;
        const int64_t gi = image * grad.stride(0) + row * grad.stride(2) + col * grad.stride(3);
        const int64_t xi = image * x.stride(0) + row * x.stride(2) + col * x.stride(3);
        stats_term_row(g + gi, xs + xi, kx, k0, dst + p * c, c);
      }
    });
    return;
  }
  // rows: one image's, one channel's plane row, w elements long
  const int64_t grain = std::max<int64_t>(1, kStatsTermGrain / std::max<int64_t>(w, 1));
  at::parallel_for(0, n * c * h, grain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      const int64_t image = r / (c * h), channel = (r / h) % c, row = r % h;
      const int64_t gi = image * grad.stride(0) + channel * grad.stride(1) + row * grad.stride(2);
      const int64_t xi = image * x.stride(0) + channel * x.stride(1) + row * x.stride(2);
      stats_term_run(g + gi, xs + xi, kx[channel], k0[channel], dst + r * w, w);
    }
  });
}

at::Tensor add_stats_term_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                              const at::Tensor& kx, const at::Tensor& k0) {
  check_stats_term_args(grad_in, x_in, kx, k0);
  // Dense in the format x's strides suggest (as empty_like's preserve_format makes it).
  at::Tensor out = at::empty_like(x_in);
  // The loops write NCHW or NHWC rows; x may suggest another order (its plane transposed):
  // then they write NCHW, copied into place.
  at::Tensor target = is_pixel_major(out) || out.is_contiguous()
                          ? out
                          : at::empty(x_in.sizes(), x_in.options());
  // The loops read rows of unit stride in target's layout; other strides are made so first.
  const bool pixel_major = is_pixel_major(target);
  const int64_t row_dim = pixel_major ? 1 : 3;
  const auto format = pixel_major ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  const at::Tensor grad = unit_stride(grad_in, row_dim) ? grad_in : grad_in.contiguous(format);
  const at::Tensor x = unit_stride(x_in, row_dim) ? x_in : x_in.contiguous(format);
  const at::Tensor kx_c = kx.contiguous(), k0_c = k0.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "add_stats_term",
                                  [&] { add_stats_term_into<scalar_t>(grad, x, kx_c, k0_c, target); });
  if (!target.is_same(out)) out.copy_(target);
  return out;
}

// ---- add_stats_coefficients -------------------------------------------------------------
//
// One BN's share of the coefficients, per channel (ops/batchnorm.py has the maths): with
// s = weight * invstd, kx -= s * invstd * dweight / n and k0 += s * (mean * invstd * dweight -
// dbias) / n. The reference kernel is six tensor operations on vectors of at most a block's
// channels; called once per prefix BN in every backward, its Python and allocations cost more
// than the arithmetic (about 60 us a call on an AMD EPYC, family 23). Here it is one loop.

void check_stats_coefficients_args(const at::Tensor& kx, const at::Tensor& k0,
                                   const at::Tensor& mean, const at::Tensor& invstd,
                                   const at::Tensor& weight, const at::Tensor& dweight,
                                   const at::Tensor& dbias, int64_t count) {
  const int64_t channels = kx.dim() == 1 ? kx.size(0) : -1;
  const std::pair<const char*, const at::Tensor*> vectors[] = {
      {"kx", &kx},         {"k0", &k0},           {"mean", &mean},         {"invstd", &invstd},
      {"bn_weight", &weight}, {"grad_bn_weight", &dweight}, {"grad_bn_bias", &dbias}};
  for (const auto& [what, t] : vectors) {
    if (channels < 0) {
      TORCH_CHECK_VALUE(t->dim() == 1, what, " must have shape 1-D, got ", t->sizes());
    }
    TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == channels, what, " must have shape (",
                      channels, ",), got ", t->sizes());
    TORCH_CHECK_TYPE(t->is_floating_point(), what, " must be floating point, got ",
                     t->scalar_type());
    TORCH_CHECK(t->device() == kx.device(), what, " is on ", t->device(), " but kx is on ",
                kx.device());
    const bool stats = t == &k0 || t == &mean || t == &invstd;
    TORCH_CHECK_TYPE(!stats || t->scalar_type() == kx.scalar_type(), what,
                     " must have kx's dtype ", kx.scalar_type(), ", got ", t->scalar_type());
  }
  TORCH_CHECK_TYPE(kx.scalar_type() == at::kFloat || kx.scalar_type() == at::kDouble,
                   "kx must be torch.float32 or torch.float64, got ", kx.scalar_type());
  TORCH_CHECK_VALUE(count >= 1, "count must be a positive number of values per channel, got ",
                    count);
  check_writable(kx, "kx");
  check_writable(k0, "k0");
}

template <typename acc_t>
void add_stats_coefficients_into(at::Tensor& kx_t, at::Tensor& k0_t, const at::Tensor& mean_t,
                                 const at::Tensor& invstd_t, const at::Tensor& weight_t,
                                 const at::Tensor& dweight_t, const at::Tensor& dbias_t,
                                 int64_t count) {
  // Every vector in the coefficients' dtype, read in place where it already is (float32
  // parameters under autocast, float64 in gradcheck), as the reference converts them.
  const AccVector<acc_t> mean(mean_t), invstd(invstd_t), weight(weight_t), dweight(dweight_t),
      dbias(dbias_t);
  acc_t* kx = kx_t.mutable_data_ptr<acc_t>();
  acc_t* k0 = k0_t.mutable_data_ptr<acc_t>();
  const int64_t kx_stride = kx_t.stride(0), k0_stride = k0_t.stride(0);
  // 1/n as the reference's scalar arguments (alpha, value) take it: a double, then acc_t.
  const acc_t inv_n = static_cast<acc_t>(1.0 / static_cast<double>(count));
  for (int64_t c = 0; c < kx_t.size(0); ++c) {
    const acc_t scale = weight[c] * invstd[c];
    const acc_t term = scale * dweight[c] * invstd[c];
    kx[c * kx_stride] -= inv_n * term;
    k0[c * k0_stride] += inv_n * term * mean[c];
    k0[c * k0_stride] -= inv_n * scale * dbias[c];
  }
}

void add_stats_coefficients_cpu(at::Tensor& kx, at::Tensor& k0, const at::Tensor& mean,
                                const at::Tensor& invstd, const at::Tensor& weight,
                                const at::Tensor& dweight, const at::Tensor& dbias,
                                int64_t count) {
  check_stats_coefficients_args(kx, k0, mean, invstd, weight, dweight, dbias, count);
  if (kx.scalar_type() == at::kDouble) {
    add_stats_coefficients_into<double>(kx, k0, mean, invstd, weight, dweight, dbias, count);
  } else {
    add_stats_coefficients_into<float>(kx, k0, mean, invstd, weight, dweight, dbias, count);
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("add_stats_term", &add_stats_term_cpu);
  m.impl("add_stats_coefficients", &add_stats_coefficients_cpu);
}

}  // namespace densenet_fast
