"""8-bit linears on CUDA: FP8 W8A8 by `torch._scaled_mm` (Hopper / Ada) and INT8 W8A8 by `torch._int_mm` through
cuBLAS(Lt), both with per-token (or static per-tensor) activation scales times per-output-channel weight scales
applied after the integer / fp8 GEMM; asymmetric int8 activations (a zero point per token, or a static one) take the
zero point's share off the int32 accumulator first (q @ W.T - z * colsum(W), vLLM's azp_adj). Same signature and
quantization as `kernels.reference.w8a8_linear`, which emulates it in float32.

The activations are quantized by one Triton launch (`kernels.act_quant`): in torch ops it took as long as the GEMM.

Up to 16 rows (decode) a Triton kernel replaces cuBLAS: the 8th session measured `_scaled_mm` reading skinny FP8
problems at 1.3-1.6 TB/s, under half of what bf16 GEMV reaches, so 8-bit weights lost to 16-bit ones at decode. Its
shape is `kernels.gemv`'s: each program takes BLOCK_N output channels over all of K, the rows padded to one 16-row
tensor-core tile, and the 8-bit operands go to the tensor cores as they are (fp8 x fp8 -> float32, int8 x int8 ->
int32), so nothing is converted per weight; the scales are applied once per output.

Weight-only 8-bit (`quantize_input=False`) goes the dequantizing way, on any GPU: the weight is dequantized to x's
dtype for the call. Block-scaled weights (fp8 checkpoints' `weight_block_size`, compressed-tensors' FP8_BLOCK) run
only so (`block_size`): `_scaled_mm` here takes per-row scales, not blocks.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.kernels.act_quant import quantize_activations, quantize_activations_asym
from engine.kernels.reference import dequantize_w8

_INT_MM_MIN_ROWS = 17  # torch._int_mm wants more than 16 rows
SKINNY_MAX_ROWS = 16
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["M"])
def _w8a8_skinny_kernel(
    q_ptr,  # [M, K] 8-bit activations, rows contiguous
    w_ptr,  # [N, K] 8-bit weight, rows contiguous
    x_scale_ptr,  # [M] float32
    w_scale_ptr,  # [N] float32
    bias_ptr, out_ptr, M, N,
    K: tl.constexpr, INT: tl.constexpr, HAS_BIAS: tl.constexpr,
    F32_DOT: tl.constexpr,  # the interpreter's dots: in float32, exact for these products and sums
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    col_mask, row_mask = cols < N, rows < M
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * K + ks[None, :]
    q_ptrs = q_ptr + rows[:, None] * K + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32 if INT and not F32_DOT else tl.float32)
    for k in range(0, K, BLOCK_K):
        k_mask = ks < K - k
        w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
        q = tl.load(q_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if F32_DOT:
            acc = tl.dot(q.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(q, tl.trans(w), acc, out_dtype=acc.dtype)
        w_ptrs += BLOCK_K
        q_ptrs += BLOCK_K
    x_scale = tl.load(x_scale_ptr + rows, mask=row_mask, other=0.0)
    w_scale = tl.load(w_scale_ptr + cols, mask=col_mask, other=0.0)
    result = acc.to(tl.float32) * x_scale[:, None] * w_scale[None, :]
    if HAS_BIAS:
        result += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + rows[:, None] * N + cols[None, :], result.to(out_ptr.dtype.element_ty),
             mask=row_mask[:, None] & col_mask[None, :])


def _skinny_config(k: int, n: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, warps, stages): the best of `python bench/quant_kernels.py --rows 1,16 --sweep skinny` on
    an H200 for Llama-3.1-8B's projections (fp8 and int8 agreed), at 1 and at 16 rows."""
    if n >= 16384:  # gate/up: enough column tiles; shorter K steps
        return 32, 256, 4, 3
    if k >= 8192:  # down: few tiles, long K: a deeper pipeline
        return 32, 512, 4, 5
    return (64, 512, 4, 5) if n > k else (32, 512, 4, 3)  # qkv; o


def w8a8_skinny(q: torch.Tensor, weight: torch.Tensor, x_scale: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, out_dtype: torch.dtype,
                config: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """Quantized rows q [M <= 16, K] (scales x_scale [M, 1]) x weight [N, K] -> [M, N] in `out_dtype`; `config`
    (BLOCK_N, BLOCK_K, warps, stages) is overridable for tests and tuning."""
    m, k = q.shape
    n = weight.shape[0]
    block_n, block_k, warps, stages = config or _skinny_config(k, n)
    block_k = min(block_k, max(32, triton.next_power_of_2(k)))
    out = torch.empty(m, n, dtype=out_dtype, device=q.device)
    _w8a8_skinny_kernel[(triton.cdiv(n, block_n),)](
        q, weight, x_scale, weight_scale, bias if bias is not None else weight_scale, out, m, n, K=k,
        INT=weight.dtype == torch.int8, HAS_BIAS=bias is not None, F32_DOT=_INTERPRET, BLOCK_M=SKINNY_MAX_ROWS,
        BLOCK_N=block_n, BLOCK_K=block_k, num_warps=warps, num_stages=stages)
    return out


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                bias: torch.Tensor | None = None, quantize_input: bool = True, azp_adj: torch.Tensor | None = None,
                input_zero_point: torch.Tensor | None = None,
                block_size: tuple[int, int] | None = None) -> torch.Tensor:
    """[..., K] x 8-bit [N, K] -> [..., N] in x's dtype; `azp_adj` given: asymmetric int8 activations."""
    if not quantize_input:
        return F.linear(x, dequantize_w8(weight, weight_scale, block_size).to(x.dtype), bias)
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    if azp_adj is not None:
        q, scale, zero_point = quantize_activations_asym(x2, input_scale, input_zero_point)
        out = _gemm(q, scale, weight, weight_scale, bias, x.dtype, zero_point * azp_adj.view(1, n))
    else:
        out = w8a8_gemm(*quantize_activations(x2, weight.dtype, input_scale), weight, weight_scale, bias, x.dtype)
    return out.view(*x.shape[:-1], n)


def w8a8_gemm(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """Activations already quantized (symmetric): q [M, K] 8-bit, float32 scale [M, 1] -> [M, N] in `out_dtype`."""
    if 0 < q.shape[0] <= SKINNY_MAX_ROWS and weight.is_contiguous():
        return w8a8_skinny(q, weight, scale, weight_scale, bias, out_dtype)
    return _gemm(q, scale, weight, weight_scale, bias, out_dtype)


def _gemm(q, scale, weight, weight_scale, bias, out_dtype, zero_point_share=None) -> torch.Tensor:
    """cuBLAS: `_scaled_mm` for float8, `_int_mm` for int8 (taking off `zero_point_share`, z * azp_adj, if given)."""
    m, n = q.shape[0], weight.shape[0]
    if weight.dtype == torch.float8_e4m3fn:
        # Row-wise scaling writes bfloat16 only.
        out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, n),
                               out_dtype=torch.bfloat16)
    else:
        padded = F.pad(q, (0, 0, 0, _INT_MM_MIN_ROWS - m)) if m < _INT_MM_MIN_ROWS else q
        acc = torch._int_mm(padded, weight.t())[:m]
        if zero_point_share is not None:  # exact in int32: |z| <= 128 and |azp_adj| <= 127 K
            acc = acc - zero_point_share
        out = acc.float() * scale * weight_scale.view(1, n)
    out = out.to(out_dtype)
    if bias is not None:
        out += bias
    return out
