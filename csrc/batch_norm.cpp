// CPU kernels of densenet_fast::channel_stats and densenet_fast::bn_backward (schemas:
// ops/schema.py): a BN's batch statistics, and the backward of a BN outside the fused op
// (norm0, each layer's norm2, a block's last norm), every per-channel sum in float64.
//
// ATen's CPU kernels for both accumulate channels-last float32 data in float32: about 1e-5
// relative error in a variance over densenet121's conv0 output at batch 8 (100k values per
// channel), against 1e-7 for its NCHW kernels, which in turn are about 10x slower than the
// channels-last ones (2.6 against 0.25 ms for a block-1 bottleneck's statistics, AMD EPYC
// family 25, 2 threads). Here the statistics are one pass over the data (sums of x - x0 and
// of its square, x0 a value of the channel, so that no digits cancel in the variance), the
// backward two (sums of g and g (x - mean), then dx), in whichever of the two layouts the
// data has, with fixed work splits: the sums do not depend on the thread count.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <optional>
#include <tuple>
#include <vector>

#include "kernel_common.h"

namespace densenet_fast {
namespace {

// Elements per work item of the channels-last sums, and at most this many items (partial
// sums, added in order at the end).
constexpr int64_t kSumsGrain = 1 << 15;
constexpr int64_t kMaxSumParts = 64;
// Elements per work item of the elementwise pass.
constexpr int64_t kElementGrain = 1 << 15;

// How the statistics' loops read a 4-D tensor in place: as pixel rows (a pixel's channels
// adjacent, consecutive pixels `pixel` apart: channels-last data and its channel slices, a
// block buffer's prefix) or as channel planes (one image's channel, H*W values adjacent,
// at image * `image` + channel * `channel`: NCHW data and its channel slices).
struct Walk {
  bool pixel_major;
  int64_t pixel, image, channel;
};

// The walk t's strides allow, if either does.
std::optional<Walk> walk_of(const at::Tensor& t) {
  const int64_t n = t.size(0), c = t.size(1), h = t.size(2), w = t.size(3);
  if (c > 1 && t.stride(1) == 1) {
    const int64_t pixel = w > 1 ? t.stride(3) : h > 1 ? t.stride(2) : n > 1 ? t.stride(0) : c;
    if ((w == 1 || t.stride(3) == pixel) && (h == 1 || t.stride(2) == w * pixel) &&
        (n == 1 || t.stride(0) == h * w * pixel)) {
      return Walk{true, pixel, 0, 0};
    }
  }
  if ((w == 1 || t.stride(3) == 1) && (h == 1 || t.stride(2) == w)) {
    return Walk{false, 0, t.stride(0), t.stride(1)};
  }
  return std::nullopt;
}

void check_channel_stats_args(const at::Tensor& x, const std::optional<at::Tensor>& scratch) {
  check_data(x, "x");
  if (!scratch.has_value()) return;
  const at::Tensor& s = *scratch;
  TORCH_CHECK_VALUE(s.dim() == 2 && s.size(0) == 2 && s.size(1) >= x.size(1),
                    "scratch must have shape (2, >=", x.size(1), "), got ", s.sizes());
  TORCH_CHECK_TYPE(s.scalar_type() == stats_type_for(x), "scratch must be ",
                   stats_type_for(x) == at::kDouble ? "float64" : "float32", " for ",
                   x.scalar_type(), " data, got ", s.scalar_type());
  TORCH_CHECK(s.device() == x.device(), "scratch is on ", s.device(), " but x is on ",
              x.device());
}

void check_bn_backward_args(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& weight) {
  check_grad_of_data(grad, x);
  check_bn_vector(x, "x", x.size(1), mean, "mean", true);
  check_bn_vector(x, "x", x.size(1), invstd, "invstd", true);
  check_bn_vector(x, "x", x.size(1), weight, "bn_weight", false);
}

// The element loops live in functions of their own: GCC honours __restrict__ on parameters,
// which it needs to vectorise them.

// One pixel's c channels: sum += x - shift, square += (x - shift)^2, per channel.
template <typename scalar_t>
void moments_row(const scalar_t* __restrict__ x, const double* __restrict__ shift,
                 double* __restrict__ sum, double* __restrict__ square, int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    const double d = static_cast<double>(load_acc(x, i)) - shift[i];
    sum[i] += d;
    square[i] += d * d;
  }
}

// n elements of one channel, into kLanes partial sums each.
template <typename scalar_t>
void moments_run(const scalar_t* __restrict__ x, int64_t n, double shift,
                 double* __restrict__ sum, double* __restrict__ square) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double d = static_cast<double>(load_acc(x, i + j)) - shift;
      sum[j] += d;
      square[j] += d * d;
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const double d = static_cast<double>(load_acc(x, i)) - shift;
    sum[j] += d;
    square[j] += d * d;
  }
}

// One pixel's c channels: sum_g += g, sum_gx += g (x - mean), per channel.
template <typename scalar_t>
void grad_sums_row(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                   const double* __restrict__ mean, double* __restrict__ sum_g,
                   double* __restrict__ sum_gx, int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    const double v = static_cast<double>(load_acc(g, i));
    sum_g[i] += v;
    sum_gx[i] += v * (static_cast<double>(load_acc(x, i)) - mean[i]);
  }
}

// n elements of one channel, into kLanes partial sums each.
template <typename scalar_t>
void grad_sums_run(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, int64_t n,
                   double mean, double* __restrict__ sum_g, double* __restrict__ sum_gx) {
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      const double v = static_cast<double>(load_acc(g, i + j));
      sum_g[j] += v;
      sum_gx[j] += v * (static_cast<double>(load_acc(x, i + j)) - mean);
    }
  }
  for (int j = 0; i < n; ++i, ++j) {
    const double v = static_cast<double>(load_acc(g, i));
    sum_g[j] += v;
    sum_gx[j] += v * (static_cast<double>(load_acc(x, i)) - mean);
  }
}

// Per-channel sums (a, b) of data with `channels` channels, from a row or run function:
// rows(first_pixel, pixels, a, b) adds pixel rows of channels-last data, run(image, channel,
// a_lanes, b_lanes) one NCHW plane into kLanes partial sums. Returns 2 * channels doubles,
// the a's then the b's. The split into work items depends on the shape only.
template <typename Rows, typename Run>
std::vector<double> channel_sums(bool pixel_major, int64_t images, int64_t channels,
                                 int64_t plane, const Rows& rows, const Run& run) {
  std::vector<double> out(2 * channels, 0.0);
  if (pixel_major) {
    const int64_t pixels = images * plane;
    const int64_t parts = std::clamp<int64_t>(pixels * channels / kSumsGrain, 1, kMaxSumParts);
    std::vector<double> partial(parts * 2 * channels, 0.0);
    at::parallel_for(0, parts, 1, [&](int64_t begin, int64_t end) {
      for (int64_t part = begin; part < end; ++part) {
        const int64_t first = pixels * part / parts, last = pixels * (part + 1) / parts;
        double* a = partial.data() + part * 2 * channels;
        rows(first, last - first, a, a + channels);
      }
    });
    for (int64_t part = 0; part < parts; ++part) {
      const double* a = partial.data() + part * 2 * channels;
      for (int64_t i = 0; i < 2 * channels; ++i) out[i] += a[i];
    }
    return out;
  }
  at::parallel_for(0, channels, 1, [&](int64_t begin, int64_t end) {
    for (int64_t c = begin; c < end; ++c) {
      double a[kLanes] = {}, b[kLanes] = {};
      for (int64_t image = 0; image < images; ++image) run(image, c, a, b);
      for (int j = 0; j < kLanes; ++j) {
        out[c] += a[j];
        out[channels + c] += b[j];
      }
    }
  });
  return out;
}

template <typename scalar_t>
std::vector<double> moments(const at::Tensor& x, const Walk& walk, std::vector<double>& shift) {
  const scalar_t* data = x.const_data_ptr<scalar_t>();
  const int64_t n = x.size(0), c = x.size(1), plane = x.size(2) * x.size(3);
  // Each channel's first value: sums of x - x0 keep the digits that E[x^2] - E[x]^2 of raw
  // values would cancel where the mean is large against the spread.
  shift.assign(c, 0.0);
  if (n * plane > 0) {
    for (int64_t i = 0; i < c; ++i) {
      shift[i] = static_cast<double>(data[walk.pixel_major ? i : i * walk.channel]);
    }
  }
  return channel_sums(
      walk.pixel_major, n, c, plane,
      [&](int64_t first, int64_t count, double* sum, double* square) {
        for (int64_t p = first; p < first + count; ++p) {
          moments_row(data + p * walk.pixel, shift.data(), sum, square, c);
        }
      },
      [&](int64_t image, int64_t channel, double* sum, double* square) {
        moments_run(data + image * walk.image + channel * walk.channel, plane, shift[channel],
                    sum, square);
      });
}

std::tuple<at::Tensor, at::Tensor> channel_stats_cpu(const at::Tensor& x_in,
                                                     const std::optional<at::Tensor>& scratch) {
  check_channel_stats_args(x_in, scratch);
  // In place where the strides allow (a channel slice of a buffer too), else an NCHW copy.
  const std::optional<Walk> in_place = walk_of(x_in);
  const at::Tensor x = in_place ? x_in : x_in.contiguous();
  const Walk walk = in_place ? *in_place : *walk_of(x);
  const int64_t c = x.size(1);
  std::vector<double> shift, sums;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "channel_stats",
                                  [&] { sums = moments<scalar_t>(x, walk, shift); });
  const auto options = x.options().dtype(stats_type_for(x));
  at::Tensor mean = at::empty({c}, options), var = at::empty({c}, options);
  const double count = static_cast<double>(x.numel() / std::max<int64_t>(c, 1));
  AT_DISPATCH_FLOATING_TYPES(mean.scalar_type(), "channel_stats_out", [&] {
    scalar_t* m = mean.mutable_data_ptr<scalar_t>();
    scalar_t* v = var.mutable_data_ptr<scalar_t>();
    for (int64_t i = 0; i < c; ++i) {
      const double centred_mean = sums[i] / count;  // NaN for no values, as var_mean's
      m[i] = static_cast<scalar_t>(shift[i] + centred_mean);
      const double spread = sums[c + i] / count - centred_mean * centred_mean;
      v[i] = static_cast<scalar_t>(spread > 0 ? spread : (spread == spread ? 0.0 : spread));
    }
  });
  return {mean, var};
}

// dx = a g + k (x - mean) + b per channel (the batch statistics' term), and dx = a g alone
// (constant statistics: x never read, so a non-finite x does not reach dx, as in ATen's).
template <typename scalar_t, typename acc_t>
void bn_grad_row(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x,
                 const acc_t* __restrict__ a, const acc_t* __restrict__ k,
                 const acc_t* __restrict__ b, const acc_t* __restrict__ mean,
                 scalar_t* __restrict__ dx, int64_t c) {
  for (int64_t i = 0; i < c; ++i) {
    const acc_t v = a[i] * load_acc(g, i) +
                    (k[i] * (load_acc(x, i) - mean[i]) + b[i]);
    dx[i] = to_data<scalar_t>(v);
  }
}

template <typename scalar_t, typename acc_t>
void bn_grad_scaled_row(const scalar_t* __restrict__ g, const acc_t* __restrict__ a,
                        scalar_t* __restrict__ dx, int64_t c) {
  for (int64_t i = 0; i < c; ++i) dx[i] = to_data<scalar_t>(a[i] * load_acc(g, i));
}

template <typename scalar_t, typename acc_t>
void bn_grad_run(const scalar_t* __restrict__ g, const scalar_t* __restrict__ x, acc_t a,
                 acc_t k, acc_t b, acc_t mean, scalar_t* __restrict__ dx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    dx[i] = to_data<scalar_t>(a * load_acc(g, i) +
                              (k * (load_acc(x, i) - mean) + b));
  }
}

template <typename scalar_t, typename acc_t>
void bn_grad_scaled_run(const scalar_t* __restrict__ g, acc_t a, scalar_t* __restrict__ dx,
                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) dx[i] = to_data<scalar_t>(a * load_acc(g, i));
}

template <typename scalar_t>
void bn_backward_into(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& mean_t,
                      const at::Tensor& invstd_t, const at::Tensor& weight_t, bool stats_grad,
                      at::Tensor& dx_t, at::Tensor& dweight, at::Tensor& dbias) {
  using acc_t = at::opmath_type<scalar_t>;
  const scalar_t* g = grad.const_data_ptr<scalar_t>();
  const scalar_t* xs = x.const_data_ptr<scalar_t>();
  scalar_t* dx = dx_t.mutable_data_ptr<scalar_t>();
  const int64_t n = x.size(0), c = x.size(1), plane = x.size(2) * x.size(3);
  const bool pixel_major = is_pixel_major(x);
  std::vector<double> mean(c), invstd(c), weight(c);
  read_as(mean_t, mean.data());
  read_as(invstd_t, invstd.data());
  read_as(weight_t, weight.data());
  const std::vector<double> sums = channel_sums(
      pixel_major, n, c, plane,
      [&](int64_t first, int64_t count, double* sum_g, double* sum_gx) {
        for (int64_t p = first; p < first + count; ++p) {
          grad_sums_row(g + p * c, xs + p * c, mean.data(), sum_g, sum_gx, c);
        }
      },
      [&](int64_t image, int64_t channel, double* sum_g, double* sum_gx) {
        const int64_t offset = (image * c + channel) * plane;
        grad_sums_run(g + offset, xs + offset, plane, mean[channel], sum_g, sum_gx);
      });
  // dbias = sum g, dweight = invstd sum g (x - mean); through the batch statistics
  // dx = w invstd (g - sum g / n - (x - mean) invstd^2 sum g (x - mean) / n).
  const double count = static_cast<double>(n * plane);
  std::vector<acc_t> a(c), k(c), b(c), mean_acc(c);
  at::Tensor dweight64 = at::empty({c}, x.options().dtype(at::kDouble));
  at::Tensor dbias64 = at::empty({c}, x.options().dtype(at::kDouble));
  double* dw = dweight64.mutable_data_ptr<double>();
  double* db = dbias64.mutable_data_ptr<double>();
  for (int64_t i = 0; i < c; ++i) {
    const double sum_g = sums[i], sum_gx = sums[c + i], scale = weight[i] * invstd[i];
    db[i] = sum_g;
    dw[i] = sum_gx * invstd[i];
    a[i] = static_cast<acc_t>(scale);
    k[i] = static_cast<acc_t>(-scale * invstd[i] * invstd[i] * sum_gx / count);
    b[i] = static_cast<acc_t>(-scale * sum_g / count);
    mean_acc[i] = static_cast<acc_t>(mean[i]);
  }
  dweight.copy_(dweight64);
  dbias.copy_(dbias64);
  if (pixel_major) {
    const int64_t grain = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(c, 1));
    at::parallel_for(0, n * plane, grain, [&](int64_t begin, int64_t end) {
      for (int64_t p = begin; p < end; ++p) {
        if (stats_grad) {
          bn_grad_row(g + p * c, xs + p * c, a.data(), k.data(), b.data(), mean_acc.data(),
                      dx + p * c, c);
        } else {
          bn_grad_scaled_row(g + p * c, a.data(), dx + p * c, c);
        }
      }
    });
    return;
  }
  const int64_t grain = std::max<int64_t>(1, kElementGrain / std::max<int64_t>(plane, 1));
  at::parallel_for(0, n * c, grain, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const int64_t i = item % c, offset = item * plane;
      if (stats_grad) {
        bn_grad_run(g + offset, xs + offset, a[i], k[i], b[i], mean_acc[i], dx + offset, plane);
      } else {
        bn_grad_scaled_run(g + offset, a[i], dx + offset, plane);
      }
    }
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> bn_backward_cpu(
    const at::Tensor& grad_in, const at::Tensor& x_in, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& weight, bool stats_grad) {
  check_bn_backward_args(grad_in, x_in, mean, invstd, weight);
  const at::Tensor x = dense_buffer(x_in);
  const at::Tensor grad = like_buffer(grad_in, x);  // walked as x is
  at::Tensor dx = at::empty(x.sizes(), x.options().memory_format(buffer_layout(x)));
  at::Tensor dweight = at::empty_like(weight, at::MemoryFormat::Contiguous);
  at::Tensor dbias = at::empty_like(weight, at::MemoryFormat::Contiguous);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), "bn_backward", [&] {
    bn_backward_into<scalar_t>(grad, x, mean, invstd, weight, stats_grad, dx, dweight, dbias);
  });
  return {dx, dweight, dbias};
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("channel_stats", &channel_stats_cpu);
  m.impl("bn_backward", &bn_backward_cpu);
}

}  // namespace densenet_fast
