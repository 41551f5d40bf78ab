"""Per-token activation quantization for the W8A8 linears, in one launch: each program takes one row, finds its
largest magnitude, and writes the row in float8 e4m3 or int8 with its float32 scale (or applies a static per-tensor
scale). The torch reference (`kernels.reference.quantize_activations`, same signature) takes about seven launches
(cast, abs, max, divide, clamp, divide, cast), which at decode cost more than the 8-bit GEMM saves.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from engine.kernels.reference import FP8_MAX, INT8_MAX


@triton.jit
def _round_half_even(v):
    """torch.round's rounding (half to even), without libdevice, which the interpreter lacks."""
    f = tl.floor(v)
    d = v - f
    odd = (f - 2.0 * tl.floor(f * 0.5)) == 1.0
    return f + ((d > 0.5) | ((d == 0.5) & odd)).to(tl.float32)


@triton.jit(do_not_specialize=["stride_x"])
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, static_ptr, stride_x,
                          K: tl.constexpr, TOP: tl.constexpr, STATIC: tl.constexpr, INT: tl.constexpr,
                          BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
    else:
        amax = tl.zeros((BLOCK,), dtype=tl.float32)
        for k in range(0, K, BLOCK):
            cols = k + tl.arange(0, BLOCK)
            amax = tl.maximum(amax, tl.abs(tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)))
        scale = tl.maximum(tl.max(amax, axis=0) / TOP, 1e-12)
    tl.store(scale_ptr + row, scale)
    for k in range(0, K, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        # IEEE division, as torch divides: the GPU's default `/` is approximate and moves int8 roundings.
        v = tl.math.div_rn(tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32), scale)
        v = tl.minimum(tl.maximum(v, -TOP), TOP)
        if INT:
            q = _round_half_even(v).to(q_ptr.dtype.element_ty)
        else:  # torch rounds to nearest even; Triton's default for float8 is not that everywhere
            q = v.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne")
        tl.store(q_ptr + row * K + cols, q, mask=cols < K)


def quantize_activations(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None):
    """x [n, k] -> (x quantized to `dtype`, float32 scale [n, 1]) as the reference computes them; a static scale is
    written out per row, which is the shape the GEMMs take."""
    n, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(n, k, dtype=dtype, device=x.device)
    scales = torch.empty(n, 1, dtype=torch.float32, device=x.device)
    if n:
        _quantize_rows_kernel[(n,)](
            x, q, scales, scale if scale is not None else scales, x.stride(0), K=k,
            TOP=FP8_MAX if dtype == torch.float8_e4m3fn else INT8_MAX, STATIC=scale is not None,
            INT=dtype == torch.int8, BLOCK=min(1024, triton.next_power_of_2(k)), num_warps=4)
    return q, scales
