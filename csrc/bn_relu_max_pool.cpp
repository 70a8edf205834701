// CPU kernels of densenet_fast::bn_relu_max_pool2d and its backward (schemas: ops/schema.py),
// the stem's norm0-relu0-pool0 over conv0's output x.
//
// ATen's max pool over NCHW data is a scalar loop over windows (25-40 ms for densenet121's
// stem at batch 8 on a 2-core Xeon, 8x its channels-last kernel), and the stem's backward runs
// it a second time to find the winners again instead of keeping int64 indices. Here one
// channel plane at a time is BN-ReLU'd into per-thread scratch (PaddedPlane), and each
// output row's windows are reduced tap by tap, vectorised across the row; backward finds the
// same winners and adds the output gradient where threshold_backward would let it through,
// so neither the activation nor the indices ever exist at full size. Channels-last data gets
// kernels of its own, vectorised across channels, for the same reason: ATen's channels-last
// pool needs the full-size activation and int64 indices (bfloat16 densenet121 inference on
// a Xeon peaked in the stem, above torchvision's peak, on them).
//
// Winners follow ATen's max pool: the first maximum in window order (rows, then columns),
// except that NaN always wins (the last NaN of the window), so the gradient reaches the same
// element as max_pool2d_with_indices_backward's.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>
#include <optional>
#include <tuple>
#include <vector>

#include "kernel_common.h"

namespace densenet_fast {
namespace {

// One spatial dimension of the pool: its settings, and the plane scratch it pads to.
struct PoolAxis {
  int64_t kernel, stride, padding, dilation, in, out;

  // torch's pooling output size (floor or ceil mode; no window starts in the right padding).
  static int64_t output_size(int64_t in, int64_t k, int64_t s, int64_t p, int64_t d,
                             bool ceil_mode) {
    const int64_t span = in + 2 * p - d * (k - 1) - 1 + (ceil_mode ? s - 1 : 0);
    int64_t out = (span >= 0 ? span / s : -((-span + s - 1) / s)) + 1;
    if (ceil_mode && (out - 1) * s >= in + p) --out;
    return out;
  }

  // Scratch length: the left padding, the input, and whatever the last window reaches past.
  int64_t padded() const {
    return std::max(padding + in, (out - 1) * stride + (kernel - 1) * dilation + 1);
  }
};

PoolAxis pool_axis(const char* axis, int64_t in, int64_t k, int64_t s, int64_t p, int64_t d,
                   bool ceil_mode) {
  TORCH_CHECK_VALUE(k > 0 && s > 0 && d > 0, "max pool ", axis,
                    ": kernel_size, stride and dilation must be positive, got ", k, ", ", s,
                    ", ", d);
  // max_pool2d's rule on every device: half the kernel size, whatever the dilation.
  TORCH_CHECK_VALUE(p >= 0 && p <= k / 2, "max pool ", axis,
                    ": padding must be between 0 and half the kernel size, got ", p,
                    " for kernel_size ", k);
  const int64_t out = PoolAxis::output_size(in, k, s, p, d, ceil_mode);
  TORCH_CHECK_VALUE(out >= 1, "max pool ", axis, ": input size ", in,
                    " is too small for kernel_size ", k, " (dilation ", d, ", padding ", p,
                    "): the output would be empty");
  return {k, s, p, d, in, out};
}

struct PoolGeometry {
  PoolAxis h, w;
};

std::pair<int64_t, int64_t> pair_of(c10::IntArrayRef v, const char* name) {
  TORCH_CHECK_VALUE(v.size() == 1 || v.size() == 2, name,
                    " must hold one or two values, got ", v.size());
  return {v[0], v.size() == 2 ? v[1] : v[0]};
}

PoolGeometry check_pool_args(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                             const at::Tensor& weight, const at::Tensor& bias,
                             c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation,
                             bool ceil_mode) {
  check_data(x, "x");
  check_bn_vectors(x, "x", x.size(1), mean, invstd, weight, bias);
  const auto [kh, kw] = pair_of(kernel_size, "kernel_size");
  const auto [sh, sw] = pair_of(stride.empty() ? kernel_size : stride, "stride");
  const auto [ph, pw] = pair_of(padding, "padding");
  const auto [dh, dw] = pair_of(dilation, "dilation");
  return {pool_axis("height", x.size(2), kh, sh, ph, dh, ceil_mode),
          pool_axis("width", x.size(3), kw, sw, pw, dw, ceil_mode)};
}

// A channel plane of relu(bn(x)) in per-thread scratch, padded with -inf (never a winner:
// every activation is >= 0 or NaN) so windows are read without bounds checks, and with its
// columns split by phase modulo the pool's stride: column c is stored at c / stride in phase
// c % stride's copy of the row. Window (oh, ow)'s tap (i, j) is then element ow of one
// contiguous run for the whole output row, and every tap is a vector operation across it.
struct PaddedPlane {
  const PoolGeometry& g;
  int64_t phases, cols;

  explicit PaddedPlane(const PoolGeometry& geometry)
      : g(geometry), phases(geometry.w.stride),
        cols((geometry.w.padded() + geometry.w.stride - 1) / geometry.w.stride) {}

  int64_t size() const { return g.h.padded() * phases * cols; }

  // Start of the run holding tap (i, j) of output row oh's windows.
  int64_t tap(int64_t oh, int64_t i, int64_t j) const {
    const int64_t r = oh * g.h.stride + i * g.h.dilation, c = j * g.w.dilation;
    return (r * phases + c % phases) * cols + c / phases;
  }

  // Offset of tap (i, j) of window (oh, ow) in an unsplit [padded h, padded w] plane.
  int64_t unsplit(int64_t oh, int64_t ow, int64_t i, int64_t j) const {
    return (oh * g.h.stride + i * g.h.dilation) * g.w.padded() + ow * g.w.stride +
           j * g.w.dilation;
  }
};

// bn_relu_value for n elements of x `stride` apart, into contiguous `act`.
template <typename scalar_t, typename acc_t>
void bn_relu_strided(const scalar_t* __restrict__ x, int64_t stride, acc_t scale, acc_t shift,
                     acc_t* __restrict__ act, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    act[i] = bn_relu_value<scalar_t, acc_t, acc_t>(x[i * stride], scale, shift);
  }
}

// Fills `plane` (PaddedPlane layout) from one dense [H, W] channel plane of x.
template <typename scalar_t, typename acc_t>
void activation_plane(const scalar_t* x, const PaddedPlane& layout, acc_t scale, acc_t shift,
                      acc_t* plane) {
  const PoolGeometry& g = layout.g;
  std::fill(plane, plane + layout.size(), -std::numeric_limits<acc_t>::infinity());
  for (int64_t h = 0; h < g.h.in; ++h) {
    const int64_t r = h + g.h.padding;
    for (int64_t phase = 0; phase < layout.phases; ++phase) {
      // Columns c = q * phases + phase that hold input column w = c - padding >= 0.
      const int64_t q0 = std::max<int64_t>(0, (g.w.padding - phase + layout.phases - 1) /
                                                  layout.phases);
      const int64_t w0 = q0 * layout.phases + phase - g.w.padding;
      if (w0 >= g.w.in) continue;
      bn_relu_strided(x + h * g.w.in + w0, layout.phases, scale, shift,
                      plane + (r * layout.phases + phase) * layout.cols + q0,
                      (g.w.in - 1 - w0) / layout.phases + 1);
    }
  }
}

// One tap for a whole output row: where value v beats the window's best so far (ATen's rule,
// see the top: strictly larger, or NaN), it becomes the best and `tap` its winner.
template <typename acc_t>
void take_tap(const acc_t* __restrict__ values, int32_t tap, acc_t* __restrict__ best,
              int32_t* __restrict__ winner, int64_t n) {
  for (int64_t ow = 0; ow < n; ++ow) {
    const acc_t v = values[ow];
    const bool take = v > best[ow] || v != v;
    best[ow] = take ? v : best[ow];
    winner[ow] = take ? tap : winner[ow];
  }
}

// Each window's best value and its winning tap (i * kernel_w + j), for output row oh.
template <typename acc_t>
void window_maxima(const acc_t* plane, const PaddedPlane& layout, int64_t oh, acc_t* best,
                   int32_t* winner) {
  const PoolGeometry& g = layout.g;
  std::fill(best, best + g.w.out, -std::numeric_limits<acc_t>::infinity());
  std::fill(winner, winner + g.w.out, 0);
  for (int64_t i = 0; i < g.h.kernel; ++i) {
    for (int64_t j = 0; j < g.w.kernel; ++j) {
      take_tap(plane + layout.tap(oh, i, j), static_cast<int32_t>(i * g.w.kernel + j), best,
               winner, g.w.out);
    }
  }
}

// The NCHW planes' kernels, one (image, channel) plane per work item, with the plane's
// scale and shift: fn(plane index, x's plane, scale, shift, per-thread scratch).
template <typename scalar_t, typename acc_t, typename F>
void for_each_plane(const at::Tensor& x, const at::Tensor& scale_t, const at::Tensor& shift_t,
                    int64_t scratch_size, const F& fn) {
  const int64_t n = x.size(0), channels = x.size(1);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const acc_t* scale = scale_t.const_data_ptr<acc_t>();
  const acc_t* shift = shift_t.const_data_ptr<acc_t>();
  const int64_t plane = x.size(2) * x.size(3);
  at::parallel_for(0, n * channels, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_size);
    for (int64_t p = begin; p < end; ++p) {
      const int64_t c = p % channels;
      fn(p, x_data + p * plane, scale[c], shift[c], scratch.data());
    }
  });
}

template <typename scalar_t>
at::Tensor forward_planes(const at::Tensor& x, const at::Tensor& mean, const at::Tensor& invstd,
                          const at::Tensor& weight, const at::Tensor& bias,
                          const PoolGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  auto [scale_t, shift_t] = scale_shift<acc_t>(mean, invstd, weight, bias);
  at::Tensor out = at::empty({x.size(0), x.size(1), g.h.out, g.w.out}, x.options());
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  const PaddedPlane layout(g);
  for_each_plane<scalar_t, acc_t>(x, scale_t, shift_t, layout.size() + g.w.out,
      [&](int64_t p, const scalar_t* x_plane, acc_t scale, acc_t shift, acc_t* scratch) {
        acc_t* best = scratch + layout.size();
        std::vector<int32_t> winner(g.w.out);
        activation_plane(x_plane, layout, scale, shift, scratch);
        scalar_t* out_plane = out_data + p * g.h.out * g.w.out;
        for (int64_t oh = 0; oh < g.h.out; ++oh) {
          window_maxima(scratch, layout, oh, best, winner.data());
          for (int64_t ow = 0; ow < g.w.out; ++ow) {
            out_plane[oh * g.w.out + ow] = to_data<scalar_t>(best[ow]);
          }
        }
      });
  return out;
}

template <typename scalar_t>
at::Tensor backward_planes(const at::Tensor& grad_out, const at::Tensor& x, const at::Tensor& mean,
                           const at::Tensor& invstd, const at::Tensor& weight,
                           const at::Tensor& bias, const PoolGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  auto [scale_t, shift_t] = scale_shift<acc_t>(mean, invstd, weight, bias);
  at::Tensor grad = at::empty_like(x);
  scalar_t* grad_data = grad.mutable_data_ptr<scalar_t>();
  const scalar_t* go_data = grad_out.const_data_ptr<scalar_t>();
  const PaddedPlane layout(g);
  const int64_t width = g.w.padded(), sum_size = g.h.padded() * width;
  for_each_plane<scalar_t, acc_t>(x, scale_t, shift_t, layout.size() + sum_size + g.w.out,
      [&](int64_t p, const scalar_t* x_plane, acc_t scale, acc_t shift, acc_t* scratch) {
        acc_t* sum = scratch + layout.size();  // unsplit [padded h, padded w]
        acc_t* best = sum + sum_size;
        std::vector<int32_t> winner(g.w.out);
        activation_plane(x_plane, layout, scale, shift, scratch);
        std::fill(sum, sum + sum_size, acc_t(0));
        const scalar_t* go = go_data + p * g.h.out * g.w.out;
        for (int64_t oh = 0; oh < g.h.out; ++oh) {
          window_maxima(scratch, layout, oh, best, winner.data());
          for (int64_t ow = 0; ow < g.w.out; ++ow) {
            // ReLU's backward as threshold_backward's: nothing flows where a <= 0.
            if (best[ow] <= acc_t(0)) continue;
            const int64_t i = winner[ow] / g.w.kernel, j = winner[ow] % g.w.kernel;
            sum[layout.unsplit(oh, ow, i, j)] += static_cast<acc_t>(go[oh * g.w.out + ow]);
          }
        }
        scalar_t* dst = grad_data + p * g.h.in * g.w.in;
        for (int64_t h = 0; h < g.h.in; ++h) {
          const acc_t* src = sum + (h + g.h.padding) * width + g.w.padding;
          for (int64_t w = 0; w < g.w.in; ++w) dst[h * g.w.in + w] = to_data<scalar_t>(src[w]);
        }
      });
  return grad;
}

// Channels-last data: one work item per (image, block of up to kChannelBlock channels), the
// block's channels the vector axis. Each window recomputes relu(bn(x)) for its taps (a 3x3
// stride-2 pool reads each element 2.25 times, cheaper than writing and re-reading a
// full-size activation), so neither the activation nor int64 indices ever exist at full size.
constexpr int64_t kChannelBlock = 32;

struct ChannelBlock {
  int64_t image, first, count;
};

// fn(block, per-thread scratch of scratch_size acc_t) for every channel block of x.
template <typename acc_t, typename F>
void for_each_channel_block(const at::Tensor& x, int64_t scratch_size, const F& fn) {
  const int64_t channels = x.size(1);
  const int64_t blocks = (channels + kChannelBlock - 1) / kChannelBlock;
  at::parallel_for(0, x.size(0) * blocks, 1, [&](int64_t begin, int64_t end) {
    std::vector<acc_t> scratch(scratch_size);
    for (int64_t item = begin; item < end; ++item) {
      const int64_t first = (item % blocks) * kChannelBlock;
      fn(ChannelBlock{item / blocks, first, std::min(kChannelBlock, channels - first)},
         scratch.data());
    }
  });
}

// fn(ih, iw, tap) for each tap of window (oh, ow) that lies in the input, in window order
// (rows, then columns; tap = i * kernel_w + j): the padding's taps are skipped, as ATen's pool
// skips them.
template <typename F>
void for_each_tap(const PoolGeometry& g, int64_t oh, int64_t ow, const F& fn) {
  for (int64_t i = 0; i < g.h.kernel; ++i) {
    const int64_t ih = oh * g.h.stride - g.h.padding + i * g.h.dilation;
    if (ih < 0 || ih >= g.h.in) continue;
    for (int64_t j = 0; j < g.w.kernel; ++j) {
      const int64_t iw = ow * g.w.stride - g.w.padding + j * g.w.dilation;
      if (iw < 0 || iw >= g.w.in) continue;
      fn(ih, iw, static_cast<int32_t>(i * g.w.kernel + j));
    }
  }
}

// Window (oh, ow)'s best value and winning tap for each channel of a block; x_block points
// at the block's first channel of its image's [H, W, C] data. Taps in the padding are
// skipped, as ATen's pool skips them.
template <typename scalar_t, typename acc_t>
void pixel_window_maxima(const scalar_t* x_block, int64_t channels, const acc_t* scale,
                         const acc_t* shift, const PoolGeometry& g, int64_t oh, int64_t ow,
                         int64_t count, acc_t* best, int32_t* winner) {
  std::fill(best, best + count, -std::numeric_limits<acc_t>::infinity());
  std::fill(winner, winner + count, 0);
  acc_t values[kChannelBlock];
  for_each_tap(g, oh, ow, [&](int64_t ih, int64_t iw, int32_t tap) {
    bn_relu_row(x_block + (ih * g.w.in + iw) * channels, scale, shift, values, count);
    take_tap(values, tap, best, winner, count);
  });
}

template <typename scalar_t>
at::Tensor forward_channels_last(const at::Tensor& x, const at::Tensor& mean,
                                 const at::Tensor& invstd, const at::Tensor& weight,
                                 const at::Tensor& bias, const PoolGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor scale_t, shift_t;
  std::tie(scale_t, shift_t) = scale_shift<acc_t>(mean, invstd, weight, bias);
  const acc_t* scale = scale_t.const_data_ptr<acc_t>();
  const acc_t* shift = shift_t.const_data_ptr<acc_t>();
  const int64_t channels = x.size(1);
  at::Tensor out = at::empty({x.size(0), channels, g.h.out, g.w.out},
                             x.options().memory_format(at::MemoryFormat::ChannelsLast));
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  scalar_t* out_data = out.mutable_data_ptr<scalar_t>();
  for_each_channel_block<acc_t>(x, kChannelBlock, [&](const ChannelBlock& b, acc_t* best) {
    int32_t winner[kChannelBlock];
    const scalar_t* x_block = x_data + b.image * g.h.in * g.w.in * channels + b.first;
    for (int64_t oh = 0; oh < g.h.out; ++oh) {
      for (int64_t ow = 0; ow < g.w.out; ++ow) {
        pixel_window_maxima(x_block, channels, scale + b.first, shift + b.first, g, oh, ow,
                            b.count, best, winner);
        scalar_t* dst = out_data + ((b.image * g.h.out + oh) * g.w.out + ow) * channels + b.first;
        for (int64_t c = 0; c < b.count; ++c) dst[c] = to_data<scalar_t>(best[c]);
      }
    }
  });
  return out;
}

// sum[c] += go[c] where tap won channel c's window and ReLU lets the gradient through
// (threshold_backward's rule: nothing where a <= 0; NaN flows).
template <typename scalar_t, typename acc_t>
void add_where_won(const scalar_t* __restrict__ go, const acc_t* __restrict__ best,
                   const int32_t* __restrict__ winner, int32_t tap, acc_t* __restrict__ sum,
                   int64_t count) {
  for (int64_t c = 0; c < count; ++c) {
    const bool flows = winner[c] == tap && !(best[c] <= acc_t(0));
    sum[c] += flows ? static_cast<acc_t>(go[c]) : acc_t(0);
  }
}

// Window (oh, ow)'s output gradient go[c] added to the sum of its winning tap, channel by
// channel, where ReLU lets it through; row(ih, iw) gives the sums of input pixel (ih, iw).
// Tap by tap over the channels with a select rather than channel by channel through the
// winner's address, so that the loop vectorises (the scattered form took 5x the forward's
// time on densenet121's stem); each sum gets the same additions in the same order, and
// adding +0 leaves it as it was.
template <typename scalar_t, typename acc_t, typename F>
void add_to_winners(const scalar_t* go, const acc_t* best, const int32_t* winner,
                    const PoolGeometry& g, int64_t oh, int64_t ow, int64_t count,
                    const F& row) {
  for_each_tap(g, oh, ow, [&](int64_t ih, int64_t iw, int32_t tap) {
    add_where_won(go, best, winner, tap, row(ih, iw), count);
  });
}

// Per channel block, the gradient sums in acc_t rows of [W, count], as the planes' kernel sums
// in its plane scratch, so a pixel that wins several overlapping windows is rounded once. Only
// the input rows the current output row's windows reach are live: a ring of
// (kernel_h - 1) * dilation_h + 1 rows, each row written out (and its slot cleared) once no
// later window reaches it. So the scratch stays a few rows per thread whatever the image size
// and thread count, where a whole [H, W, count] plane per thread would outgrow the gradient
// itself on a many-core machine.
template <typename scalar_t>
at::Tensor backward_channels_last(const at::Tensor& grad_out, const at::Tensor& x,
                                  const at::Tensor& mean, const at::Tensor& invstd,
                                  const at::Tensor& weight, const at::Tensor& bias,
                                  const PoolGeometry& g) {
  using acc_t = at::opmath_type<scalar_t>;
  at::Tensor scale_t, shift_t;
  std::tie(scale_t, shift_t) = scale_shift<acc_t>(mean, invstd, weight, bias);
  const acc_t* scale = scale_t.const_data_ptr<acc_t>();
  const acc_t* shift = shift_t.const_data_ptr<acc_t>();
  const int64_t channels = x.size(1), pixels = g.h.in * g.w.in;
  const int64_t ring = (g.h.kernel - 1) * g.h.dilation + 1, row = g.w.in * kChannelBlock;
  at::Tensor grad = at::empty_like(x);
  const scalar_t* x_data = x.const_data_ptr<scalar_t>();
  const scalar_t* go_data = grad_out.const_data_ptr<scalar_t>();
  scalar_t* grad_data = grad.mutable_data_ptr<scalar_t>();
  for_each_channel_block<acc_t>(x, ring * row + kChannelBlock, [&](const ChannelBlock& b,
                                                                   acc_t* sums) {
    acc_t* best = sums + ring * row;
    int32_t winner[kChannelBlock];
    std::fill(sums, sums + ring * row, acc_t(0));
    const int64_t block_start = b.image * pixels * channels + b.first;  // in x and grad
    // Writes out input rows [done, end) and clears their slots.
    int64_t done = 0;
    const auto finish_rows = [&](int64_t end) {
      for (; done < end; ++done) {
        acc_t* sum = sums + (done % ring) * row;
        scalar_t* dst = grad_data + block_start + done * g.w.in * channels;
        for (int64_t w = 0; w < g.w.in; ++w) {
          for (int64_t c = 0; c < b.count; ++c) {
            dst[w * channels + c] = to_data<scalar_t>(sum[w * b.count + c]);
          }
        }
        std::fill(sum, sum + row, acc_t(0));
      }
    };
    for (int64_t oh = 0; oh < g.h.out; ++oh) {
      for (int64_t ow = 0; ow < g.w.out; ++ow) {
        pixel_window_maxima(x_data + block_start, channels, scale + b.first, shift + b.first,
                            g, oh, ow, b.count, best, winner);
        const scalar_t* go =
            go_data + ((b.image * g.h.out + oh) * g.w.out + ow) * channels + b.first;
        add_to_winners(go, best, winner, g, oh, ow, b.count, [&](int64_t ih, int64_t iw) {
          return sums + (ih % ring) * row + iw * b.count;
        });
      }
      // The next output row's windows start at this input row: the rows above are final.
      finish_rows(std::clamp<int64_t>((oh + 1) * g.h.stride - g.h.padding, 0, g.h.in));
    }
    finish_rows(g.h.in);
  });
  return grad;
}

at::Tensor pool_forward_cpu(const at::Tensor& x, const at::Tensor& mean,
                            const at::Tensor& invstd, const at::Tensor& weight,
                            const at::Tensor& bias, c10::IntArrayRef kernel_size,
                            c10::IntArrayRef stride, c10::IntArrayRef padding,
                            c10::IntArrayRef dilation, bool ceil_mode) {
  const PoolGeometry g = check_pool_args(x, mean, invstd, weight, bias, kernel_size, stride,
                                         padding, dilation, ceil_mode);
  const bool pixel_major = is_pixel_major(x);
  const at::Tensor dense = pixel_major ? x : x.contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                         "bn_relu_max_pool2d", [&] {
    return pixel_major ? forward_channels_last<scalar_t>(dense, mean, invstd, weight, bias, g)
                       : forward_planes<scalar_t>(dense, mean, invstd, weight, bias, g);
  });
}

at::Tensor pool_backward_cpu(const at::Tensor& grad_out, const at::Tensor& x,
                             const at::Tensor& mean, const at::Tensor& invstd,
                             const at::Tensor& weight, const at::Tensor& bias,
                             c10::IntArrayRef kernel_size, c10::IntArrayRef stride,
                             c10::IntArrayRef padding, c10::IntArrayRef dilation,
                             bool ceil_mode) {
  const PoolGeometry g = check_pool_args(x, mean, invstd, weight, bias, kernel_size, stride,
                                         padding, dilation, ceil_mode);
  TORCH_CHECK_VALUE(grad_out.dim() == 4 && grad_out.size(0) == x.size(0) &&
                        grad_out.size(1) == x.size(1) && grad_out.size(2) == g.h.out &&
                        grad_out.size(3) == g.w.out,
                    "grad_out must have shape [", x.size(0), ", ", x.size(1), ", ", g.h.out,
                    ", ", g.w.out, "], got ", grad_out.sizes());
  TORCH_CHECK_TYPE(grad_out.scalar_type() == x.scalar_type(), "grad_out dtype ",
                   grad_out.scalar_type(), " differs from x dtype ", x.scalar_type());
  TORCH_CHECK(grad_out.device() == x.device(), "grad_out is on ", grad_out.device(),
              " but x is on ", x.device());
  if (is_pixel_major(x)) {
    const at::Tensor dense_grad = grad_out.contiguous(at::MemoryFormat::ChannelsLast);
    return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                           "bn_relu_max_pool2d_backward", [&] {
      return backward_channels_last<scalar_t>(dense_grad, x, mean, invstd, weight, bias, g);
    });
  }
  const at::Tensor dense = x.contiguous(), dense_grad = grad_out.contiguous();
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(),
                                         "bn_relu_max_pool2d_backward", [&] {
    return backward_planes<scalar_t>(dense_grad, dense, mean, invstd, weight, bias, g);
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("bn_relu_max_pool2d", &pool_forward_cpu);
  m.impl("bn_relu_max_pool2d_backward", &pool_backward_cpu);
}

}  // namespace densenet_fast
