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

Pixels are walked in tiles of ``BLOCK`` consecutive pixels. With ``FLAT`` (the launcher
decides from the strides) every tensor's pixel ``p`` sits at ``p * s_hw``, as in channels-last
tensors, and no division is needed; otherwise each pixel's image and place in it come from
``p // HW`` and ``p % HW``. Where ``HW`` is a multiple of 16, Triton specialises on it and
proves the NCHW loads contiguous all the same (``benchmarks/ptx_check.py`` reads the PTX).

NaN follows torch: ReLU keeps it (``PropagateNan.ALL``; the default drops it on a GPU) and
the mask ``not (y <= 0)`` of ``threshold_backward`` lets the gradient through where ``y`` is NaN.
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
def _pixel_tile(t, P, HW, BLOCK: tl.constexpr, FLAT: tl.constexpr):
    """Tile ``t``'s ``BLOCK`` pixels as ``(image, hw, pixel, mask)``: with ``FLAT`` the image
    is unused and ``hw`` is the pixel index itself."""
    pixel = t * BLOCK + tl.arange(0, BLOCK)
    if FLAT:
        image = 0
        hw = pixel
    else:
        image = pixel // HW
        hw = pixel % HW
    return image, hw, pixel, pixel < P


@triton.jit
def _pixel_offsets(image, hw, s_n, s_hw, FLAT: tl.constexpr):
    """Element offsets of ``_pixel_tile``'s pixels in a tensor with image and pixel strides
    ``s_n``, ``s_hw`` (64-bit: buffers exceed 2^31 elements)."""
    if FLAT:  # noqa: SIM108 (a statement: Triton compiles only the branch a constexpr takes)
        offsets = hw.to(tl.int64) * s_hw
    else:
        offsets = image.to(tl.int64) * s_n + hw.to(tl.int64) * s_hw
    return offsets


@triton.jit
def _block(start, stop, BLOCK: tl.constexpr):
    """Indices ``start + [0, BLOCK)`` and the mask of those below ``stop``."""
    offs = start + tl.arange(0, BLOCK)
    return offs, offs < stop


@triton.jit
def _tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Rows and columns of this program's ``[BLOCK_M, BLOCK_N]`` tile of an ``[M, N]`` result,
    with their masks: ``(offs_m, offs_n, mask_m, mask_n)``."""
    offs_m, mask_m = _block(tl.program_id(0) * BLOCK_M, M, BLOCK_M)
    offs_n, mask_n = _block(tl.program_id(1) * BLOCK_N, N, BLOCK_N)
    return offs_m, offs_n, mask_m, mask_n


@triton.jit
def _load_tile(ptr, row_offsets, col_offsets, row_mask, col_mask):
    """``ptr[row_offsets[:, None] + col_offsets[None, :]]``, 0 outside the masks."""
    return tl.load(ptr + row_offsets[:, None] + col_offsets[None, :],
                   mask=row_mask[:, None] & col_mask[None, :], other=0.0)


@triton.jit
def _channel_vector(ptr, offs, mask):
    """A per-channel vector's entries at ``offs`` (0 where masked)."""
    return tl.load(ptr + offs, mask=mask, other=0.0)


@triton.jit
def _bn_scale(invstd_ptr, bnw_ptr, offs, mask):
    """``invstd * weight`` in float32: ``batchnorm.scale_shift``'s scale (and the input
    gradient's direct coefficient), 0 where masked."""
    invstd = _channel_vector(invstd_ptr, offs, mask).to(tl.float32)
    return invstd * _channel_vector(bnw_ptr, offs, mask).to(tl.float32)


@triton.jit
def _scale_shift(mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, offs, mask):
    """BN folded into ``x * scale + shift`` (``densenet_fast.ops.batchnorm.scale_shift``),
    here rather than by the launchers: three fewer launches per call, each a few channels'
    work."""
    scale = _bn_scale(invstd_ptr, bnw_ptr, offs, mask)
    mean = _channel_vector(mean_ptr, offs, mask).to(tl.float32)
    return scale, _channel_vector(bnb_ptr, offs, mask).to(tl.float32) - mean * scale


@triton.jit
def _bn_relu(x, scale, shift):
    # relu(bn(x)) with folded scale and shift: bn_apply(..., relu=True) of ops/batchnorm.py.
    return tl.maximum(x * scale[None, :] + shift[None, :], 0.0,
                      propagate_nan=tl.PropagateNan.ALL)


@triton.jit
def _add_to_buffer(gbuf_ptr, b_rows, offs_n, sb_c, mask, dx):
    """``grad_buffer[p, c] += dx`` (float32 ``dx``) at the tile's pixel offsets ``b_rows``."""
    b_ptrs = gbuf_ptr + b_rows[:, None] + offs_n[None, :] * sb_c
    old = tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(b_ptrs, (old + dx).to(gbuf_ptr.dtype.element_ty), mask=mask)


@triton.jit
def forward_kernel(
    x_ptr, w_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, out_ptr,
    P, C, CO, HW,
    sx_n, sx_c, sx_hw, sw_o, sw_c, so_n, so_c, so_hw,
    FLAT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """out[p, o] = sum_c relu(x[p, c] * scale[c] + shift[c]) * w[o, c], with the BN folded
    as ``scale = invstd * bn_weight``, ``shift = bn_bias - mean * scale``."""
    image, hw, _, mask_m = _pixel_tile(tl.program_id(0), P, HW, BLOCK_M, FLAT)
    offs_n, mask_n = _block(tl.program_id(1) * BLOCK_N, CO, BLOCK_N)
    x_rows = _pixel_offsets(image, hw, sx_n, sx_hw, FLAT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, C, BLOCK_K):
        offs_k, mask_k = _block(k0, C, BLOCK_K)
        x = _load_tile(x_ptr, x_rows, offs_k * sx_c, mask_m, mask_k).to(tl.float32)
        scale, shift = _scale_shift(mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, offs_k, mask_k)
        w = _load_tile(w_ptr, offs_k * sw_c, offs_n * sw_o, mask_k, mask_n)
        a = _bn_relu(x, scale, shift).to(w.dtype)
        acc += _dot(a, w, PRECISION, UPCAST)
    out_rows = _pixel_offsets(image, hw, so_n, so_hw, FLAT)
    tl.store(out_ptr + out_rows[:, None] + offs_n[None, :] * so_c,
             acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def input_grad_kernel(
    go_ptr, w_ptr, x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, gbuf_ptr, gstore_ptr,
    partial_ptr,
    P, C, CO, HW,
    sg_n, sg_c, sg_hw, sw_o, sw_c, sx_n, sx_c, sx_hw, sb_n, sb_c, sb_hw,
    STORE_G: tl.constexpr, FLAT: tl.constexpr, PRECISION: tl.constexpr,
    UPCAST: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """g[p, c] = (sum_o grad_out[p, o] w[o, c]) * [a[p, c] > 0], with per-block partial sums
    of g and g * (x - mean) per channel; then either grad_buffer += kg * g (the direct term,
    ``kg`` the BN scale) or g is stored for a second pass (``STORE_G``). The mask and sums
    mirror the ``threshold_backward`` of ``torch_impl.bn_relu_conv1x1_backward`` and the
    ``dbias``, ``dweight`` (times invstd) of ``batchnorm.bn_backward``."""
    image, hw, pixel, mask_m = _pixel_tile(tl.program_id(0), P, HW, BLOCK_M, FLAT)
    offs_n, mask_n = _block(tl.program_id(1) * BLOCK_N, C, BLOCK_N)
    g_rows = _pixel_offsets(image, hw, sg_n, sg_hw, FLAT)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, CO, BLOCK_K):
        offs_k, mask_k = _block(k0, CO, BLOCK_K)
        go = _load_tile(go_ptr, g_rows, offs_k * sg_c, mask_m, mask_k)
        w = _load_tile(w_ptr, offs_k * sw_o, offs_n * sw_c, mask_k, mask_n)
        acc += _dot(go, w, PRECISION, UPCAST)
    mask = mask_m[:, None] & mask_n[None, :]
    x_rows = _pixel_offsets(image, hw, sx_n, sx_hw, FLAT)
    x = _load_tile(x_ptr, x_rows, offs_n * sx_c, mask_m, mask_n).to(tl.float32)
    scale, shift = _scale_shift(mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, offs_n, mask_n)
    mean = _channel_vector(mean_ptr, offs_n, mask_n).to(tl.float32)
    clamped = x * scale[None, :] + shift[None, :] <= 0.0  # false for NaN, as in torch
    g = tl.where(mask & ~clamped, acc, 0.0)
    partial_row = partial_ptr + tl.program_id(0) * 2 * C
    tl.store(partial_row + offs_n, tl.sum(g, axis=0), mask=mask_n)
    tl.store(partial_row + C + offs_n, tl.sum(g * (x - mean[None, :]), axis=0), mask=mask_n)
    if STORE_G:
        tl.store(gstore_ptr + pixel.to(tl.int64)[:, None] * C + offs_n[None, :], g, mask=mask)
    else:
        _add_to_buffer(gbuf_ptr, _pixel_offsets(image, hw, sb_n, sb_hw, FLAT), offs_n, sb_c,
                       mask, scale[None, :] * g)


@triton.jit
def weight_grad_kernel(
    go_ptr, x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, partial_ptr,
    P, C, CO, HW, SPLITS,
    sg_n, sg_c, sg_hw, sx_n, sx_c, sx_hw,
    FLAT: tl.constexpr, PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """partial[s, o, c] = sum over split s's pixel tiles of grad_out[p, o] * a[p, c]."""
    offs_m, offs_n, mask_m, mask_n = _tile(CO, C, BLOCK_M, BLOCK_N)
    pid_s = tl.program_id(2)
    scale, shift = _scale_shift(mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, offs_n, mask_n)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    tiles = tl.cdiv(P, BLOCK_K)
    per_split = tl.cdiv(tiles, SPLITS)
    start = pid_s * per_split
    for t in range(start, tl.minimum(start + per_split, tiles)):
        image, hw, _, mask_k = _pixel_tile(t, P, HW, BLOCK_K, FLAT)
        go_t = _load_tile(go_ptr, offs_m * sg_c, _pixel_offsets(image, hw, sg_n, sg_hw, FLAT),
                          mask_m, mask_k)
        x_rows = _pixel_offsets(image, hw, sx_n, sx_hw, FLAT)
        x = _load_tile(x_ptr, x_rows, offs_n * sx_c, mask_k, mask_n).to(tl.float32)
        a = tl.where(mask_k[:, None], _bn_relu(x, scale, shift), 0.0).to(go_t.dtype)
        acc += _dot(go_t, a, PRECISION, UPCAST)
    tl.store(partial_ptr + pid_s.to(tl.int64) * CO * C + offs_m[:, None] * C + offs_n[None, :],
             acc, mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def bn_grads_kernel(
    partial_ptr, invstd_ptr, dscale_ptr, dbias_ptr,
    ROWS, C,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """dbias[c] = sum_r partial[r, 0, c] and dscale[c] = invstd[c] * sum_r partial[r, 1, c]:
    the first ``ROWS`` per-tile partial sums of ``input_grad_kernel`` (``[rows, 2, C]``)
    summed in float64 and stored in the outputs' dtypes, in one launch where torch ops take
    four (sum, product, two casts). Rows are added in a fixed order: deterministic."""
    offs_n, mask_n = _block(tl.program_id(0) * BLOCK_N, C, BLOCK_N)
    sum_g = tl.zeros((BLOCK_N,), dtype=tl.float64)
    sum_gx = tl.zeros((BLOCK_N,), dtype=tl.float64)
    for start in range(0, ROWS, BLOCK_R):
        rows, mask_r = _block(start, ROWS, BLOCK_R)
        row_offsets = rows.to(tl.int64) * 2 * C
        g = _load_tile(partial_ptr, row_offsets, offs_n, mask_r, mask_n)
        gx = _load_tile(partial_ptr, row_offsets, C + offs_n, mask_r, mask_n)
        sum_g += tl.sum(g.to(tl.float64), axis=0)
        sum_gx += tl.sum(gx.to(tl.float64), axis=0)
    invstd = _channel_vector(invstd_ptr, offs_n, mask_n).to(tl.float64)
    _store_rounded(dbias_ptr + offs_n, sum_g, mask_n)
    _store_rounded(dscale_ptr + offs_n, sum_gx * invstd, mask_n)


@triton.jit
def _store_rounded(ptrs, value, mask):
    """Store float64 ``value`` in the pointers' dtype, rounded as torch rounds float64 to it:
    through float32 unless float64 (which Triton's interpreter also needs: its direct float64
    to bfloat16 conversion is wrong)."""
    if ptrs.dtype.element_ty != tl.float64:
        value = value.to(tl.float32)
    tl.store(ptrs, value.to(ptrs.dtype.element_ty), mask=mask)


@triton.jit
def stats_coefficients_kernel(
    kx_ptr, k0_ptr, mean_ptr, invstd_ptr, bnw_ptr, dw_ptr, db_ptr,
    C, inv_count, s_kx, s_k0,
    BLOCK: tl.constexpr,
):
    """kx[c] -= s * invstd * dw / n and k0[c] += s * (mean * invstd * dw - db) / n with
    ``s = bnw * invstd``, ``inv_count = 1 / n``: the ``add_stats_coefficients`` op
    (``batchnorm.add_stats_coefficients``) in one launch, where torch ops take six. float32
    (float64 calls go to the reference kernel)."""
    offs, mask = _block(tl.program_id(0) * BLOCK, C, BLOCK)
    invstd = _channel_vector(invstd_ptr, offs, mask).to(tl.float32)
    scale = invstd * _channel_vector(bnw_ptr, offs, mask).to(tl.float32)  # as _bn_scale's
    term = scale * _channel_vector(dw_ptr, offs, mask).to(tl.float32) * invstd
    mean = _channel_vector(mean_ptr, offs, mask).to(tl.float32)
    dbias = _channel_vector(db_ptr, offs, mask).to(tl.float32)
    kx_ptrs, k0_ptrs = kx_ptr + offs * s_kx, k0_ptr + offs * s_k0
    kx = tl.load(kx_ptrs, mask=mask, other=0.0)
    k0 = tl.load(k0_ptrs, mask=mask, other=0.0)
    tl.store(kx_ptrs, kx - term * inv_count, mask=mask)
    tl.store(k0_ptrs, k0 + (term * mean - scale * dbias) * inv_count, mask=mask)


@triton.jit
def add_dx_kernel(
    gstore_ptr, x_ptr, invstd_ptr, bnw_ptr, kx_ptr, k0_ptr, gbuf_ptr,
    P, C, HW,
    sx_n, sx_c, sx_hw, sb_n, sb_c, sb_hw,
    FLAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """grad_buffer[p, c] += kg[c] * g[p, c] + kx[c] * x[p, c] + k0[c]: the direct term
    (``kg`` the BN scale) and the statistics' (``batchnorm.add_stats_coefficients``), with
    ``g`` stored by ``input_grad_kernel``."""
    image, hw, pixel, mask_m = _pixel_tile(tl.program_id(0), P, HW, BLOCK_M, FLAT)
    offs_n, mask_n = _block(tl.program_id(1) * BLOCK_N, C, BLOCK_N)
    mask = mask_m[:, None] & mask_n[None, :]
    g = tl.load(gstore_ptr + pixel.to(tl.int64)[:, None] * C + offs_n[None, :], mask=mask,
                other=0.0)
    x_rows = _pixel_offsets(image, hw, sx_n, sx_hw, FLAT)
    x = _load_tile(x_ptr, x_rows, offs_n * sx_c, mask_m, mask_n).to(tl.float32)
    kg = _bn_scale(invstd_ptr, bnw_ptr, offs_n, mask_n)
    kx = _channel_vector(kx_ptr, offs_n, mask_n)
    k0 = _channel_vector(k0_ptr, offs_n, mask_n)
    dx = kg[None, :] * g + kx[None, :] * x + k0[None, :]
    _add_to_buffer(gbuf_ptr, _pixel_offsets(image, hw, sb_n, sb_hw, FLAT), offs_n, sb_c, mask,
                   dx)


@triton.jit
def bn_relu_kernel(
    x_ptr, mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, out_ptr,
    P, C, HW,
    sx_n, sx_c, sx_hw, so_n, so_c, so_hw,
    FLAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[p, c] = relu(x[p, c] * scale[c] + shift[c]) rounded to x's dtype, stored in out's:
    the ``bn_relu`` op (``torch_impl.bn_relu``) in one pass instead of the eval-mode BN kernel
    with its folded scale, shift and constant statistics, then a clamp."""
    image, hw, _, mask_m = _pixel_tile(tl.program_id(0), P, HW, BLOCK_M, FLAT)
    offs_n, mask_n = _block(tl.program_id(1) * BLOCK_N, C, BLOCK_N)
    x = _load_tile(x_ptr, _pixel_offsets(image, hw, sx_n, sx_hw, FLAT), offs_n * sx_c, mask_m,
                   mask_n)
    scale, shift = _scale_shift(mean_ptr, invstd_ptr, bnw_ptr, bnb_ptr, offs_n, mask_n)
    y = _bn_relu(x.to(tl.float32), scale, shift).to(x.dtype)
    out_rows = _pixel_offsets(image, hw, so_n, so_hw, FLAT)
    tl.store(out_ptr + out_rows[:, None] + offs_n[None, :] * so_c,
             y.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def stats_term_kernel(
    g_ptr, x_ptr, kx_ptr, k0_ptr, out_ptr,
    P, C, HW,
    sg_n, sg_c, sg_hw, sx_n, sx_c, sx_hw, so_n, so_c, so_hw,
    FLAT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[p, c] = grad[p, c] + (kx[c] * x[p, c] + k0[c]) in float32, rounded to out's dtype:
    the ``add_stats_term`` op (``torch_impl.add_stats_term``) in one pass."""
    image, hw, _, mask_m = _pixel_tile(tl.program_id(0), P, HW, BLOCK_M, FLAT)
    offs_n, mask_n = _block(tl.program_id(1) * BLOCK_N, C, BLOCK_N)
    g = _load_tile(g_ptr, _pixel_offsets(image, hw, sg_n, sg_hw, FLAT), offs_n * sg_c, mask_m,
                   mask_n).to(tl.float32)
    x = _load_tile(x_ptr, _pixel_offsets(image, hw, sx_n, sx_hw, FLAT), offs_n * sx_c, mask_m,
                   mask_n).to(tl.float32)
    kx = _channel_vector(kx_ptr, offs_n, mask_n)
    k0 = _channel_vector(k0_ptr, offs_n, mask_n)
    out = (kx[None, :] * x + k0[None, :]) + g
    out_rows = _pixel_offsets(image, hw, so_n, so_hw, FLAT)
    tl.store(out_ptr + out_rows[:, None] + offs_n[None, :] * so_c,
             out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])
