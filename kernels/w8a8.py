"""8-bit linears on CUDA: FP8 W8A8 by `torch._scaled_mm` (Hopper / Ada) and INT8 W8A8 by `torch._int_mm` through
cuBLAS(Lt), both with per-token (or static per-tensor) activation scales times per-output-channel weight scales
applied after the integer / fp8 GEMM. Same signature and quantization as `kernels.reference.w8a8_linear`, which
emulates it in float32.

Decode-sized batches (up to `SMALL_MAX_ROWS` rows) take a Triton kernel instead: cuBLAS's 8-bit GEMMs read a skinny
problem's weight at well under half the card's bandwidth (bench/quant_kernels.py), less than bf16 GEMV does, which
would make 8-bit weights slower than 16-bit ones at decode. The kernel splits K like the W4A16 one and sums the
8-bit products in float32, as the reference does.

What cuBLAS does not take goes the dequantizing way, on any GPU: weight-only 8-bit (`quantize_input=False`) and
block-scaled weights (fp8 checkpoints with `weight_block_size`) get the weight dequantized to x's dtype for the call.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from kernels.act_quant import quantize_activations
from kernels.reference import dequantize_w8

_INT_MM_MIN_ROWS = 17  # torch._int_mm wants more than 16 rows
SMALL_MAX_ROWS = 16
_TARGET_PROGRAMS = 512


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["M"])
def _w8a8_small_kernel(xq_ptr, xs_ptr, w_ptr, ws_ptr, bias_ptr, out_ptr, M, N,
                       K: tl.constexpr, K_SPLIT: tl.constexpr, PARTIAL: tl.constexpr, HAS_BIAS: tl.constexpr,
                       BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    start = tl.program_id(2) * K_SPLIT
    ks = tl.arange(0, BLOCK_K)
    col_mask, row_mask = cols < N, rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for step in range(0, K_SPLIT, BLOCK_K):
        kk = start + step + ks
        k_mask = kk < K
        x = tl.load(xq_ptr + rows[:, None].to(tl.int64) * K + kk[None, :], mask=row_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        w = tl.load(w_ptr + cols[:, None].to(tl.int64) * K + kk[None, :], mask=col_mask[:, None] & k_mask[None, :],
                    other=0.0).to(tl.float32)
        acc += tl.sum(x[:, None, :] * w[None, :, :], axis=2)
    acc *= tl.load(xs_ptr + rows, mask=row_mask, other=0.0)[:, None] * tl.load(ws_ptr + cols, mask=col_mask,
                                                                               other=0.0)[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if PARTIAL:
        tl.store(out_ptrs + tl.program_id(2).to(tl.int64) * M * N, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


def _small_gemm(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
                bias: torch.Tensor | None, dtype: torch.dtype,
                config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """(q [M, K] 8-bit, scale [M, 1]) x (weight [N, K] 8-bit, weight_scale [N]) -> [M, N] in `dtype`.
    `config`: (BLOCK_N, BLOCK_K, K splits), for tuning."""
    (m, k), n = q.shape, weight.shape[0]
    block_n, block_k, splits = config or (32, 256, 1)
    if config is None:  # split K until enough programs read the weight
        while triton.cdiv(n, block_n) * m * splits * 2 <= _TARGET_PROGRAMS and k // (splits * 2) >= 4 * block_k:
            splits *= 2
    k_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k
    splits = triton.cdiv(k, k_split)
    out = torch.empty((splits, m, n) if splits > 1 else (m, n), dtype=torch.float32 if splits > 1 else dtype,
                      device=q.device)
    _w8a8_small_kernel[(triton.cdiv(n, block_n), m, splits)](
        q, scale, weight, weight_scale, bias if bias is not None else weight_scale, out, m, n, K=k, K_SPLIT=k_split,
        PARTIAL=splits > 1, HAS_BIAS=bias is not None, BLOCK_M=1, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4,
        num_stages=3)
    if splits > 1:
        out = out.sum(0) if bias is None else out.sum(0).add_(bias)
        out = out.to(dtype)
    return out


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                bias: torch.Tensor | None = None, quantize_input: bool = True, *,
                config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """[..., K] x 8-bit [N, K] -> [..., N] in x's dtype. `config` tunes the small-batch kernel (`_small_gemm`)."""
    if not quantize_input or weight_scale.dim() != 1:
        return F.linear(x, dequantize_w8(weight, weight_scale).to(x.dtype), bias)
    k, n = x.shape[-1], weight.shape[0]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    q, scale = quantize_activations(x2, weight.dtype, input_scale)
    if m <= SMALL_MAX_ROWS:
        return _small_gemm(q, scale, weight, weight_scale, bias, x.dtype, config).view(*x.shape[:-1], n)
    if weight.dtype == torch.float8_e4m3fn:
        # Row-wise scaling writes bfloat16 only.
        out = torch._scaled_mm(q, weight.t(), scale_a=scale, scale_b=weight_scale.view(1, n),
                               out_dtype=torch.bfloat16)
    else:
        padded = F.pad(q, (0, 0, 0, _INT_MM_MIN_ROWS - m)) if m < _INT_MM_MIN_ROWS else q
        out = torch._int_mm(padded, weight.t())[:m].float() * scale * weight_scale.view(1, n)
    out = out.to(x.dtype)
    if bias is not None:
        out += bias
    return out.view(*x.shape[:-1], n)
