"""Per-token activation quantization for the W8A8 linears, in one launch: each program takes one row, finds its
largest magnitude (asymmetric int8: its range, which gives a zero point too), and writes the row in float8 e4m3 or
int8 with its float32 scale (or applies a static per-tensor scale). The torch references
(`kernels.reference.quantize_activations` / `quantize_activations_asym`, same signatures) take about seven launches
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


@triton.jit
def _row_absmax_scale(x_row, K: tl.constexpr, TOP: tl.constexpr, BLOCK: tl.constexpr):
    amax = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, K, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        amax = tl.maximum(amax, tl.abs(tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)))
    return tl.maximum(tl.max(amax, axis=0) / TOP, 1e-12)


@triton.jit
def _row_range_scale(x_row, K: tl.constexpr, TOP: tl.constexpr, BLOCK: tl.constexpr):
    """Asymmetric int8: (scale, zero point as a float) over the row's range widened to hold 0, as the reference."""
    high = tl.zeros((BLOCK,), dtype=tl.float32)  # masked columns read 0, which the range holds anyway
    low = tl.zeros((BLOCK,), dtype=tl.float32)
    for k in range(0, K, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        v = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        high = tl.maximum(high, v)
        low = tl.minimum(low, v)
    low_row = tl.min(low, axis=0)
    scale = tl.maximum(tl.math.div_rn(tl.max(high, axis=0) - low_row, 2.0 * TOP + 1.0), 1e-12)
    return scale, _round_half_even(-TOP - 1.0 - tl.math.div_rn(low_row, scale))


@triton.jit(do_not_specialize=["stride_x"])
def _quantize_rows_kernel(x_ptr, q_ptr, scale_ptr, static_ptr, zp_ptr, static_zp_ptr, stride_x,
                          K: tl.constexpr, TOP: tl.constexpr, STATIC: tl.constexpr, INT: tl.constexpr,
                          ASYM: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * stride_x
    if STATIC:
        scale = tl.load(static_ptr).to(tl.float32)
        if ASYM:
            zero = tl.load(static_zp_ptr).to(tl.float32)
    elif ASYM:
        scale, zero = _row_range_scale(x_row, K, TOP, BLOCK)
    else:
        scale = _row_absmax_scale(x_row, K, TOP, BLOCK)
    tl.store(scale_ptr + row, scale)
    if ASYM:
        tl.store(zp_ptr + row, zero.to(tl.int32))
    for k in range(0, K, BLOCK):
        cols = k + tl.arange(0, BLOCK)
        v = tl.load(x_row + cols, mask=cols < K, other=0.0).to(tl.float32)
        if ASYM:  # round, then shift by the zero point, then clamp: the reference's order
            v = tl.math.div_rn(v, scale)
            q = tl.minimum(tl.maximum(_round_half_even(v) + zero, -TOP - 1.0), TOP).to(q_ptr.dtype.element_ty)
        else:
            q = quantize_in_registers(v, scale, q_ptr, INT, TOP)
        tl.store(q_ptr + row * K + cols, q, mask=cols < K)


@triton.jit
def quantize_in_registers(v, scale, q_ptr, INT: tl.constexpr, TOP: tl.constexpr):
    """float32 values v -> q_ptr's type (symmetric: v / scale clamped to +-TOP), rounded as the reference rounds.
    Also used by the ops that quantize their own output (kernels.norm, kernels.activation)."""
    # IEEE division, as torch divides: the GPU's default `/` is approximate and moves int8 roundings.
    v = tl.minimum(tl.maximum(tl.math.div_rn(v, scale), -TOP), TOP)
    # Both branches spelled out: after a constexpr `if` that returns, Triton still compiles the statements below it.
    if INT:
        q = _round_half_even(v).to(q_ptr.dtype.element_ty)
    else:
        q = v.to(q_ptr.dtype.element_ty, fp_downcast_rounding="rtne")  # torch's rounding; not Triton's default
    return q


def type_max(dtype: torch.dtype | None) -> float:
    """The largest value of an 8-bit activation type (float8 e4m3 or int8); 1.0 for None (nothing quantized)."""
    return FP8_MAX if dtype == torch.float8_e4m3fn else INT8_MAX if dtype == torch.int8 else 1.0


def _launch(x: torch.Tensor, dtype: torch.dtype, scale, zero_point, asym: bool):
    n, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    q = torch.empty(n, k, dtype=dtype, device=x.device)
    scales = torch.empty(n, 1, dtype=torch.float32, device=x.device)
    zero_points = torch.empty(n, 1, dtype=torch.int32, device=x.device) if asym else scales
    if n:
        _quantize_rows_kernel[(n,)](
            x, q, scales, scale if scale is not None else scales, zero_points,
            zero_point if zero_point is not None else zero_points, x.stride(0), K=k,
            TOP=type_max(dtype), STATIC=scale is not None,
            INT=dtype == torch.int8, ASYM=asym, BLOCK=min(1024, triton.next_power_of_2(k)), num_warps=4)
    return q, scales, zero_points


def quantize_activations(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None):
    """x [n, k] -> (x quantized to `dtype`, float32 scale [n, 1]) as the reference computes them; a static scale is
    written out per row, which is the shape the GEMMs take."""
    return _launch(x, dtype, scale, None, asym=False)[:2]


def quantize_activations_asym(x: torch.Tensor, scale: torch.Tensor | None = None,
                              zero_point: torch.Tensor | None = None):
    """x [n, k] -> (int8 x, float32 scale [n, 1], int32 zero point [n, 1]) as
    `kernels.reference.quantize_activations_asym` computes them (per token, or the static pair written per row)."""
    return _launch(x, torch.int8, scale, zero_point, asym=True)
