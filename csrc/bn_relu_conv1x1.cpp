// CPU kernels of densenet_fast::bn_relu_conv1x1 and its backward (schemas: ops/schema.py).
//
// The prefix x = buffer[:, :C] is read in place, one pixel tile at a time: a tile of
// a = relu(x * scale + shift) is built in per-thread scratch (float32, or float64 for
// float64 data; bfloat16/float16 data rounded to its dtype) and multiplied by the GEMM engine
// measured fastest on the machine (run_fastest: ATen's BLAS, oneDNN, or a low-precision
// GEMM), so the prefix is read once per pass and no prefix-sized activation exists. Two
// buffer layouts are served:
//   channel-major (NCHW):  per image, x is [C, HW] with row stride HW, out = W a
//   pixel-major (NHWC):    x is [N*HW, C] with row stride C_total,   out = a W^T
// Backward, pass 1, per tile: recompute a, accumulate dW += g_out a^T per thread, compute
// g = (W^T g_out) * [a > 0] and reduce sum(g), sum(g (x - mean)) per channel. dx is that of
// densenet_fast.ops.batchnorm.bn_backward: without stats_grad only its direct term, added to
// the gradient buffer right there, in one pass; with it, dx needs the sums first: g waits in
// a store of bounded size (the prefix is walked in channel chunks) for pass 2.

#include <ATen/ATen.h>
#include <ATen/Context.h>
#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "amx_gemm.h"
#include "kernel_common.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstring>
#include <functional>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

namespace densenet_fast {
namespace {

// A tensor made on first use, by whichever thread needs it first: the copies of the weight
// that only some engines read (float32 and transposed ones), which a bfloat16 layer whose
// tiles all run in low precision never makes (they were ~5% of densenet121's bf16
// channels-last step, on the calling thread).
class LazyTensor {
 public:
  explicit LazyTensor(std::function<at::Tensor()> make = {}) : make_(std::move(make)) {}

  // Forgets the value: the next get() makes one with `make`. Not while another thread may
  // call get().
  void reset(std::function<at::Tensor()> make) {
    std::lock_guard<std::mutex> lock(mutex_);
    value_ = at::Tensor();
    make_ = std::move(make);
  }

  const at::Tensor& get() const {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!value_.defined()) value_ = make_();
    return value_;
  }

 private:
  mutable std::mutex mutex_;
  mutable at::Tensor value_;
  std::function<at::Tensor()> make_;
};

// Per-thread activation scratch targets this many elements (fits a core's L2 cache); twice
// as many for bfloat16/float16 data off the AMX micro-kernel, whose tiles the low-precision
// engine reads in that dtype: the same bytes, half the at::mm calls, whose fixed cost weighs
// (on a 2-core AMD EPYC of family 25, Zen 4, at::mm in bfloat16 pays ~15 us per call; the
// fused op's forward and backward on densenet121's bfloat16 channels-last layers at batch 8
// took 0.89-0.98x the time of tiles of 2^17 elements, both balanced as below).
constexpr int64_t kTileElements = 1 << 17;
// Pixel-major tiles are cut no shorter than this to give every thread a share: below it,
// one tile on the calling thread with every thread in its GEMMs cost less.
constexpr int64_t kMinSharedTile = 64;
// The backward's chunk-sized store of g holds at most this many elements (16 MiB float32),
// the same bound as the pure-PyTorch kernels' temporaries.
constexpr int64_t kChunkElements = 1 << 22;
void check_forward_args(const at::Tensor& buffer, const at::Tensor& mean,
                        const at::Tensor& invstd, const at::Tensor& bn_weight,
                        const at::Tensor& bn_bias, const at::Tensor& conv_weight) {
  check_data(buffer, "buffer");
  TORCH_CHECK_VALUE(
      conv_weight.dim() == 4 && conv_weight.size(2) == 1 && conv_weight.size(3) == 1,
      "conv_weight must have shape [C_out, C, 1, 1], got ", conv_weight.sizes());
  const int64_t channels = conv_weight.size(1);
  TORCH_CHECK_VALUE(channels <= buffer.size(1), "conv_weight reads ", channels,
                    " input channels but buffer has only ", buffer.size(1));
  TORCH_CHECK_TYPE(conv_weight.scalar_type() == buffer.scalar_type(), "conv_weight dtype ",
                   conv_weight.scalar_type(), " differs from buffer dtype ",
                   buffer.scalar_type());
  check_bn_vectors(buffer, "buffer", channels, mean, invstd, bn_weight, bn_bias);
  TORCH_CHECK(conv_weight.device() == buffer.device(), "conv_weight is on ",
              conv_weight.device(), " but buffer is on ", buffer.device());
}

// Where the prefix lives and how it is cut into pixel tiles (work items).
struct Geometry {
  bool pixel_major;
  // capacity: pixels a tile may hold for this width; tile: the pixels one tile does hold.
  int64_t n, channels, total, hw, pixels, out_channels, capacity, tile, tiles_per_image, items;
  // Whether the items are shared out among threads (for_each_item), else all run on the
  // calling thread, where ATen's BLAS calls can use every thread themselves (small planes:
  // one large GEMM beats one thread per tile).
  bool shared = false;

  // whole_images: channel-major tiles of small planes (two or more fit a tile) hold several
  // whole images side by side, as pixel-major tiles do, instead of one short plane each: the
  // backward's GEMMs are then a few wide ones instead of one tiny one per image.
  Geometry(const at::Tensor& buffer, int64_t channels_, int64_t out_channels_, int64_t width,
           bool whole_images = false)
      : pixel_major(is_pixel_major(buffer)),
        n(buffer.size(0)),
        channels(channels_),
        total(buffer.size(1)),
        hw(buffer.size(2) * buffer.size(3)),
        pixels(buffer.size(0) * buffer.size(2) * buffer.size(3)),
        out_channels(out_channels_) {
    // Tiles the AMX micro-kernel takes keep the float32 size: it has no per-call cost to
    // spread, and twice the tile ran no faster on an Intel Xeon with AMX.
    const bool amx_tiles = pixel_major && amx_available(buffer.scalar_type());
    const int64_t elements =
        buffer.element_size() == 2 && !amx_tiles ? 2 * kTileElements : kTileElements;
    capacity = std::max<int64_t>(16, (elements / std::max<int64_t>(width, 1)) / 16 * 16);
    tile = capacity;
    if (pixel_major) {
      tile = balanced_tile(pixels, capacity);
      tiles_per_image = 0;
      items = (pixels + tile - 1) / tile;
    } else if (whole_images && 2 * hw <= capacity) {
      tile = std::min(capacity / hw, n) * hw;
      tiles_per_image = 0;
      items = (pixels + tile - 1) / tile;
    } else {
      tile = std::min(tile, hw);
      tiles_per_image = (hw + tile - 1) / tile;
      items = n * tiles_per_image;
    }
    // Balanced pixel-major tiles are shared as soon as every thread gets one; channel-major
    // ones, not balanced, where each thread gets two or more.
    shared = items >= (pixel_major ? 1 : 2) * at::get_num_threads();
  }

  // The length of pixel-major tiles: at most `capacity`, the pixels cut into equal tiles, as
  // many as a multiple of the thread count, so that each thread gets the same share (on a
  // 2-core AMD EPYC of family 25 a layer of 392 pixels by 992 channels cut into 128, 128,
  // 128 and 8 pixels took 1.15x the time of 98 each, and one of 512 channels in two tiles
  // run one after another on the calling thread 2.1x). Fewer, on the calling thread, where
  // they would be shorter than kMinSharedTile; even lengths, which the AMX micro-kernel's
  // weight gradient takes.
  static int64_t balanced_tile(int64_t pixels, int64_t capacity) {
    const int64_t threads = at::get_num_threads();
    int64_t tiles = (pixels + capacity - 1) / capacity;
    tiles = (tiles + threads - 1) / threads * threads;
    if (pixels < tiles * kMinSharedTile) tiles = std::max<int64_t>(1, pixels / kMinSharedTile);
    const int64_t len = (pixels + tiles - 1) / tiles;
    return std::min(capacity, len + len % 2);
  }

  // First pixel (global index n*HW + hw) and length of work item `item`.
  std::pair<int64_t, int64_t> span(int64_t item) const {
    if (tiles_per_image == 0) {
      const int64_t start = item * tile;
      return {start, std::min(tile, pixels - start)};
    }
    const int64_t image = item / tiles_per_image, t0 = (item % tiles_per_image) * tile;
    return {image * hw + t0, std::min(tile, hw - t0)};
  }

  // Whether the tile [p0, p0 + len) lies in one image (always, but for whole-image tiles).
  bool in_one_image(int64_t p0, int64_t len) const {
    return pixel_major || p0 % hw + len <= hw;
  }

  // Channel-major: calls fn(p, at, run) for each run of the tile [p0, p0 + len) that lies in
  // one image: its first pixel p (global), its position `at` in the tile and its length.
  template <typename F>
  void for_each_run(int64_t p0, int64_t len, const F& fn) const {
    for (int64_t at = 0; at < len;) {
      const int64_t p = p0 + at, run = std::min(len - at, hw - p % hw);
      fn(p, at, run);
      at += run;
    }
  }

  // Offset of (pixel p, channel c) in a dense tensor with `width` channels of this layout.
  int64_t offset(int64_t p, int64_t c, int64_t width) const {
    if (pixel_major) return p * width + c;
    return (p / hw) * width * hw + c * hw + p % hw;
  }
};

// Runs fn over the geometry's work items: across threads where they are shared, else on the
// calling thread.
template <typename F>
void for_each_item(const Geometry& g, const F& fn) {
  if (g.shared) {
    at::parallel_for(0, g.items, 1, fn);
  } else {
    fn(0, g.items);
  }
}

template <typename acc_t>
at::Tensor matrix(acc_t* data, int64_t rows, int64_t cols, int64_t row_stride) {
  return at::from_blob(data, {rows, cols}, {row_stride, 1},
                       at::TensorOptions().dtype(c10::CppTypeToScalarType<acc_t>::value));
}

// A dense tile of `len` pixels by `width` channels in the layout's order: [len, width]
// (pixel-major) or [width, len] (channel-major).
template <typename acc_t>
at::Tensor tile_matrix(bool pixel_major, acc_t* data, int64_t len, int64_t width) {
  return pixel_major ? matrix(data, len, width, width) : matrix(data, width, len, len);
}

// out = a @ b, written into `out` (a view of existing memory).
void mm_into(at::Tensor out, const at::Tensor& a, const at::Tensor& b) { at::mm_out(out, a, b); }

// ATen's float32 GEMMs (at::mm, addmm, cpublas::gemm) follow the matmul precision:
// torch.set_float32_matmul_precision("medium") lets oneDNN compute them in bfloat16 on a CPU
// with bfloat16 instructions. torchvision's convolutions, the products these GEMMs stand for,
// follow the convolution one (torch.backends.mkldnn.conv.fp32_precision), which that call
// leaves alone: with only the matmul setting lowered (for a model's Linear layers, say),
// densenet121's float32 features came out at 4e-3 relative error in eval and 5e-2 in
// training, torchvision's at 3e-7 and 1e-5 (Intel Xeon with AMX). So while fused ops of
// float32 data run, the matmul setting is the convolution's; the last one to finish restores
// it. The setting is the process's: a float32 matmul another thread runs meanwhile runs under
// it too.
class ConvolutionPrecisionForGemms {
 public:
  explicit ConvolutionPrecisionForGemms(at::ScalarType dtype) : engaged_(dtype == at::kFloat) {
    if (!engaged_) return;  // other dtypes' GEMMs ignore the setting
    std::lock_guard<std::mutex> lock(state().mutex);
    if (state().running++ > 0) return;  // set by an op still running on another thread
    auto& context = at::globalContext();
    const auto conv = context.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::CONV);
    const auto matmul =
        context.float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL);
    state().saved.reset();
    if (matmul == conv) return;
    context.setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL, conv);
    state().saved = matmul;
  }
  ~ConvolutionPrecisionForGemms() {
    if (!engaged_) return;
    std::lock_guard<std::mutex> lock(state().mutex);
    if (--state().running > 0 || !state().saved) return;
    at::globalContext().setFloat32Precision(at::Float32Backend::MKLDNN, at::Float32Op::MATMUL,
                                            *state().saved);
  }
  ConvolutionPrecisionForGemms(const ConvolutionPrecisionForGemms&) = delete;
  ConvolutionPrecisionForGemms& operator=(const ConvolutionPrecisionForGemms&) = delete;

 private:
  // The ops running now, and the matmul setting the first of them found (none: unchanged).
  struct State {
    std::mutex mutex;
    int running = 0;
    std::optional<at::Float32Precision> saved;
  };
  static State& state() {
    static State s;
    return s;
  }
  const bool engaged_;
};

// Which kernel runs a GEMM of a 1x1 convolution. Float32 data: ATen's BLAS (at::mm) or
// oneDNN (a 1x1 convolution primitive). Neither wins everywhere: on an AMD EPYC (Zen 5)
// oneDNN ran the forward's large tiles 1.2-2x as fast as ATen's BLAS, on an Intel Xeon
// (family 6, model 207) ATen's BLAS (MKL) ran them 1.3-2x as fast as oneDNN. bfloat16 and
// float16 data (autocast's) add at::mm on operands of that dtype (float32 accumulation,
// kLowPrecision): with AMX or fast AVX512-BF16 it is the fastest; on the Xeon above a
// bfloat16 GEMM ran at 0.6x the float32 rate, a float16 one at 1.1x. The float32 engines
// compute the same function on such data (the operands are exactly representable, the
// products exact in float32). So the engine is measured on the machine, as cuDNN's
// benchmark mode measures its algorithms (run_fastest). On an Intel Xeon with AMX (family 6,
// model 167) the low-precision engine won nearly every GEMM, the weight gradient's included
// (whose tile results it rounds to the data's dtype); a tile whose GEMMs are all settled on
// it builds its activation (and gathers grad_out) in the data's dtype, not in float32 and
// converted per GEMM (densenet121's bf16 channels-last step: 1.08x -> 0.99x torchvision's).
// On such a CPU the low-precision engine runs bfloat16 pixel-major tiles through oneDNN's
// brgemm micro-kernel (amx_gemm.h) instead of at::mm, whose fixed cost per call matched the
// tile's arithmetic.
enum class Engine : int { kBlas = 0, kOneDnn = 1, kLowPrecision = 2 };
constexpr int kEngines = 3;
const char* const kEngineNames[kEngines] = {"blas", "onednn", "lowp"};

// The three GEMMs of a 1x1 convolution: their operands' shapes and layouts differ, and so
// may the fastest engine.
enum class GemmKind : int { kForward = 0, kInputGrad = 1, kWeightGrad = 2 };
const char* const kGemmKindNames[3] = {"forward", "input gradient", "weight gradient"};

// What a measured choice is remembered under: GEMMs of one kind, data dtype, layout, thread
// count and magnitude (log2 of the multiply-adds and of the reduction length) behave alike,
// as long as torch.backends.mkldnn enables oneDNN or not (`onednn`): besides being an engine
// itself, oneDNN is what runs at::mm in bfloat16: on an AMD EPYC (family 25, Zen 4) that
// engine ran the fused op 2x as fast as float32 BLAS with oneDNN, 4-13x slower without.
// Choices measured with oneDNN disabled, once kept under the same key, made every later
// process run its bfloat16 GEMMs through float32 BLAS: the fused backward at 110-176
// GFLOP/s instead of 254-299 on densenet121's bfloat16 channels-last layers at batch 8.
struct EngineKey {
  int kind, dtype;
  bool pixel_major, onednn;
  int64_t threads, log2_macs, log2_inner;
  bool operator<(const EngineKey& o) const {
    return std::tie(kind, dtype, pixel_major, onednn, threads, log2_macs, log2_inner) <
           std::tie(o.kind, o.dtype, o.pixel_major, o.onednn, o.threads, o.log2_macs,
                    o.log2_inner);
  }
};

int64_t log2_floor(int64_t v) {
  int64_t r = 0;
  while (v > 1) {
    v >>= 1;
    ++r;
  }
  return r;
}

// GEMMs smaller than this many multiply-adds per thread that runs them are not measured:
// the other engines' fixed costs (oneDNN's ~50 us per call, at::mm's in bfloat16, the
// low-precision copy of the operand) lose below it everywhere measured, and they stay with
// ATen's float32 BLAS. Except bfloat16 pixel-major tiles on a CPU with AMX: the micro-kernel
// (amx_gemm.h) has no such cost, where float32 BLAS pays for the float32 copy of the weight,
// and they take the low-precision engine (on an Intel Xeon with AMX, family 6, model 167, a
// layer of 18 pixels by 992 channels ran its forward in 75 us against 247 us, its backward
// in 257 us against 584 us, one thread). It was 2^22 until, on an AMD EPYC of family 25
// (AVX512_BF16, no AMX), at::mm in bfloat16 won every GEMM measured down to 2^20: the
// fused op on densenet121's last-block layers at batch 1 and 2 (49 and 98 pixels, bf16
// channels-last, 2 threads), which float32 BLAS had served unmeasured, took 0.4-0.6x the
// time forward and 0.5-0.8x backward with it.
constexpr int64_t kMeasuredMinMacs = int64_t(1) << 20;
// Timed runs of each engine when a choice is measured (the fastest run counts).
constexpr int kEngineTrials = 3;

// How run_fastest picks: measure (the default), or always one engine (tests, benchmarks):
// policy k > 0 forces Engine(k - 1) where it applies, else BLAS.
constexpr int kMeasure = 0;
std::atomic<int> engine_policy{kMeasure};

// Measured choices, and the lock that guards them.
std::mutex& engines_mutex() {
  static std::mutex mutex;
  return mutex;
}
std::map<EngineKey, Engine>& chosen_engines() {
  static std::map<EngineKey, Engine> chosen;
  return chosen;
}

bool onednn_usable() { return at::hasMKLDNN() && at::globalContext().userEnabledMkldnn(); }

// Whether `engine` can run GEMMs of `dtype` data here.
bool applies(Engine engine, at::ScalarType dtype) {
  switch (engine) {
    case Engine::kBlas: return true;
    case Engine::kOneDnn: return dtype != at::kDouble && onednn_usable();
    case Engine::kLowPrecision: return dtype == at::kBFloat16 || dtype == at::kHalf;
  }
  return false;
}

// Whether a GEMM of `dtype` data may run with `engine`: it applies, and oneDNN only where the
// GEMM offers it (`with_onednn`).
bool usable(Engine engine, at::ScalarType dtype, bool with_onednn) {
  return applies(engine, dtype) && (with_onednn || engine != Engine::kOneDnn);
}

// Whether float32 convolutions may compute in a lower precision (torch.backends.mkldnn.conv's
// fp32_precision "bf16" or "tf32"), which ConvolutionPrecisionForGemms passes on to the
// float32 GEMMs. Their engines are then not measured: every engine runs through oneDNN at that
// precision, and a choice made so, kept under the same key as IEEE ones, could slow every later
// IEEE process (as choices made with oneDNN disabled once did); ATen's BLAS serves them.
bool reduced_convolution_precision() {
  const auto precision =
      at::globalContext().float32Precision(at::Float32Backend::MKLDNN, at::Float32Op::CONV);
  return precision == at::Float32Precision::BF16 || precision == at::Float32Precision::TF32;
}

// Where the engine of a GEMM stands: settled (`engine`), or to be measured under `key`.
struct EnginePlan {
  std::optional<Engine> engine;
  EngineKey key;
};

// The plan for a GEMM (the arguments are run_fastest's): the forced engine, float32 BLAS
// where nothing is measured, the choice measured for GEMMs like it, or none yet.
EnginePlan plan_engine(GemmKind kind, at::ScalarType dtype, bool pixel_major, int64_t macs,
                       int64_t inner, bool with_onednn) {
  const int policy = engine_policy.load();
  if (policy != kMeasure) {
    const auto forced = static_cast<Engine>(policy - 1);
    return {usable(forced, dtype, with_onednn) ? forced : Engine::kBlas, {}};
  }
  const int64_t threads = at::in_parallel_region() ? 1 : at::get_num_threads();
  // The calling thread's GEMM is shared by every thread, which oneDNN does for one short
  // row of pixels only with twice the work per thread.
  const int64_t needed = threads == 1 ? kMeasuredMinMacs : 2 * kMeasuredMinMacs * threads;
  if (dtype == at::kDouble || at::globalContext().deterministicAlgorithms() ||
      (dtype == at::kFloat && reduced_convolution_precision())) {
    return {Engine::kBlas, {}};
  }
  if (macs < needed) {
    const bool amx = pixel_major && amx_available(dtype);
    return {amx ? Engine::kLowPrecision : Engine::kBlas, {}};
  }
  const EngineKey key{static_cast<int>(kind), static_cast<int>(dtype), pixel_major,
                      onednn_usable(), threads, log2_floor(macs), log2_floor(inner)};
  std::lock_guard<std::mutex> lock(engines_mutex());
  const auto found = chosen_engines().find(key);
  if (found != chosen_engines().end()) {
    // A oneDNN choice stays unused where this GEMM does not offer oneDNN.
    return {usable(found->second, dtype, with_onednn) ? found->second : Engine::kBlas, key};
  }
  return {std::nullopt, key};
}

// Whether a GEMM like this is settled on the low-precision engine: then its operands can be
// built in the data's dtype to begin with, instead of in float32 and converted.
bool settled_on_low_precision(GemmKind kind, at::ScalarType dtype, bool pixel_major,
                              int64_t macs, int64_t inner, bool with_onednn = true) {
  return plan_engine(kind, dtype, pixel_major, macs, inner, with_onednn).engine ==
         Engine::kLowPrecision;
}

// Runs a GEMM of kind `kind`, `macs` multiply-adds with reduction length `inner`, on `dtype`
// data through `run(engine)`, with the engine the policy gives among those that apply and
// `run` offers (`with_onednn`). Measuring: float32 BLAS for float64 data, float32 data under
// a lowered convolution precision, small GEMMs (the low-precision engine for bfloat16
// pixel-major ones on AMX, see kMeasuredMinMacs), and under
// torch.use_deterministic_algorithms (a measured choice could differ between processes, and
// with it the rounding); else the engine measured fastest for GEMMs like it,
// where the first GEMM of its kind runs with every engine that applies, a few times: `run`
// must give the same result however often it runs.
template <typename F>
void run_fastest(GemmKind kind, at::ScalarType dtype, bool pixel_major, int64_t macs,
                 int64_t inner, const F& run, bool with_onednn = true) {
  const EnginePlan plan = plan_engine(kind, dtype, pixel_major, macs, inner, with_onednn);
  if (plan.engine) {
    run(*plan.engine);
    return;
  }
  const EngineKey& key = plan.key;
  double best[kEngines] = {1e30, 1e30, 1e30};
  for (int trial = 0; trial <= kEngineTrials; ++trial) {
    for (int e = 0; e < kEngines; ++e) {
      if (!usable(static_cast<Engine>(e), dtype, with_onednn)) continue;
      const auto start = std::chrono::steady_clock::now();
      run(static_cast<Engine>(e));
      const double seconds =
          std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
      if (trial > 0) best[e] = std::min(best[e], seconds);  // trial 0 warms up
    }
  }
  Engine engine = static_cast<Engine>(std::min_element(best, best + kEngines) - best);
  {
    // Threads that measured GEMMs of one key at once (tiles of one parallel_for) all run the
    // choice stored first: a thread running its own would round its tiles differently, and
    // which thread's measurement won would change the bits from run to run.
    std::lock_guard<std::mutex> lock(engines_mutex());
    engine = chosen_engines().emplace(key, engine).first->second;
  }
  run(engine);  // the output is the chosen engine's, whichever ran last
}

// The GEMM of a 1x1 convolution over one tile of `len` pixels, dst = K src:
//   channel-major: dst [rows, len] = K [rows, inner] @ src [inner, len]
//   pixel-major:   dst [len, rows] = src [len, inner] @ K^T
// K is dense ([rows, inner], row stride inner); src and dst may be strided views, all of one
// dtype. The forward multiplies by the weight (K = W), the input gradient by its transpose
// (K = W^T). With `onednn` it runs as a 1x1 convolution of src viewed as one
// [1, inner, 1, len] image in its own layout, whose result is copied into dst; else at::mm.
void conv1x1_gemm(bool onednn, bool pixel_major, const at::Tensor& kernel, const at::Tensor& src,
                  const at::Tensor& dst) {
  if (!onednn) {
    pixel_major ? mm_into(dst, src, kernel.t()) : mm_into(dst, kernel, src);
    return;
  }
  const int64_t rows = kernel.size(0), inner = kernel.size(1);
  // [1, inner, 1, len] views: NCHW of a [inner, len] tile, channels-last of a [len, inner]
  // one; the kernel [rows, inner, 1, 1] is both, and is given the input's strides so that
  // oneDNN sees one layout throughout.
  const at::Tensor image =
      pixel_major ? src.t().unsqueeze(0).unsqueeze(2) : src.unsqueeze(0).unsqueeze(2);
  const at::Tensor weight =
      pixel_major ? kernel.as_strided({rows, inner, 1, 1}, {inner, 1, inner, inner})
                  : kernel.view({rows, inner, 1, 1});
  const at::Tensor result =
      at::mkldnn_convolution(image, weight, std::nullopt, {0, 0}, {1, 1}, {1, 1}, 1);
  const at::Tensor out = result.select(2, 0).select(0, 0);  // [rows, len]
  dst.copy_(pixel_major ? out.t() : out);
}

// The forward's float32 (or float64) GEMM of one tile of a = relu(bn(x)) (`act`, dense),
// written into `dst` with the fastest engine that computes in acc_t:
//   channel-major: dst [C_out, len] (row stride dst_stride) = W [C_out, C] @ a [C, len]
//   pixel-major:   dst [len, C_out] (row stride C_out)      = a [len, C] @ W^T
template <typename acc_t, typename out_t>
void forward_gemm(bool pixel_major, const at::Tensor& weight, acc_t* act, int64_t channels,
                  int64_t len, out_t* dst, int64_t dst_stride) {
  const int64_t co = weight.size(0);
  const at::Tensor a = tile_matrix(pixel_major, act, len, channels);
  const at::Tensor out = pixel_major ? matrix(dst, len, co, co) : matrix(dst, co, len, dst_stride);
  run_fastest(GemmKind::kForward, a.scalar_type(), pixel_major, co * channels * len, channels,
              [&](Engine engine) {
    conv1x1_gemm(engine == Engine::kOneDnn, pixel_major, weight, a, out);
  });
}


// g where ReLU lets the gradient through, else 0: threshold_backward's rule, which zeroes
// where a <= 0, so a NaN activation passes g.
template <typename acc_t, typename act_t>
inline acc_t relu_masked(act_t a, acc_t g) {
  return !(static_cast<acc_t>(a) <= acc_t(0)) ? g : acc_t(0);
}

// Pixel-major row of n channels: g *= [a > 0]; sum_g += g; sum_gx += g * (x - mean). The mask
// mirrors the threshold_backward of densenet_fast.ops.torch_impl.bn_relu_conv1x1_backward, NaN
// included (it zeroes where a <= 0, so a NaN activation passes the gradient); the
// sums give densenet_fast.ops.batchnorm.bn_backward's dbias and dweight (times invstd).
template <typename scalar_t, typename acc_t, typename act_t>
void mask_reduce_row(const act_t* __restrict__ act, acc_t* __restrict__ grad,
                     const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                     acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_gx, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t gv = grad[i];
    const acc_t v = relu_masked(act[i], gv);
    grad[i] = v;
    sum_g[i] += v;
    sum_gx[i] += v * (static_cast<acc_t>(x[i]) - mean[i]);
  }
}

// Channel-major run of n pixels of one channel: as above, returning (sum g, sum g (x - m)).
// kLanes independent partial sums let the reduction vectorise without reassociation.
template <typename scalar_t, typename acc_t, typename act_t>
std::pair<acc_t, acc_t> mask_reduce_channel(const act_t* __restrict__ act,
                                            acc_t* __restrict__ grad,
                                            const scalar_t* __restrict__ x, acc_t mean,
                                            int64_t n) {
  acc_t s_l[kLanes] = {}, sx_l[kLanes] = {};
  int64_t i = 0;
  for (; i + kLanes <= n; i += kLanes) {
    for (int l = 0; l < kLanes; ++l) {
      const acc_t gv = grad[i + l];
      const acc_t v = relu_masked(act[i + l], gv);
      grad[i + l] = v;
      s_l[l] += v;
      sx_l[l] += v * (static_cast<acc_t>(x[i + l]) - mean);
    }
  }
  for (; i < n; ++i) {
    const acc_t gv = grad[i];
    const acc_t v = relu_masked(act[i], gv);
    grad[i] = v;
    s_l[0] += v;
    sx_l[0] += v * (static_cast<acc_t>(x[i]) - mean);
  }
  acc_t s = 0, sx = 0;
  for (int l = 0; l < kLanes; ++l) {
    s += s_l[l];
    sx += sx_l[l];
  }
  return {s, sx};
}

// v rounded to the data's precision (in_data_precision), n contiguous elements.
template <typename scalar_t, typename acc_t>
void round_to_data_precision(acc_t* __restrict__ v, int64_t n) {
  for (int64_t i = 0; i < n; ++i) v[i] = in_data_precision<scalar_t>(v[i]);
}

// grad_x += k_g * g + k_x * x + k_0, per-element coefficients (pixel-major row).
template <typename scalar_t, typename acc_t>
void add_dx_row(const acc_t* __restrict__ grad, const scalar_t* __restrict__ x,
                const acc_t* __restrict__ k_g, const acc_t* __restrict__ k_x,
                const acc_t* __restrict__ k_0, scalar_t* __restrict__ grad_x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t dx = k_g[i] * grad[i] + k_x[i] * static_cast<acc_t>(x[i]) + k_0[i];
    grad_x[i] = to_data<scalar_t>(static_cast<acc_t>(grad_x[i]) + dx);
  }
}

// grad_x += k_g * g + k_x * x + k_0, one channel's coefficients (channel-major run).
template <typename scalar_t, typename acc_t>
void add_dx_channel(const acc_t* __restrict__ grad, const scalar_t* __restrict__ x, acc_t k_g,
                    acc_t k_x, acc_t k_0, scalar_t* __restrict__ grad_x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t dx = k_g * grad[i] + k_x * static_cast<acc_t>(x[i]) + k_0;
    grad_x[i] = to_data<scalar_t>(static_cast<acc_t>(grad_x[i]) + dx);
  }
}

// grad_x += k * g, per-element coefficients (pixel-major row).
template <typename scalar_t, typename acc_t>
void add_scaled_row(const acc_t* __restrict__ grad, const acc_t* __restrict__ k,
                    scalar_t* __restrict__ grad_x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    grad_x[i] = to_data<scalar_t>(static_cast<acc_t>(grad_x[i]) + k[i] * grad[i]);
  }
}

// mask_reduce_row then add_scaled_row in one pass, for g in the data's dtype (the input
// gradient's low-precision GEMM result): g *= [a > 0]; sum_g += g; sum_gx += g (x - mean);
// grad_x += k g. The same operations in the same order, without g widened into float32
// scratch, written back masked and read again (a third of a bfloat16 layer's backward
// besides its GEMMs was such passes).
template <typename scalar_t, typename acc_t, typename act_t>
void mask_reduce_add_row(const act_t* __restrict__ act, const scalar_t* __restrict__ grad,
                         const scalar_t* __restrict__ x, const acc_t* __restrict__ mean,
                         acc_t* __restrict__ sum_g, acc_t* __restrict__ sum_gx,
                         const acc_t* __restrict__ k, scalar_t* __restrict__ grad_x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    const acc_t gv = static_cast<acc_t>(grad[i]);
    const acc_t v = relu_masked(act[i], gv);
    sum_g[i] += v;
    sum_gx[i] += v * (static_cast<acc_t>(x[i]) - mean[i]);
    grad_x[i] = to_data<scalar_t>(static_cast<acc_t>(grad_x[i]) + k[i] * v);
  }
}

// grad_x += k * g, one channel's coefficient (channel-major run).
template <typename scalar_t, typename acc_t>
void add_scaled_channel(const acc_t* __restrict__ grad, acc_t k, scalar_t* __restrict__ grad_x,
                        int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    grad_x[i] = to_data<scalar_t>(static_cast<acc_t>(grad_x[i]) + k * grad[i]);
  }
}

// a = relu(x * scale + shift) for channels [c0, c0 + cc) of the pixels [p0, p0 + len), into
// `act`: [cc, len] (channel-major) or [len, cc] (pixel-major), both dense, in acc_t or, for a
// low-precision GEMM, in the data's dtype.
template <typename scalar_t, typename acc_t, typename out_t = acc_t>
void bn_relu_tile(const Geometry& g, const scalar_t* x, const acc_t* scale, const acc_t* shift,
                  int64_t p0, int64_t len, int64_t c0, int64_t cc, out_t* act) {
  if (g.pixel_major) {
    for (int64_t r = 0; r < len; ++r) {
      bn_relu_row(x + (p0 + r) * g.total + c0, scale + c0, shift + c0, act + r * cc, cc);
    }
  } else {
    for (int64_t c = 0; c < cc; ++c) {
      g.for_each_run(p0, len, [&](int64_t p, int64_t at, int64_t run) {
        bn_relu_channel(x + g.offset(p, c0 + c, g.total), scale[c0 + c], shift[c0 + c],
                        act + c * len + at, run);
      });
    }
  }
}

// The pixels [p0, p0 + len) of one image of a dense C_out-channel tensor in the buffer's
// layout (the forward's output, grad_out), viewed in place as a matrix: [len, C_out]
// (pixel-major) or [C_out, len] (channel-major, row stride H*W).
template <typename scalar_t>
at::Tensor image_tile(const Geometry& g, scalar_t* data, int64_t p0, int64_t len) {
  const int64_t co = g.out_channels;
  scalar_t* base = data + g.offset(p0, 0, co);
  return g.pixel_major ? matrix(base, len, co, co) : matrix(base, co, len, g.hw);
}

// grad_out for pixels [p0, p0 + len) as an acc_t matrix: [C_out, len] or [len, C_out]. A
// view into grad_out when the types agree and the tile lies in one image, else converted
// (gathered) into `scratch`.
template <typename scalar_t, typename acc_t>
at::Tensor grad_out_tile(const Geometry& g, const scalar_t* grad_out, int64_t p0, int64_t len,
                         acc_t* scratch) {
  const int64_t co = g.out_channels;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    if (g.in_one_image(p0, len)) return image_tile(g, const_cast<acc_t*>(grad_out), p0, len);
  }
  if (g.pixel_major) {
    const scalar_t* src = grad_out + p0 * co;
    for (int64_t i = 0; i < len * co; ++i) scratch[i] = static_cast<acc_t>(src[i]);
    return matrix(scratch, len, co, co);
  }
  for (int64_t c = 0; c < co; ++c) {
    g.for_each_run(p0, len, [&](int64_t p, int64_t at, int64_t run) {
      const scalar_t* src = grad_out + g.offset(p, c, co);
      acc_t* dst = scratch + c * len + at;
      for (int64_t t = 0; t < run; ++t) dst[t] = static_cast<acc_t>(src[t]);
    });
  }
  return matrix(scratch, co, len, len);
}

// Rounds output channels [c0, c1) of the forward's result tile for pixels [p0, p0 + len)
// (acc_t, dense: [C_out, len] channel-major, [len, C_out] pixel-major) into the output; a
// channel-major tile may span several whole images.
template <typename scalar_t, typename acc_t>
void store_output_tile(const Geometry& g, const acc_t* result, int64_t p0, int64_t len,
                       int64_t c0, int64_t c1, scalar_t* out) {
  const int64_t co = g.out_channels;
  if (g.pixel_major) {
    for (int64_t r = 0; r < len; ++r) {
      scalar_t* dst = out + (p0 + r) * co;
      const acc_t* src = result + r * co;
      for (int64_t c = c0; c < c1; ++c) dst[c] = to_data<scalar_t>(src[c]);
    }
    return;
  }
  for (int64_t c = c0; c < c1; ++c) {
    g.for_each_run(p0, len, [&](int64_t p, int64_t at, int64_t run) {
      scalar_t* dst = out + g.offset(p, c, co);
      const acc_t* src = result + c * len + at;
      for (int64_t t = 0; t < run; ++t) dst[t] = to_data<scalar_t>(src[t]);
    });
  }
}

// Forward for channel-major buffers with small planes (2 * H*W <= tile capacity): a tile
// per image would make each GEMM a few pixels wide, so a work item packs several whole
// images side by side into the scratch, [C, images * HW], and scatters the
// [C_out, images * HW] result. There are few such items, so they run one after another:
// the GEMM uses every BLAS thread and the element loops split by channel.
template <typename scalar_t, typename acc_t>
void forward_packed_images(const Geometry& g, const scalar_t* x, const acc_t* scale,
                           const acc_t* shift, const at::Tensor& weight, int64_t images_per_item,
                           acc_t* act, scalar_t* out_data) {
  const int64_t channels = g.channels, co = g.out_channels, hw = g.hw;
  acc_t* result = act + images_per_item * hw * channels;
  for (int64_t first = 0; first < g.n; first += images_per_item) {
    const int64_t images = std::min(images_per_item, g.n - first);
    const int64_t len = images * hw;
    const int64_t grain = std::max<int64_t>(1, (1 << 15) / len);
    at::parallel_for(0, channels, grain, [&](int64_t c0, int64_t c1) {
      bn_relu_tile<scalar_t, acc_t>(g, x, scale, shift, first * hw, len, c0, c1 - c0,
                                    act + c0 * len);
    });
    forward_gemm(false, weight, act, channels, len, result, len);
    at::parallel_for(0, co, grain, [&](int64_t c0, int64_t c1) {
      store_output_tile(g, result, first * hw, len, c0, c1, out_data);
    });
  }
}

// The low-precision GEMM of a pixel-major bfloat16 tile through the AMX micro-kernel
// (amx_gemm.h): result = a W^T in float32 ([len, C_out], acc_t scratch), then rounded into
// the output, as at::mm in bfloat16 rounds its float32 sums.
template <typename scalar_t, typename acc_t>
void amx_forward_tile(const Geometry& g, const AmxOperand& weight_t, const scalar_t* act_lp,
                      int64_t p0, int64_t len, acc_t* result, scalar_t* out_data) {
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    amx_gemm(len, act_lp, g.channels, weight_t, result, g.out_channels, /*accumulate=*/false);
    store_output_tile(g, result, p0, len, 0, g.out_channels, out_data);
  } else {
    TORCH_INTERNAL_ASSERT(false, "the AMX micro-kernel serves bfloat16 data only");
  }
}

// An operand of the low-precision engine converted from a float32 tile, made on the engine's
// first run and reused by its later ones: the runs of a measurement (run_fastest) then time
// the GEMM, as tiles settled on that engine run it (built in the data's dtype, with no
// conversion), not a conversion and an allocation per run. Under a small mmap threshold
// (glibc's MALLOC_MMAP_THRESHOLD_=65536, as the benchmark's memory subprocesses run) each
// allocation faulted its pages in, and float32 BLAS won trials that the bfloat16 GEMM wins
// by 2x once settled (AMD EPYC of family 25).
template <typename F>
void lowp_operand(at::Tensor& operand, const F& make) {
  if (!operand.defined()) operand = make();
}

// The forward's GEMM of the tile of pixels [p0, p0 + len) (one image's) for bfloat16/float16
// data, into the output `out_data`: with a float32 engine, into `result` (acc_t scratch),
// then rounded into the output; with the low-precision one, on the tile and the weight in the
// data's dtype, straight into it (through the AMX micro-kernel where `weight_amx`, W^T
// packed, is given).
template <typename scalar_t, typename acc_t>
void lowp_forward_gemm(const Geometry& g, const LazyTensor& weight, const at::Tensor& weight_lp,
                       const AmxOperand* weight_amx, acc_t* act, int64_t p0, int64_t len,
                       acc_t* result, scalar_t* out_data) {
  const int64_t channels = g.channels, co = g.out_channels;
  const bool pm = g.pixel_major;
  const at::Tensor a = tile_matrix(pm, act, len, channels);
  const at::Tensor out = tile_matrix(pm, result, len, co);
  const at::Tensor target = image_tile(g, out_data, p0, len);
  // The tile in the data's dtype, made once (see lowp_operand).
  at::Tensor a_lp;
  run_fastest(GemmKind::kForward, target.scalar_type(), pm, co * channels * len, channels,
              [&](Engine engine) {
    if (engine == Engine::kLowPrecision) {
      lowp_operand(a_lp, [&] { return a.to(target.scalar_type()); });
      if (weight_amx) {
        amx_forward_tile(g, *weight_amx, a_lp.const_data_ptr<scalar_t>(), p0, len, result,
                         out_data);
      } else {
        conv1x1_gemm(false, pm, weight_lp, a_lp, target);
      }
      return;
    }
    conv1x1_gemm(engine == Engine::kOneDnn, pm, weight.get(), a, out);
    // Rounded into the output by a loop of our own: at::copy_ of a strided tile is slower.
    store_output_tile(g, result, p0, len, 0, co, out_data);
  });
}

template <typename scalar_t>
at::Tensor forward_impl(const at::Tensor& buffer, const at::Tensor& mean,
                        const at::Tensor& invstd, const at::Tensor& bn_weight,
                        const at::Tensor& bn_bias, const at::Tensor& conv_weight) {
  using acc_t = at::opmath_type<scalar_t>;
  const int64_t channels = conv_weight.size(1), co = conv_weight.size(0);
  const Geometry g(buffer, channels, co, std::max(channels, co));
  auto [scale_t, shift_t] = scale_shift<acc_t>(mean, invstd, bn_weight, bn_bias);
  const acc_t* scale = scale_t.template data_ptr<acc_t>();
  const acc_t* shift = shift_t.template data_ptr<acc_t>();
  const auto acc_type = scale_t.scalar_type();
  // The weight in acc_t, for the float32 (float64) engines: a view for float32 data.
  const LazyTensor weight([&] {
    return conv_weight.detach().reshape({co, channels}).to(acc_type).contiguous();
  });
  // The weight in the data's dtype, for the low-precision engine.
  at::Tensor weight_lp = std::is_same_v<scalar_t, acc_t>
                             ? at::Tensor()
                             : conv_weight.detach().reshape({co, channels}).contiguous();
  // W^T packed for the AMX micro-kernel (bfloat16 pixel-major tiles on AMX CPUs).
  std::optional<OwnedAmxOperand> weight_amx;
  if (g.pixel_major && amx_available(buffer.scalar_type()) && amx_fits(channels, co)) {
    weight_amx = amx_pack_transposed_owned(weight_lp);
  }
  const AmxOperand* weight_amx_operand = weight_amx ? &weight_amx->operand : nullptr;
  const auto format = g.pixel_major ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor out = at::empty({g.n, co, buffer.size(2), buffer.size(3)},
                             buffer.options().memory_format(format));
  const bool packed = !g.pixel_major && g.n > 1 && 2 * g.hw <= g.capacity;
  const int64_t images_per_item = packed ? std::min(g.n, g.capacity / g.hw) : 1;
  const int64_t tile_pixels = packed ? images_per_item * g.hw : g.tile;
  const int64_t threads = packed ? 1 : at::get_num_threads();  // packed: one shared scratch
  const int64_t per_thread = tile_pixels * (channels + co);
  at::Tensor scratch = at::empty({threads, per_thread}, scale_t.options());
  const scalar_t* x = buffer.template const_data_ptr<scalar_t>();
  scalar_t* out_data = out.template mutable_data_ptr<scalar_t>();

  if (packed) {
    forward_packed_images<scalar_t, acc_t>(g, x, scale, shift, weight.get(), images_per_item,
                                           scratch.template mutable_data_ptr<acc_t>(),
                                           out_data);
    return out;
  }
  for_each_item(g, [&](int64_t begin, int64_t end) {
    // Worker threads do not inherit the caller's dispatch state; the GEMMs below are plain
    // kernel calls on tensors of our own, never autograd operations.
    at::AutoDispatchBelowADInplaceOrView below_autograd;
    acc_t* act = scratch.template mutable_data_ptr<acc_t>() + at::get_thread_num() * per_thread;
    acc_t* result = act + g.tile * channels;
    for (int64_t item = begin; item < end; ++item) {
      const auto [p0, len] = g.span(item);
      if constexpr (std::is_same_v<scalar_t, acc_t>) {
        bn_relu_tile<scalar_t, acc_t>(g, x, scale, shift, p0, len, 0, channels, act);
        forward_gemm(g.pixel_major, weight.get(), act, channels, len,
                     out_data + g.offset(p0, 0, co), g.hw);
      } else if (settled_on_low_precision(GemmKind::kForward, buffer.scalar_type(),
                                          g.pixel_major, co * channels * len, channels)) {
        // The activation built in the data's dtype, multiplied straight into the output.
        auto* act_lp = reinterpret_cast<scalar_t*>(act);
        bn_relu_tile<scalar_t, acc_t, scalar_t>(g, x, scale, shift, p0, len, 0, channels,
                                                act_lp);
        if (weight_amx_operand) {
          amx_forward_tile(g, *weight_amx_operand, act_lp, p0, len, result, out_data);
        } else {
          conv1x1_gemm(false, g.pixel_major, weight_lp,
                       tile_matrix(g.pixel_major, act_lp, len, channels),
                       image_tile(g, out_data, p0, len));
        }
      } else {
        bn_relu_tile<scalar_t, acc_t>(g, x, scale, shift, p0, len, 0, channels, act);
        lowp_forward_gemm(g, weight, weight_lp, weight_amx_operand, act, p0, len, result,
                          out_data);
      }
    }
  });
  return out;
}

// Per-thread scratch of the backward's pass 1: regions of acc_t elements, one after another.
struct BackwardScratch {
  int64_t act;         // [tile, chunk]: a = relu(bn(x)) of one tile (bn_relu_tile)
  int64_t grad_out;    // [tile, C_out]: the tile's grad_out in acc_t, when converted
  int64_t tile_sums;   // [2, chunk]: pixel-major, the tile's sums of g and g (x - mean)
  int64_t tile_g;      // [tile, chunk]: the tile's g; none with two passes (g is stored)
  int64_t per_thread;  // all of the above

  BackwardScratch(const Geometry& g, int64_t chunk, bool two_pass)
      : act(0),
        grad_out(act + g.tile * chunk),
        tile_sums(grad_out + g.tile * g.out_channels),
        tile_g(tile_sums + 2 * chunk),
        per_thread(tile_g + (two_pass ? 0 : g.tile * chunk)) {}
};

// Per-thread float64 sums of g and g (x - mean) over the channels of one chunk,
// [threads, 2, chunk], summed over threads in a fixed order once pass 1 is done.
struct ChunkSums {
  int64_t threads, chunk;
  std::vector<double> data;

  ChunkSums(int64_t threads_, int64_t chunk_)
      : threads(threads_), chunk(chunk_), data(static_cast<size_t>(threads_ * 2 * chunk_)) {}
  void clear() { std::fill(data.begin(), data.end(), 0.0); }
  double* sum_g(int64_t tid) { return data.data() + tid * 2 * chunk; }
  double* sum_gx(int64_t tid) { return sum_g(tid) + chunk; }
  // (sum g, sum g (x - mean)) of channel c of the chunk, over every thread.
  std::pair<double, double> total(int64_t c) const {
    double sg = 0, sgx = 0;
    for (int64_t t = 0; t < threads; ++t) {
      sg += data[t * 2 * chunk + c];
      sgx += data[t * 2 * chunk + chunk + c];
    }
    return {sg, sgx};
  }
};

// What the backward's steps read and write: the data, BN's per-channel vectors and the conv
// weight in acc_t (vectors indexed by absolute channel), the coefficients of dx, and the
// channel chunk [c0, c0 + cc) being worked on.
template <typename scalar_t>
struct BackwardData {
  using acc_t = at::opmath_type<scalar_t>;
  const Geometry& g;
  const bool two_pass;  // stats_grad: g waits in `store` until its chunk's sums are known
  at::Tensor scale_t, shift_t;  // acc_t, [C]
  const AccVector<acc_t> mean_v, invstd_v, gamma_v;
  const acc_t *scale, *shift, *mean, *invstd, *gamma;
  const scalar_t* x;          // the buffer
  const scalar_t* grad_out;
  scalar_t* grad_x;           // the gradient buffer, which dx is added into
  acc_t* store = nullptr;     // two passes: the chunk's g, [pixels, cc] or [cc, pixels]
  // dx = k_g g + k_x x + k_0 per channel: k_g = gamma invstd is the direct term, known up
  // front; k_x, k_0 the statistics' term, set once a chunk's sums are known.
  std::vector<acc_t> k_g, k_x, k_0;
  int64_t c0 = 0, cc = 0;
  at::Tensor weight_2d;       // the conv weight as [C_out, C], in the data's dtype
  at::Tensor weight_t_chunk_view;  // weight[:, c0 : c0 + cc]^T, a view of weight_2d
  LazyTensor weight_t_chunk;  // the same in acc_t, dense [cc, C_out]
  LazyTensor weight_t_chunk_lp;  // the same in the data's dtype (bf16/fp16 channel-major)
  // bfloat16 pixel-major data on a CPU with AMX (amx_gemm.h): the low-precision GEMMs run
  // through the micro-kernel, with weight[:, c0 : c0 + cc] packed once per chunk (the input
  // gradient's B) and per-thread space for a tile's grad_out^T and packed activation (the
  // weight gradient's A and B).
  bool amx = false;
  std::optional<OwnedAmxOperand> weight_chunk_amx;
  at::Tensor amx_space;  // [threads, tile * (C_out + chunk)], the data's dtype

  BackwardData(const Geometry& g_, bool stats_grad, const at::Tensor& grad_out_,
               const at::Tensor& buffer, const at::Tensor& mean_, const at::Tensor& invstd_,
               const at::Tensor& bn_weight, const at::Tensor& bn_bias,
               const at::Tensor& conv_weight, const at::Tensor& grad_buffer)
      : g(g_), two_pass(stats_grad), mean_v(mean_), invstd_v(invstd_), gamma_v(bn_weight) {
    std::tie(scale_t, shift_t) = scale_shift<acc_t>(mean_, invstd_, bn_weight, bn_bias);
    weight_2d = conv_weight.detach().reshape({g.out_channels, g.channels});
    scale = scale_t.template data_ptr<acc_t>();
    shift = shift_t.template data_ptr<acc_t>();
    mean = mean_v.data();
    invstd = invstd_v.data();
    gamma = gamma_v.data();
    x = buffer.template const_data_ptr<scalar_t>();
    grad_out = grad_out_.template const_data_ptr<scalar_t>();
    grad_x = grad_buffer.template mutable_data_ptr<scalar_t>();
    k_g.resize(g.channels);
    k_x.assign(g.channels, acc_t(0));
    k_0.assign(g.channels, acc_t(0));
    for (int64_t c = 0; c < g.channels; ++c) k_g[c] = gamma[c] * invstd[c];
  }

  // Whether a tile of `len` pixels has both its GEMMs (weight and input gradient) settled on
  // the low-precision engine: bfloat16/float16 data only.
  bool low_precision_tile(int64_t len) const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return false;
    } else {
      const auto dtype = c10::CppTypeToScalarType<scalar_t>::value;
      const int64_t co = g.out_channels;
      return settled_on_low_precision(GemmKind::kWeightGrad, dtype, g.pixel_major, co * cc * len,
                                      len, /*with_onednn=*/false) &&
             settled_on_low_precision(GemmKind::kInputGrad, dtype, g.pixel_major, cc * co * len,
                                      co);
    }
  }

  void select_chunk(int64_t first, int64_t count) {
    c0 = first;
    cc = count;
    weight_t_chunk_view = weight_2d.narrow(1, c0, cc).t();
    const at::Tensor& chunk_t = weight_t_chunk_view;
    const auto acc_options = scale_t.options();
    weight_t_chunk.reset([chunk_t, acc_options] {
      return at::empty(chunk_t.sizes(), acc_options).copy_(chunk_t);
    });
    weight_t_chunk_lp.reset([chunk_t] { return chunk_t.contiguous(); });
    weight_chunk_amx.reset();
    if (amx && amx_fits(g.out_channels, cc)) {
      weight_chunk_amx = amx_pack_owned(weight_2d.narrow(1, c0, cc));
    }
  }

  // W[:, c0 : c0 + cc]^T for at::mm in acc_t: float32/float64 data, a view of the weight (a
  // transposed operand costs BLAS nothing, where the transposing copy cost more than the
  // GEMMs of a layer of a few pixels); bfloat16/float16 data, the float32 copy.
  at::Tensor weight_t_chunk_for_mm() const {
    if constexpr (std::is_same_v<scalar_t, acc_t>) {
      return weight_t_chunk_view;
    } else {
      return weight_t_chunk.get();
    }
  }

  // This thread's AMX space: room for grad_out^T ([C_out, tile]), then a packed [tile, cc]
  // activation.
  at::BFloat16* amx_thread_space(int64_t tid) const {
    return amx_space.data_ptr<at::BFloat16>() + tid * amx_space.size(1);
  }
};

// The tile's grad_out in the data's dtype (bfloat16/float16): read in place, or, for a tile
// of several images, go (which holds its values exactly) converted back.
template <typename scalar_t>
at::Tensor grad_out_in_data_dtype(const BackwardData<scalar_t>& d, const at::Tensor& go,
                                  int64_t p0, int64_t len) {
  if (!d.g.in_one_image(p0, len)) return go.to(c10::CppTypeToScalarType<scalar_t>::value);
  return image_tile(d.g, const_cast<scalar_t*>(d.grad_out), p0, len);
}

// The weight gradient's low-precision GEMM of a pixel-major bfloat16 tile through the AMX
// micro-kernel: dw [C_out, cc] (float32, row stride of its own) = or += go^T a, go
// ([len, C_out]) transposed and a ([len, cc]) packed into `space` (amx_thread_space). The
// float32 sums are added as they are: rounded once, with the whole gradient, where the GEMM
// in the data's dtype rounds each tile's. Returns false, having done nothing, where the
// kernel does not take the tile (no AMX space, an odd length, cc not a multiple of 16).
template <typename scalar_t>
bool amx_weight_grad(const BackwardData<scalar_t>& d, const at::Tensor& go, const scalar_t* act,
                     int64_t len, at::BFloat16* space, const at::Tensor& dw, bool accumulate) {
  if (!space || !amx_fits(len, d.cc) || !go.is_contiguous()) return false;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16>) {
    const int64_t co = d.g.out_channels;
    at::BFloat16* go_t = space;
    at::BFloat16* packed = space + co * d.g.tile;
    transpose_tile(go.const_data_ptr<at::BFloat16>(), len, co, co, go_t, len);
    const AmxOperand a = amx_pack(act, len, d.cc, d.cc, packed);
    amx_gemm(co, go_t, len, a, dw.data_ptr<float>(), dw.stride(0), accumulate);
    return true;
  } else {
    TORCH_INTERNAL_ASSERT(false, "the AMX micro-kernel serves bfloat16 data only");
  }
}

// The weight-gradient GEMM of one tile, dw += grad_out a^T ([C_out, cc]), or dw = grad_out a^T
// for a thread's first tile (`accumulate` false: dw is not read). Float32/float64
// data: ATen's BLAS on the acc_t operands. bfloat16/float16 data: the fastest engine, into
// the thread's `tile` scratch, then added: float32 BLAS (exact products, as ever), or a GEMM
// in the data's dtype (float32 accumulation) on grad_out read in place and the tile's
// activation, whose result is rounded to that dtype before it is added, as autocast's
// convolution rounds its weight gradient (once; here once per tile). On an AMX CPU the
// latter runs through the micro-kernel (amx_weight_grad), whose float32 sums are rounded once.
template <typename scalar_t, typename acc_t, typename act_t>
void weight_grad_tile(const BackwardData<scalar_t>& d, const at::Tensor& dw, const at::Tensor& go,
                      act_t* act, int64_t p0, int64_t len, const at::Tensor& tile,
                      at::BFloat16* amx_space, bool accumulate) {
  const bool pm = d.g.pixel_major;
  const int64_t cc = d.cc;
  const at::Tensor a = tile_matrix(pm, act, len, cc);
  // beta 0: dw is not read (nor a NaN in it propagated), as BLAS defines it.
  const int beta = accumulate ? 1 : 0;
  if constexpr (std::is_same_v<scalar_t, acc_t>) {
    pm ? dw.addmm_(go.t(), a, beta) : dw.addmm_(go, a.t(), beta);
  } else if constexpr (std::is_same_v<act_t, scalar_t>) {
    // A tile built for the low-precision engines: a and go are in the data's dtype.
    if (!amx_weight_grad(d, go, act, len, amx_space, dw, accumulate)) {
      const at::Tensor product = pm ? at::mm(go.t(), a) : at::mm(go, a.t());
      accumulate ? dw.add_(product) : dw.copy_(product);
    }
  } else {
    const auto dtype = c10::CppTypeToScalarType<scalar_t>::value;
    at::Tensor go_lp, a_lp;  // made once (see lowp_operand)
    run_fastest(GemmKind::kWeightGrad, dtype, pm, d.g.out_channels * cc * len, len,
                [&](Engine engine) {
      if (engine != Engine::kLowPrecision) {
        pm ? mm_into(tile, go.t(), a) : mm_into(tile, go, a.t());
        return;
      }
      lowp_operand(go_lp, [&] { return grad_out_in_data_dtype(d, go, p0, len); });
      lowp_operand(a_lp, [&] { return a.to(dtype); });
      if (amx_weight_grad(d, go_lp, a_lp.const_data_ptr<scalar_t>(), len, amx_space, tile,
                          /*accumulate=*/false)) {
        return;
      }
      tile.copy_(pm ? at::mm(go_lp.t(), a_lp) : at::mm(go_lp, a_lp.t()));
    }, /*with_onednn=*/false);
    accumulate ? dw.add_(tile) : dw.copy_(tile);
  }
}

// The input gradient's low-precision GEMM of a pixel-major bfloat16 tile through the AMX
// micro-kernel: gs [len, cc] = go_lp [len, C_out] W[:, chunk] in float32, then rounded to
// bfloat16 precision, as the GEMM in that dtype rounds it.
template <typename scalar_t>
void amx_input_grad(const BackwardData<scalar_t>& d, const at::Tensor& go_lp, int64_t len,
                    const at::Tensor& gs) {
  using acc_t = typename BackwardData<scalar_t>::acc_t;
  if constexpr (std::is_same_v<scalar_t, at::BFloat16> && std::is_same_v<acc_t, float>) {
    float* out = gs.data_ptr<float>();
    const int64_t ld = gs.stride(0);
    amx_gemm(len, go_lp.const_data_ptr<at::BFloat16>(), d.g.out_channels,
             d.weight_chunk_amx->operand, out, ld, /*accumulate=*/false);
    for (int64_t r = 0; r < len; ++r) round_to_data_precision<scalar_t>(out + r * ld, d.cc);
  } else {
    TORCH_INTERNAL_ASSERT(false, "the AMX micro-kernel serves bfloat16 data only");
  }
}

// Whether `go`, a tile's grad_out, was built for the low-precision engines: in the data's
// dtype, bfloat16/float16 (else it is in acc_t).
template <typename scalar_t>
bool built_for_low_precision(const at::Tensor& go) {
  return !std::is_same_v<scalar_t, at::opmath_type<scalar_t>> &&
         go.scalar_type() == c10::CppTypeToScalarType<scalar_t>::value;
}

// Whether the AMX micro-kernel takes the input gradient's low-precision GEMM on go_lp (a
// tile's grad_out in the data's dtype): the chunk's weight packed for it, go_lp dense.
template <typename scalar_t>
bool amx_takes_input_grad(const BackwardData<scalar_t>& d, const at::Tensor& go_lp) {
  return d.weight_chunk_amx && go_lp.is_contiguous();
}

// The input gradient's low-precision GEMM through at::mm, into g_lp in the data's dtype:
// [len, cc] = go_lp W[:, chunk] (pixel-major) or [cc, len] (channel-major). Pixel-major
// tiles read W[:, chunk] in place (row-major, rows C apart): on an AMD EPYC of family 25 a
// bfloat16 GEMM of 98 x 128 x 992 took 77 us on it and 78 us on the dense transposed copy,
// which itself took 145 us once per chunk (a last-block layer at batch 2 has one tile).
// Channel-major tiles read the copy, made once per chunk and shared by its tiles (their
// GEMMs ran 5-15% faster on it than on the strided view).
template <typename scalar_t>
void input_grad_mm(const BackwardData<scalar_t>& d, const at::Tensor& go_lp,
                   const at::Tensor& g_lp) {
  const bool pm = d.g.pixel_major;
  conv1x1_gemm(false, pm, pm ? d.weight_t_chunk_view : d.weight_t_chunk_lp.get(), go_lp, g_lp);
}

// The input gradient's GEMM of one tile, g = W^T grad_out into `gs` (acc_t, [len, cc]
// pixel-major, [cc, len] channel-major) with the fastest engine: float32 on `go` (the tile's
// grad_out in acc_t), or, for bfloat16/float16 data, on grad_out read in place in its dtype
// (g then holds that dtype's rounding, as torchvision's convolution gradient does).
template <typename scalar_t>
void input_grad_gemm(const BackwardData<scalar_t>& d, const at::Tensor& go, int64_t p0,
                     int64_t len, const at::Tensor& gs) {
  const bool pm = d.g.pixel_major;
  const int64_t co = d.g.out_channels;
  const auto dtype = c10::CppTypeToScalarType<scalar_t>::value;
  const bool low_precision_tile = built_for_low_precision<scalar_t>(go);
  at::Tensor go_lp;  // made once (see lowp_operand)
  const auto low_precision = [&] {
    lowp_operand(go_lp, [&] {
      return low_precision_tile ? go : grad_out_in_data_dtype(d, go, p0, len);
    });
    if (amx_takes_input_grad(d, go_lp)) {
      amx_input_grad(d, go_lp, len, gs);
      return;
    }
    const at::Tensor g_lp = at::empty(gs.sizes(), go_lp.options());
    input_grad_mm(d, go_lp, g_lp);
    gs.copy_(g_lp);
  };
  if (low_precision_tile) {
    low_precision();
    return;
  }
  run_fastest(GemmKind::kInputGrad, dtype, pm, d.cc * co * len, co, [&](Engine engine) {
    if (engine != Engine::kLowPrecision) {
      const bool onednn = engine == Engine::kOneDnn;
      // oneDNN's convolution takes the kernel dense.
      conv1x1_gemm(onednn, pm, onednn ? d.weight_t_chunk.get() : d.weight_t_chunk_for_mm(),
                   go, gs);
      return;
    }
    low_precision();
  });
}

// The input-gradient step of one pixel-major tile: the GEMM g = grad_out W into gs
// ([len, cc]), then per row the ReLU mask and the per-channel sums (mask_reduce_row), and
// with one pass the direct term k_g g added to grad_x right away. A tile built for the
// low-precision engine, in one pass and off the AMX micro-kernel, keeps g in the data's
// dtype, in gs's space, for mask_reduce_add_row.
template <typename scalar_t, typename acc_t, typename act_t>
void input_grad_rows(const BackwardData<scalar_t>& d, int64_t p0, int64_t len,
                     const at::Tensor& go, const act_t* act, acc_t* gs, acc_t* tile_sums,
                     double* sum_g, double* sum_gx) {
  const int64_t c0 = d.c0, cc = d.cc;
  // Per-tile sums in acc_t, vectorised across channels, then folded into doubles.
  acc_t* row_g = tile_sums;
  acc_t* row_gx = tile_sums + cc;
  std::fill(row_g, row_g + 2 * cc, acc_t(0));
  if (!d.two_pass && built_for_low_precision<scalar_t>(go) && !amx_takes_input_grad(d, go)) {
    auto* g_lp = reinterpret_cast<scalar_t*>(gs);
    input_grad_mm(d, go, matrix(g_lp, len, cc, cc));
    for (int64_t r = 0; r < len; ++r) {
      const int64_t off = (p0 + r) * d.g.total + c0;
      mask_reduce_add_row(act + r * cc, g_lp + r * cc, d.x + off, d.mean + c0, row_g, row_gx,
                          d.k_g.data() + c0, d.grad_x + off, cc);
    }
  } else {
    input_grad_gemm(d, go, p0, len, matrix(gs, len, cc, cc));
    for (int64_t r = 0; r < len; ++r) {
      const int64_t off = (p0 + r) * d.g.total + c0;
      mask_reduce_row(act + r * cc, gs + r * cc, d.x + off, d.mean + c0, row_g, row_gx, cc);
      if (!d.two_pass) add_scaled_row(gs + r * cc, d.k_g.data() + c0, d.grad_x + off, cc);
    }
  }
  for (int64_t c = 0; c < cc; ++c) {
    sum_g[c] += row_g[c];
    sum_gx[c] += row_gx[c];
  }
}

// The same for a channel-major tile: g = W^T grad_out into rows of gs ([cc, len], row
// stride `stride`), masked and reduced one channel at a time (mask_reduce_channel).
template <typename scalar_t, typename acc_t, typename act_t>
void input_grad_channels(const BackwardData<scalar_t>& d, int64_t p0, int64_t len,
                         const at::Tensor& go, const act_t* act, acc_t* gs, int64_t stride,
                         double* sum_g, double* sum_gx) {
  const int64_t c0 = d.c0, cc = d.cc;
  input_grad_gemm(d, go, p0, len, matrix(gs, cc, len, stride));
  for (int64_t c = 0; c < cc; ++c) {
    d.g.for_each_run(p0, len, [&](int64_t p, int64_t at, int64_t run) {
      const int64_t off = d.g.offset(p, c0 + c, d.g.total);
      acc_t* g_run = gs + c * stride + at;
      const auto [s, sx] =
          mask_reduce_channel(act + c * len + at, g_run, d.x + off, d.mean[c0 + c], run);
      sum_g[c] += s;
      sum_gx[c] += sx;
      if (!d.two_pass) add_scaled_channel(g_run, d.k_g[c0 + c], d.grad_x + off, run);
    });
  }
}

// Pass 1 over the chunk, tile by tile: recompute a, the weight-gradient GEMM into this
// thread's part of dweight_parts, then the input-gradient step, with g in the store (two
// passes) or in the thread's scratch.
template <typename scalar_t>
void backward_pass1(const BackwardData<scalar_t>& d, const BackwardScratch& layout,
                    const at::Tensor& scratch, const at::Tensor& dweight_parts, ChunkSums& sums) {
  using acc_t = typename BackwardData<scalar_t>::acc_t;
  const Geometry& g = d.g;
  sums.clear();
  // Whether each partial holds this chunk's columns yet: a thread's first tile writes them,
  // the next ones add to them, so no partial is zeroed first (at batch 2, zeroing and summing
  // [C_out, C] per thread cost as much as a transition's GEMMs). Separate bytes, one writer each.
  std::vector<uint8_t> written(dweight_parts.size(0), 0);
  for_each_item(g, [&](int64_t begin, int64_t end) {
    at::AutoDispatchBelowADInplaceOrView below_autograd;  // see forward_impl
    const int64_t tid = at::get_thread_num();
    acc_t* mine = scratch.template mutable_data_ptr<acc_t>() + tid * layout.per_thread;
    acc_t* act = mine + layout.act;
    // One partial where the calling thread takes every tile: its number need not be 0 (a
    // worker of an enclosing parallel region).
    const int64_t part = dweight_parts.size(0) == 1 ? 0 : tid;
    const at::Tensor dw = dweight_parts[part].narrow(1, d.c0, d.cc);
    // The weight gradient's tile result before it is added (bfloat16/float16 data only).
    const at::Tensor tile = std::is_same_v<scalar_t, acc_t>
                                ? at::Tensor()
                                : at::empty({g.out_channels, d.cc}, d.scale_t.options());
    double* sum_g = sums.sum_g(tid);
    double* sum_gx = sums.sum_gx(tid);
    at::BFloat16* amx_space = d.amx ? d.amx_thread_space(tid) : nullptr;
    // The input-gradient step of a tile whose activation is `a` (acc_t or the data's dtype).
    const auto input_grad = [&](int64_t p0, int64_t len, const at::Tensor& go, const auto* a) {
      if (g.pixel_major) {
        acc_t* gs = d.two_pass ? d.store + p0 * d.cc : mine + layout.tile_g;
        input_grad_rows(d, p0, len, go, a, gs, mine + layout.tile_sums, sum_g, sum_gx);
      } else {
        // Rows of the store (row stride = pixels) or of the tile scratch.
        acc_t* gs = d.two_pass ? d.store + p0 : mine + layout.tile_g;
        const int64_t stride = d.two_pass ? g.pixels : len;
        input_grad_channels(d, p0, len, go, a, gs, stride, sum_g, sum_gx);
      }
    };
    for (int64_t item = begin; item < end; ++item) {
      const auto [p0, len] = g.span(item);
      const bool accumulate = std::exchange(written[part], uint8_t{1});
      if (d.low_precision_tile(len)) {
        // Both GEMMs settled on the low-precision engine: the activation and grad_out are
        // built in the data's dtype (grad_out read in place where it can be).
        auto* act_lp = reinterpret_cast<scalar_t*>(act);
        bn_relu_tile<scalar_t, acc_t, scalar_t>(g, d.x, d.scale, d.shift, p0, len, d.c0, d.cc,
                                                act_lp);
        const at::Tensor go = grad_out_tile<scalar_t, scalar_t>(
            g, d.grad_out, p0, len, reinterpret_cast<scalar_t*>(mine + layout.grad_out));
        weight_grad_tile<scalar_t, acc_t>(d, dw, go, act_lp, p0, len, tile, amx_space,
                                          accumulate);
        input_grad(p0, len, go, act_lp);
        continue;
      }
      bn_relu_tile<scalar_t, acc_t>(g, d.x, d.scale, d.shift, p0, len, d.c0, d.cc, act);
      const at::Tensor go =
          grad_out_tile<scalar_t, acc_t>(g, d.grad_out, p0, len, mine + layout.grad_out);
      weight_grad_tile<scalar_t, acc_t>(d, dw, go, act, p0, len, tile, amx_space,
                                        accumulate);
      input_grad(p0, len, go, act);
    }
  });
  // A thread that took no tile of the chunk leaves its partial's columns to be zeroed.
  for (int64_t part = 0; part < dweight_parts.size(0); ++part) {
    if (!written[part]) dweight_parts[part].narrow(1, d.c0, d.cc).zero_();
  }
}

// After pass 1: the chunk's BN gradients dbias = sum(g) and dweight = invstd sum(g (x - mean))
// and its statistics-term coefficients k_x, k_0 (mirrors
// densenet_fast.ops.batchnorm.StatsGradient.add with count = N*H*W).
template <typename scalar_t>
void finish_chunk_sums(BackwardData<scalar_t>& d, const ChunkSums& sums, double* dgamma,
                       double* dbeta) {
  using acc_t = typename BackwardData<scalar_t>::acc_t;
  const double count = static_cast<double>(d.g.pixels);
  for (int64_t c = d.c0; c < d.c0 + d.cc; ++c) {
    const auto [sg, sgx] = sums.total(c - d.c0);
    const double iv = d.invstd[c], gm = d.gamma[c], dg = sgx * iv;
    dbeta[c] = sg;
    dgamma[c] = dg;
    d.k_x[c] = static_cast<acc_t>(-gm * iv * iv * dg / count);
    d.k_0[c] = static_cast<acc_t>(gm * iv * (d.mean[c] * iv * dg - sg) / count);
  }
}

// Pass 2 over the chunk (two passes): adds dx = k_g g + k_x x + k_0, g from the store, into
// the gradient buffer (the direct term and StatsGradient.apply's, in one pass).
template <typename scalar_t>
void add_stored_dx(const BackwardData<scalar_t>& d) {
  const Geometry& g = d.g;
  const int64_t c0 = d.c0, cc = d.cc;
  for_each_item(g, [&](int64_t begin, int64_t end) {
    for (int64_t item = begin; item < end; ++item) {
      const auto [p0, len] = g.span(item);
      if (g.pixel_major) {
        for (int64_t r = 0; r < len; ++r) {
          const int64_t off = (p0 + r) * g.total + c0;
          add_dx_row(d.store + (p0 + r) * cc, d.x + off, d.k_g.data() + c0, d.k_x.data() + c0,
                     d.k_0.data() + c0, d.grad_x + off, cc);
        }
      } else {
        for (int64_t c = 0; c < cc; ++c) {
          g.for_each_run(p0, len, [&](int64_t p, int64_t, int64_t run) {
            const int64_t off = g.offset(p, c0 + c, g.total);
            add_dx_channel(d.store + c * g.pixels + p, d.x + off, d.k_g[c0 + c],
                           d.k_x[c0 + c], d.k_0[c0 + c], d.grad_x + off, run);
          });
        }
      }
    }
  });
}

template <typename scalar_t>
std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_impl(
    const at::Tensor& grad_out, const at::Tensor& buffer, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& conv_weight, bool stats_grad, const at::Tensor& grad_buffer) {
  const int64_t channels = conv_weight.size(1), co = conv_weight.size(0);
  const Geometry g(buffer, channels, co, std::max(channels, co), /*whole_images=*/true);
  BackwardData<scalar_t> d(g, stats_grad, grad_out, buffer, mean, invstd, bn_weight, bn_bias,
                           conv_weight, grad_buffer);
  // With stats_grad, dx needs sums over every pixel first: g is kept in a chunk-sized store
  // between two passes. Without it, dx = k_g * g is added as soon as a tile's g is known.
  const int64_t threads = at::get_num_threads();
  int64_t chunk =
      d.two_pass ? std::max<int64_t>(1, std::min(channels, kChunkElements / g.pixels))
                 : channels;
  // Chunks of a multiple of 16 channels, the width the AMX micro-kernel's operands come in.
  if (chunk < channels && chunk > 16) chunk = chunk / 16 * 16;
  const BackwardScratch layout(g, chunk, d.two_pass);
  const auto options = d.scale_t.options();
  at::Tensor scratch = at::empty({threads, layout.per_thread}, options);
  // Weight-gradient partial sums, one per thread that takes tiles: for_each_item shares
  // them out only when there are enough; else the calling thread takes every tile, and its
  // one partial is the gradient (a layer of a few pixels paid more for summing and zeroing
  // per-thread partials of [C_out, C] than for its GEMMs).
  const int64_t parts = g.shared ? threads : 1;
  at::Tensor dweight_parts = at::empty({parts, co, channels}, options);  // see backward_pass1
  at::Tensor g_store = at::empty({d.two_pass ? chunk * g.pixels : 0}, options);
  d.store = g_store.template mutable_data_ptr<typename BackwardData<scalar_t>::acc_t>();
  d.amx = g.pixel_major && amx_available(buffer.scalar_type());
  if (d.amx) {
    d.amx_space = at::empty({threads, g.tile * (co + chunk)}, buffer.options());
  }
  ChunkSums sums(threads, chunk);
  at::Tensor dgamma = at::empty({channels}, at::kDouble), dbeta = at::empty({channels}, at::kDouble);

  for (int64_t c0 = 0; c0 < channels; c0 += chunk) {
    d.select_chunk(c0, std::min(chunk, channels - c0));
    backward_pass1(d, layout, scratch, dweight_parts, sums);
    finish_chunk_sums(d, sums, dgamma.data_ptr<double>(), dbeta.data_ptr<double>());
    if (d.two_pass) add_stored_dx(d);
  }
  const at::Tensor dweight = parts == 1 ? dweight_parts.select(0, 0) : dweight_parts.sum(0);
  at::Tensor grad_weight = dweight.reshape(conv_weight.sizes()).to(conv_weight.scalar_type());
  return {grad_weight, dgamma.to(bn_weight.scalar_type()), dbeta.to(bn_bias.scalar_type())};
}

at::Tensor forward_cpu(const at::Tensor& buffer_in, const at::Tensor& mean,
                       const at::Tensor& invstd, const at::Tensor& bn_weight,
                       const at::Tensor& bn_bias, const at::Tensor& conv_weight) {
  check_forward_args(buffer_in, mean, invstd, bn_weight, bn_bias, conv_weight);
  const at::Tensor buffer = dense_buffer(buffer_in);
  const ConvolutionPrecisionForGemms precision(buffer.scalar_type());
  return AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, buffer.scalar_type(), "bn_relu_conv1x1",
                                        [&] {
    return forward_impl<scalar_t>(buffer, mean, invstd, bn_weight, bn_bias, conv_weight);
  });
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> backward_cpu(
    const at::Tensor& grad_out_in, const at::Tensor& buffer_in, const at::Tensor& mean,
    const at::Tensor& invstd, const at::Tensor& bn_weight, const at::Tensor& bn_bias,
    const at::Tensor& conv_weight, bool stats_grad, at::Tensor& grad_buffer) {
  check_forward_args(buffer_in, mean, invstd, bn_weight, bn_bias, conv_weight);
  const int64_t channels = conv_weight.size(1);
  TORCH_CHECK_VALUE(grad_out_in.dim() == 4 && grad_out_in.size(0) == buffer_in.size(0) &&
                  grad_out_in.size(1) == conv_weight.size(0) &&
                  grad_out_in.size(2) == buffer_in.size(2) &&
                  grad_out_in.size(3) == buffer_in.size(3),
              "grad_out must have shape [", buffer_in.size(0), ", ", conv_weight.size(0), ", ",
              buffer_in.size(2), ", ", buffer_in.size(3), "], got ", grad_out_in.sizes());
  TORCH_CHECK_TYPE(grad_out_in.scalar_type() == buffer_in.scalar_type(), "grad_out dtype ",
              grad_out_in.scalar_type(), " differs from buffer dtype ", buffer_in.scalar_type());
  TORCH_CHECK_VALUE(grad_buffer.dim() == 4 && grad_buffer.size(0) == buffer_in.size(0) &&
                  grad_buffer.size(1) >= channels && grad_buffer.size(2) == buffer_in.size(2) &&
                  grad_buffer.size(3) == buffer_in.size(3),
              "grad_buffer must have shape [N, >=", channels, ", H, W] matching buffer ",
              buffer_in.sizes(), ", got ", grad_buffer.sizes());
  TORCH_CHECK_TYPE(grad_buffer.scalar_type() == buffer_in.scalar_type(), "grad_buffer dtype ",
              grad_buffer.scalar_type(), " differs from buffer dtype ", buffer_in.scalar_type());
  TORCH_CHECK(grad_out_in.device() == buffer_in.device() &&
                  grad_buffer.device() == buffer_in.device(),
              "grad_out and grad_buffer must be on the buffer's device ", buffer_in.device());
  check_writable(grad_buffer, "grad_buffer");
  const at::Tensor buffer = dense_buffer(buffer_in);
  const at::Tensor grad_out = like_buffer(grad_out_in, buffer);
  // dx is added in the buffer's layout; a gradient buffer of another layout gets it through
  // a temporary of the prefix's channels.
  const bool same_layout = grad_buffer.strides() == buffer.strides() &&
                           grad_buffer.sizes() == buffer.sizes();
  at::Tensor target = same_layout ? grad_buffer : at::zeros_like(buffer);
  const ConvolutionPrecisionForGemms precision(buffer.scalar_type());
  auto result = AT_DISPATCH_FLOATING_TYPES_AND2(
      at::kBFloat16, at::kHalf, buffer.scalar_type(), "bn_relu_conv1x1_backward", [&] {
        return backward_impl<scalar_t>(grad_out, buffer, mean, invstd, bn_weight, bn_bias,
                                       conv_weight, stats_grad, target);
      });
  if (!same_layout) grad_buffer.narrow(1, 0, channels).add_(target.narrow(1, 0, channels));
  return result;
}

// The CPU GEMM engine: sets the policy ("measure", "blas", "onednn" or "lowp"; "" keeps it) and
// returns the previous one followed by the choices measured so far, one line each.
std::vector<std::string> cpu_gemm_engine(const std::string& policy) {
  const int current = engine_policy.load();
  std::vector<std::string> report{current == kMeasure ? "measure" : kEngineNames[current - 1]};
  if (!policy.empty()) {
    const auto found = std::find(std::begin(kEngineNames), std::end(kEngineNames), policy);
    TORCH_CHECK_VALUE(policy == "measure" || found != std::end(kEngineNames),
                      "policy must be 'measure', 'blas', 'onednn' or 'lowp', got '", policy,
                      "'");
    engine_policy.store(policy == "measure" ? kMeasure
                                            : 1 + static_cast<int>(found - std::begin(kEngineNames)));
  }
  std::lock_guard<std::mutex> lock(engines_mutex());
  for (const auto& [key, engine] : chosen_engines()) {
    report.push_back(std::string(c10::toString(static_cast<at::ScalarType>(key.dtype))) +
                     ", " + (key.pixel_major ? "pixel-major" : "channel-major") + ", " +
                     kGemmKindNames[key.kind] + ", oneDNN " + (key.onednn ? "on" : "off") +
                     ", " +
                     std::to_string(key.threads) + " thread(s), 2^" +
                     std::to_string(key.log2_macs) + " multiply-adds, reduction 2^" +
                     std::to_string(key.log2_inner) + ": " +
                     kEngineNames[static_cast<int>(engine)]);
  }
  return report;
}

// The measured choices as records of kEngineRecord integers (EngineKey's fields in order,
// then the engine), after adding those of `known` whose key has no choice yet: what an
// earlier process measured on this machine (densenet_fast/cpu_engine_cache.py), so that
// every process runs the GEMMs with the same engines and rounds them alike.
constexpr int64_t kEngineRecord = 8;
std::vector<int64_t> cpu_gemm_engine_choices(const std::vector<int64_t>& known) {
  TORCH_CHECK_VALUE(known.size() % kEngineRecord == 0, "engine records come in groups of ",
                    kEngineRecord, " integers, got ", known.size());
  std::vector<std::pair<EngineKey, Engine>> records;
  for (size_t i = 0; i < known.size(); i += kEngineRecord) {
    const int64_t* r = known.data() + i;
    // oneDNN cannot have been measured fastest while it was disabled.
    TORCH_CHECK_VALUE(r[0] >= 0 && r[0] < 3 && r[7] >= 0 && r[7] < kEngines && r[4] > 0 &&
                          (r[2] == 0 || r[2] == 1) && (r[3] == 0 || r[3] == 1) &&
                          (r[3] == 1 || r[7] != static_cast<int64_t>(Engine::kOneDnn)) &&
                          r[1] >= 0 && r[1] < static_cast<int64_t>(at::ScalarType::NumOptions),
                      "not an engine record: (", r[0], ", ", r[1], ", ", r[2], ", ", r[3], ", ",
                      r[4], ", ", r[5], ", ", r[6], ", ", r[7], ")");
    records.push_back({EngineKey{static_cast<int>(r[0]), static_cast<int>(r[1]), r[2] == 1,
                                 r[3] == 1, r[4], r[5], r[6]},
                       static_cast<Engine>(r[7])});
  }
  std::lock_guard<std::mutex> lock(engines_mutex());
  for (const auto& [key, engine] : records) chosen_engines().emplace(key, engine);
  std::vector<int64_t> out;
  for (const auto& [key, engine] : chosen_engines()) {
    out.insert(out.end(), {key.kind, key.dtype, key.pixel_major ? 1 : 0, key.onednn ? 1 : 0,
                           key.threads, key.log2_macs, key.log2_inner,
                           static_cast<int64_t>(engine)});
  }
  return out;
}

// Whether the low-precision engine runs bfloat16 pixel-major tiles through the AMX
// micro-kernel here (amx_gemm.h), where their operands fit it.
bool cpu_amx_gemm() { return amx_available(at::kBFloat16); }

}  // namespace

// Settings and facts of these kernels alone, not ops of the model: declared here, beside them.
TORCH_LIBRARY_FRAGMENT(densenet_fast, m) {
  m.def("cpu_gemm_engine(str policy) -> str[]", &cpu_gemm_engine);
  m.def("cpu_gemm_engine_choices(int[] known) -> int[]", &cpu_gemm_engine_choices);
  m.def("cpu_amx_gemm() -> bool", &cpu_amx_gemm);
}

TORCH_LIBRARY_IMPL(densenet_fast, CPU, m) {
  m.impl("bn_relu_conv1x1", &forward_cpu);
  m.impl("bn_relu_conv1x1_backward", &backward_cpu);
}

}  // namespace densenet_fast
