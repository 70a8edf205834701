"""Triton kernels of the fused BN-ReLU-Conv1x1 op (launchers: ``triton_impl.py``).

The prefix is addressed as a matrix ``x[p, c]`` over pixels ``p = n * HW + hw`` and
channels ``c``, with the strides of the buffer: ``n * s_n + c * s_c + hw * s_hw``. In a
channels-last buffer ``s_c == 1``, so each pixel's channels are contiguous: the prefix is a
plain ``[N*H*W, C]`` matrix with leading dimension ``C_total``, and the K-dimension loads of
the forward and input-gradient GEMMs are coalesced. That is the layout to give the block on
a GPU (``model.to(memory_format=torch.channels_last)``, channels-last input); NCHW buffers
work through the same strides, with pixel-contiguous loads.

All accumulation is float32; activations enter ``tl.dot`` in the data's dtype (bf16/fp16,
or fp32 with the precision torch uses for convolutions).
"""

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, PRECISION: tl.constexpr, UPCAST: tl.constexpr):
    # UPCAST: Triton's interpreter computes tl.dot of bf16/fp16 operands wrongly; their
    # products are exact in float32, so upcasting gives the GPU's result (up to summation order).
    if UPCAST:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=PRECISION)


@triton.jit
def _pixel_offsets(pixels, HW, s_n, s_hw):
    # Pixel p = n * HW + hw sits at n * s_n + hw * s_hw (64-bit: buffers exceed 2^31 elements).
    return (pixels // HW).to(tl.int64) * s_n + (pixels % HW).to(tl.int64) * s_hw


@triton.jit
def _bn_relu(x, scale, shift):
    return tl.maximum(x * scale[None, :] + shift[None, :], 0.0)


@triton.jit
def forward_kernel(
    x_ptr, w_ptr, scale_ptr, shift_ptr, out_ptr,
    P, C, CO, HW,
    sx_n, sx_c, sx_hw, sw_o, sw_c, so_n, so_c, so_hw,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[p, o] = sum_c relu(x[p, c] * scale[c] + shift[c]) * w[o, c]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < P
    mask_n = offs_n < CO
    x_rows = _pixel_offsets(offs_m, HW, sx_n, sx_hw)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < C
        x = tl.load(x_ptr + x_rows[:, None] + offs_k[None, :] * sx_c,
                    mask=mask_m[:, None] & mask_k[None, :], other=0.0).to(tl.float32)
        scale = tl.load(scale_ptr + offs_k, mask=mask_k, other=0.0)
        shift = tl.load(shift_ptr + offs_k, mask=mask_k, other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * sw_o + offs_k[:, None] * sw_c,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        a = _bn_relu(x, scale, shift).to(w.dtype)
        acc += _dot(a, w, PRECISION, UPCAST)
    out_rows = _pixel_offsets(offs_m, HW, so_n, so_hw)
    tl.store(out_ptr + out_rows[:, None] + offs_n[None, :] * so_c,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def input_grad_kernel(
    go_ptr, w_ptr, x_ptr, scale_ptr, shift_ptr, mean_ptr, kg_ptr, gbuf_ptr, gstore_ptr,
    partial_ptr,
    P, C, CO, HW,
    sg_n, sg_c, sg_hw, sw_o, sw_c, sx_n, sx_c, sx_hw, sb_n, sb_c, sb_hw,
    STORE_G: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g[p, c] = (sum_o grad_out[p, o] w[o, c]) * [a[p, c] > 0], with per-block partial sums
    of g and g * (x - mean) per channel; then either grad_buffer += kg * g (the direct term)
    or g is stored for a second pass (``STORE_G``)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < P
    mask_n = offs_n < C
    g_rows = _pixel_offsets(offs_m, HW, sg_n, sg_hw)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CO, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < CO
        go = tl.load(go_ptr + g_rows[:, None] + offs_k[None, :] * sg_c,
                     mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_k[:, None] * sw_o + offs_n[None, :] * sw_c,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0)
        acc += _dot(go, w, PRECISION, UPCAST)
    mask = mask_m[:, None] & mask_n[None, :]
    x_rows = _pixel_offsets(offs_m, HW, sx_n, sx_hw)
    x = tl.load(x_ptr + x_rows[:, None] + offs_n[None, :] * sx_c, mask=mask,
                other=0.0).to(tl.float32)
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    shift = tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0)
    mean = tl.load(mean_ptr + offs_n, mask=mask_n, other=0.0)
    keep = (x * scale[None, :] + shift[None, :] > 0.0) & mask
    g = tl.where(keep, acc, 0.0)
    tl.store(partial_ptr + pid_m * 2 * C + offs_n, tl.sum(g, axis=0), mask=mask_n)
    tl.store(partial_ptr + pid_m * 2 * C + C + offs_n,
             tl.sum(g * (x - mean[None, :]), axis=0), mask=mask_n)
    if STORE_G:
        tl.store(gstore_ptr + offs_m.to(tl.int64)[:, None] * C + offs_n[None, :], g, mask=mask)
    else:
        kg = tl.load(kg_ptr + offs_n, mask=mask_n, other=0.0)
        b_rows = _pixel_offsets(offs_m, HW, sb_n, sb_hw)
        b_ptrs = gbuf_ptr + b_rows[:, None] + offs_n[None, :] * sb_c
        old = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(b_ptrs, (old + kg[None, :] * g).to(gbuf_ptr.dtype.element_ty), mask=mask)


@triton.jit
def weight_grad_kernel(
    go_ptr, x_ptr, scale_ptr, shift_ptr, partial_ptr,
    P, C, CO, HW, PIXELS_PER_SPLIT,
    sg_n, sg_c, sg_hw, sx_n, sx_c, sx_hw,
    PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[s, o, c] = sum over split s's pixels of grad_out[p, o] * a[p, c]."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_s = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < CO
    mask_n = offs_n < C
    scale = tl.load(scale_ptr + offs_n, mask=mask_n, other=0.0)
    shift = tl.load(shift_ptr + offs_n, mask=mask_n, other=0.0)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = pid_s * PIXELS_PER_SPLIT
    stop = tl.minimum(start + PIXELS_PER_SPLIT, P)
    for p0 in range(start, stop, BLOCK_K):
        offs_k = p0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < stop
        go_t = tl.load(go_ptr + _pixel_offsets(offs_k, HW, sg_n, sg_hw)[None, :]
                       + offs_m[:, None] * sg_c,
                       mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        x_rows = _pixel_offsets(offs_k, HW, sx_n, sx_hw)
        x = tl.load(x_ptr + x_rows[:, None] + offs_n[None, :] * sx_c,
                    mask=mask_k[:, None] & mask_n[None, :], other=0.0).to(tl.float32)
        a = tl.where(mask_k[:, None], _bn_relu(x, scale, shift), 0.0).to(go_t.dtype)
        acc += _dot(go_t, a, PRECISION, UPCAST)
    tl.store(partial_ptr + pid_s.to(tl.int64) * CO * C + offs_m[:, None] * C + offs_n[None, :],
             acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def add_dx_kernel(
    gstore_ptr, x_ptr, kg_ptr, kx_ptr, k0_ptr, gbuf_ptr,
    P, C, HW,
    sx_n, sx_c, sx_hw, sb_n, sb_c, sb_hw,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grad_buffer[p, c] += kg[c] * g[p, c] + kx[c] * x[p, c] + k0[c]."""
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < C
    mask = (offs_m < P)[:, None] & mask_n[None, :]
    g = tl.load(gstore_ptr + offs_m.to(tl.int64)[:, None] * C + offs_n[None, :], mask=mask,
                other=0.0)
    x_rows = _pixel_offsets(offs_m, HW, sx_n, sx_hw)
    x = tl.load(x_ptr + x_rows[:, None] + offs_n[None, :] * sx_c, mask=mask,
                other=0.0).to(tl.float32)
    kg = tl.load(kg_ptr + offs_n, mask=mask_n, other=0.0)
    kx = tl.load(kx_ptr + offs_n, mask=mask_n, other=0.0)
    k0 = tl.load(k0_ptr + offs_n, mask=mask_n, other=0.0)
    b_rows = _pixel_offsets(offs_m, HW, sb_n, sb_hw)
    b_ptrs = gbuf_ptr + b_rows[:, None] + offs_n[None, :] * sb_c
    old = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    dx = kg[None, :] * g + kx[None, :] * x + k0[None, :]
    tl.store(b_ptrs, (old + dx).to(gbuf_ptr.dtype.element_ty), mask=mask)
