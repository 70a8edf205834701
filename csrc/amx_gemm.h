// GEMMs of one pixel tile in bfloat16 with float32 results through oneDNN's brgemm
// micro-kernel (ATen's at::native::cpublas wrapper), for CPUs with AMX.
//
// Why not at::mm: a tile's GEMM is small (a few hundred pixels by 128-1024 channels, tens of
// microseconds of AMX work), and at::mm in bfloat16 pays about 35 us per call to set up its
// oneDNN matmul, as much as the arithmetic. The micro-kernel is generated once per shape and
// thread, then called directly: on an Intel Xeon with AMX (family 6, model 167) a
// [512, 256] x [256, 128] tile took 21 us against at::mm's 55-60 us.
//
// The micro-kernel wants B ([K, N]) in its packed layout: N in blocks of 64 columns (a last
// block of 16, 32 or 48), and in each block pairs of consecutive K rows interleaved (VNNI),
// so K must be even and N a multiple of 16. Operands that do not fit take the caller's
// other path. A (row-major [M, K]) and C (float32 [M, N]) are read and written in place.
//
// The AMX tile configuration is per thread and shared with every other AMX kernel (oneDNN's
// convolutions and matmuls): each amx_gemm releases it when done, so that the next kernel
// of anyone configures its own.

#pragma once

#include <ATen/ATen.h>
#include <ATen/native/CPUBlas.h>

#if defined(__AVX512F__) && defined(__AVX512BW__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cstdint>

namespace densenet_fast {
namespace {

// Columns of B per packed block (the micro-kernel's ldb); the last block may be narrower.
constexpr int64_t kAmxBlock = 64;
// Rows of A per micro-kernel call: A's rows and C's stay in a core's L2 between the blocks
// of B (whole 4096-row tiles ran at half the rate).
constexpr int64_t kAmxRows = 256;

// Whether tile GEMMs of `dtype` data run through the micro-kernel here: bfloat16 on a CPU
// with AMX, oneDNN enabled. float16 (AMX-FP16) would take the same code but is not enabled:
// no machine of ours has had it to test it on.
inline bool amx_available(at::ScalarType dtype) {
  return dtype == at::kBFloat16 && at::native::cpublas::could_pack(dtype);
}

// Whether a GEMM with reduction length k and n columns fits the packed layout of B.
inline bool amx_fits(int64_t k, int64_t n) { return k > 0 && n > 0 && k % 2 == 0 && n % 16 == 0; }

// B [k, n] in the micro-kernel's packed layout (k * n elements at `data`).
struct AmxOperand {
  int64_t k = 0, n = 0;
  const at::BFloat16* data = nullptr;

  int64_t blocks() const { return (n + kAmxBlock - 1) / kAmxBlock; }
  int64_t width(int64_t j) const { return std::min(kAmxBlock, n - j * kAmxBlock); }
  const at::BFloat16* block(int64_t j) const { return data + j * kAmxBlock * k; }
};

// Packs src ([k, n], row stride ld) into dst (k * n elements); amx_fits(k, n) must hold.
inline AmxOperand amx_pack(const at::BFloat16* src, int64_t k, int64_t n, int64_t ld,
                           at::BFloat16* dst) {
  const AmxOperand b{k, n, dst};
  for (int64_t j = 0; j < b.blocks(); ++j) {
    at::native::cpublas::pack(k, b.width(j), ld, b.width(j), at::kBFloat16, at::kBFloat16,
                              src + j * kAmxBlock, dst + j * kAmxBlock * k);
  }
  return b;
}

// A packed operand that owns its storage (a weight, packed once per call of the op).
struct OwnedAmxOperand {
  at::Tensor storage;
  AmxOperand operand;
};

// Packs the [k, n] matrix `b` (any strides; bfloat16) into storage of its own.
inline OwnedAmxOperand amx_pack_owned(const at::Tensor& b) {
  const at::Tensor dense = b.contiguous();
  const int64_t k = dense.size(0), n = dense.size(1);
  at::Tensor storage = at::empty({k * n}, dense.options());
  const AmxOperand operand = amx_pack(dense.const_data_ptr<at::BFloat16>(), k, n, n,
                                      storage.mutable_data_ptr<at::BFloat16>());
  return {storage, operand};
}

// c [m, b.n] (row stride ldc) = a [m, b.k] (row stride lda) @ b, or += with `accumulate`.
inline void amx_gemm(int64_t m, const at::BFloat16* a, int64_t lda, const AmxOperand& b,
                     float* c, int64_t ldc, bool accumulate) {
  for (int64_t m0 = 0; m0 < m; m0 += kAmxRows) {
    const int64_t rows = std::min(kAmxRows, m - m0);
    for (int64_t j = 0; j < b.blocks(); ++j) {
      at::native::cpublas::brgemm(rows, b.width(j), b.k, lda, b.width(j), ldc, accumulate,
                                  a + m0 * lda, b.block(j), c + m0 * ldc + j * kAmxBlock);
    }
  }
  at::native::cpublas::brgemm_release();
}

#if defined(__AVX512F__) && defined(__AVX512BW__)
// GCC 12 warns that these intrinsics read an uninitialised vector: their masked builtins take
// an undefined pass-through operand, with an all-ones mask that never reads it.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wuninitialized"
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

// Transposes 16 vectors of 16 32-bit elements in registers: r[i][j] becomes r[j][i].
inline void transpose_16x16_epi32(__m512i r[16]) {
  __m512i t[16];
  for (int i = 0; i < 16; i += 2) {
    t[i] = _mm512_unpacklo_epi32(r[i], r[i + 1]);
    t[i + 1] = _mm512_unpackhi_epi32(r[i], r[i + 1]);
  }
  for (int i = 0; i < 16; i += 4) {
    r[i] = _mm512_unpacklo_epi64(t[i], t[i + 2]);
    r[i + 1] = _mm512_unpackhi_epi64(t[i], t[i + 2]);
    r[i + 2] = _mm512_unpacklo_epi64(t[i + 1], t[i + 3]);
    r[i + 3] = _mm512_unpackhi_epi64(t[i + 1], t[i + 3]);
  }
  for (int i = 0; i < 16; i += 8) {
    for (int j = 0; j < 4; ++j) {
      t[i + j] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0x88);
      t[i + j + 4] = _mm512_shuffle_i32x4(r[i + j], r[i + j + 4], 0xdd);
    }
  }
  for (int j = 0; j < 8; ++j) {
    r[j] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0x88);
    r[j + 8] = _mm512_shuffle_i32x4(t[j], t[j + 8], 0xdd);
  }
}

// dst[c][r] = src[r][c] for a block of 32 rows by 16 columns of 16-bit elements: row pairs
// are interleaved into 32-bit elements, whose 16x16 transpose leaves each column's 32 rows
// in order.
inline void transpose_32x16(const uint16_t* src, int64_t ld_src, uint16_t* dst,
                            int64_t ld_dst) {
  __m512i v[16];
  for (int p = 0; p < 16; ++p) {
    const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + 2 * p * ld_src));
    const __m256i b =
        _mm256_loadu_si256(reinterpret_cast<const __m256i*>(src + (2 * p + 1) * ld_src));
    // Per 128-bit lane: lo holds columns 0-3 (8-11), hi columns 4-7 (12-15).
    const __m256i lo = _mm256_unpacklo_epi16(a, b), hi = _mm256_unpackhi_epi16(a, b);
    const __m256i first = _mm256_permute2x128_si256(lo, hi, 0x20);
    const __m256i second = _mm256_permute2x128_si256(lo, hi, 0x31);
    v[p] = _mm512_inserti64x4(_mm512_castsi256_si512(first), second, 1);
  }
  transpose_16x16_epi32(v);
  for (int c = 0; c < 16; ++c) {
    _mm512_storeu_si512(reinterpret_cast<void*>(dst + c * ld_dst), v[c]);
  }
}
#pragma GCC diagnostic pop
#endif

// dst [cols, rows] (row stride ld_dst) = src [rows, cols] (row stride ld_src) transposed:
// the weight gradient's A operand, grad_out^T, from a pixel-major tile of grad_out.
inline void transpose_tile(const at::BFloat16* src_data, int64_t rows, int64_t cols,
                           int64_t ld_src, at::BFloat16* dst_data, int64_t ld_dst) {
  const auto* src = reinterpret_cast<const uint16_t*>(src_data);
  auto* dst = reinterpret_cast<uint16_t*>(dst_data);
  int64_t full_rows = 0, full_cols = 0;
#if defined(__AVX512F__) && defined(__AVX512BW__)
  full_rows = rows / 32 * 32;
  full_cols = cols / 16 * 16;
  for (int64_t r = 0; r < full_rows; r += 32) {
    for (int64_t c = 0; c < full_cols; c += 16) {
      transpose_32x16(src + r * ld_src + c, ld_src, dst + c * ld_dst + r, ld_dst);
    }
  }
#endif
  // What the blocks leave: the last columns of every row, then the last rows.
  for (int64_t r = 0; r < full_rows; ++r) {
    for (int64_t c = full_cols; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
  for (int64_t r = full_rows; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) dst[c * ld_dst + r] = src[r * ld_src + c];
  }
}

// Packs the transpose of `w` ([n, k], bfloat16) as B [k, n] into storage of its own: the
// forward's W^T, transposed by transpose_tile (ATen's transposing copy is ~10x slower).
inline OwnedAmxOperand amx_pack_transposed_owned(const at::Tensor& w) {
  const at::Tensor dense = w.contiguous();
  const int64_t n = dense.size(0), k = dense.size(1);
  at::Tensor transposed = at::empty({k, n}, dense.options());
  transpose_tile(dense.const_data_ptr<at::BFloat16>(), n, k, k,
                 transposed.mutable_data_ptr<at::BFloat16>(), n);
  return amx_pack_owned(transposed);
}

}  // namespace
}  // namespace densenet_fast
