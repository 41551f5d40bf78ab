"""Weight-only integer linears on CUDA (W4A16 / W8A16): y = x @ dequant(W).T (+ bias) on the canonical GPTQ layout of
`engine.quantization.wna16` (int32 words packing input rows low bits first, per-group scales and zeros, g_idx).

Two paths, chosen by the number of rows without measuring (the choice is a threshold, `FUSED_MAX_ROWS`):
- up to 256 rows (decode and small mixed steps): one fused kernel. Each program takes BLOCK_N output columns and
  BLOCK_M rows over a slice of K, unpacks a [BLOCK_K, BLOCK_N] tile of the packed weight in registers, applies its
  group's scale and zero and feeds the tensor cores (or, for a few rows, multiplies and sums in registers, which
  pads nothing); the weight is read once, at 4 bits, which is the whole point at decode. When g_idx is plain
  `row // group_size` (no act-order) one scale row serves a whole K tile; with act-order each row gathers its own
  group. At decode a layer has too few column tiles to keep every SM reading, so K is split: each slice writes a
  float32 partial and one sum finishes them (in a fixed order, so results do not vary run to run).
- more rows (prefill): the layer is dequantized once into a scratch [K, N] buffer of x's dtype and cuBLAS runs the
  GEMM; at that size the matmul's FLOPs dwarf the extra pass over the weight.
The reference is `kernels.reference.wna16_linear` (dequantize in float32, cast to x's dtype, F.linear), which the
fused kernel matches: it rounds the dequantized weight to x's dtype before the dot, as the reference does.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

FUSED_MAX_ROWS = 256
_TARGET_PROGRAMS = 1024
_DECODE_BLOCK_N, _DECODE_BLOCK_K = 128, 256  # the best of bench/quant_kernels.py --sweep on an H200
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


@triton.jit
def _dequantized_tile(qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, k0, kk, cols, k_mask, col_mask, N, K,
                      BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """The float32 weight tile [BLOCK_K, BLOCK_N] of input rows `kk` (from `k0`, a multiple of the words' row count)
    and output columns `cols`. Each packed word is loaded once and shifted into its rows (loading it per row would
    issue one load per row it holds)."""
    PACK: tl.constexpr = 32 // BITS
    words = k0 // PACK + tl.arange(0, BLOCK_K // PACK)
    word_mask = (words < (K + PACK - 1) // PACK)[:, None] & col_mask[None, :]
    packed = tl.load(qw_ptr + words[:, None].to(tl.int64) * N + cols[None, :], mask=word_mask, other=0)
    shifts = tl.arange(0, PACK) * BITS
    q = tl.reshape((packed[:, None, :] >> shifts[None, :, None]) & ((1 << BITS) - 1), (BLOCK_K, BLOCK_N))
    if GROUP_SIZE > 0:  # the tile lies in one group (the launcher makes BLOCK_K divide the group size)
        group = k0 // GROUP_SIZE
        scale = tl.load(scales_ptr + group * N + cols, mask=col_mask, other=0.0)[None, :]
        zero = tl.load(zeros_ptr + group * N + cols, mask=col_mask, other=0)[None, :]
    else:
        mask = k_mask[:, None] & col_mask[None, :]
        group = tl.load(g_idx_ptr + kk, mask=k_mask, other=0)[:, None].to(tl.int64)
        scale = tl.load(scales_ptr + group * N + cols[None, :], mask=mask, other=0.0)
        zero = tl.load(zeros_ptr + group * N + cols[None, :], mask=mask, other=0)
    return (q.to(tl.float32) - zero.to(tl.float32)) * scale.to(tl.float32)


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["M"])
def _wna16_fused_kernel(
    x_ptr, qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, bias_ptr, out_ptr,
    M, N, stride_x,
    K: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,  # GROUP_SIZE 0: read g_idx
    K_SPLIT: tl.constexpr,  # the K slice of a program (program_id(2))
    PARTIAL: tl.constexpr,  # K is split: out_ptr holds a float32 partial per slice
    HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,  # bf16 dots are wrong in the interpreter
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    split = tl.program_id(2)
    ks = tl.arange(0, BLOCK_K)
    col_mask, row_mask = cols < N, rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    start = split * K_SPLIT
    for step in range(0, K_SPLIT, BLOCK_K):
        k = start + step
        kk = k + ks
        k_mask = kk < K
        w = _dequantized_tile(qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, k, kk, cols, k_mask, col_mask, N, K, BITS,
                              GROUP_SIZE, BLOCK_K, BLOCK_N)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + kk[None, :],
                    mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if BLOCK_M < 16:  # tensor-core tiles are 16 rows: below that multiply and sum in registers
            acc += tl.sum(x.to(tl.float32)[:, :, None] * w.to(x.dtype).to(tl.float32)[None, :, :], axis=1)
        elif F32_DOT:
            acc = tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    out_mask = row_mask[:, None] & col_mask[None, :]
    if PARTIAL:
        tl.store(out_ptrs + split.to(tl.int64) * M * N, acc, mask=out_mask)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _wna16_dequantize_kernel(qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, out_ptr, N, K,
                             BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, BLOCK_K: tl.constexpr,
                             BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * BLOCK_K
    kk = k0 + tl.arange(0, BLOCK_K)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    k_mask, col_mask = kk < K, cols < N
    w = _dequantized_tile(qw_ptr, scales_ptr, zeros_ptr, g_idx_ptr, k0, kk, cols, k_mask, col_mask, N, K, BITS,
                          GROUP_SIZE, BLOCK_K, BLOCK_N)
    tl.store(out_ptr + kk[:, None].to(tl.int64) * N + cols[None, :], w.to(out_ptr.dtype.element_ty),
             mask=k_mask[:, None] & col_mask[None, :])


def _block_k(k: int, group_size: int, widest: int) -> tuple[int, int]:
    """(BLOCK_K, GROUP_SIZE for the kernel): a K tile inside one group when the groups are contiguous, else 0 and
    a free tile (each row reads its own group)."""
    block = min(widest, triton.next_power_of_2(k))
    if group_size > 0:
        group = k if group_size == -1 else group_size
        if group % block:
            block = min(block, group & -group)  # the largest power of two dividing the group
        if block >= 16:
            return block, group
    return max(16, block), 0


def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None, group_size: int = 0, *,
                 fused_max_rows: int = FUSED_MAX_ROWS, config: tuple[int, ...] | None = None) -> torch.Tensor:
    """[..., K] -> [..., N] in x's dtype. `group_size`: a promise that g_idx is `row // group_size` (-1: one group
    over K), which lets the kernel read one scale row per tile; 0: g_idx is read per row (act-order).
    `fused_max_rows` and the fused kernel's `config` (see `_fused_config`) are overridable for tests and tuning."""
    k, n = x.shape[-1], qweight.shape[1]
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > fused_max_rows:
        weight = dequantize_wna16_t(qweight, scales, zeros, g_idx, bits, x.dtype, group_size)
        out = x2 @ weight if bias is None else torch.addmm(bias.to(x.dtype), x2, weight)
        return out.view(*x.shape[:-1], n)
    if m == 0:
        return x2.new_empty(*x.shape[:-1], n)
    block_m, block_n, block_k, splits, warps, stages = config or _fused_config(m, k, n)
    block_k, group = _block_k(k, group_size, block_k)
    k_split = triton.cdiv(triton.cdiv(k, splits), block_k) * block_k  # whole tiles: a tile stays in one group
    splits = triton.cdiv(k, k_split)
    out = torch.empty((splits, m, n) if splits > 1 else (m, n), dtype=torch.float32 if splits > 1 else x.dtype,
                      device=x.device)
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m), splits)
    _wna16_fused_kernel[grid](
        x2, qweight, scales, zeros, g_idx, bias if bias is not None else scales, out, m, n, x2.stride(0),
        K=k, BITS=bits, GROUP_SIZE=group, K_SPLIT=k_split, PARTIAL=splits > 1, HAS_BIAS=bias is not None,
        F32_DOT=_INTERPRET or x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps, num_stages=stages)
    if splits > 1:
        out = out.sum(0) if bias is None else out.sum(0).add_(bias)
        out = out.to(x.dtype)
    return out.view(*x.shape[:-1], n)


def _fused_config(m: int, k: int, n: int) -> tuple[int, int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, K splits, warps, stages) for the fused kernel. K is split until about
    `_TARGET_PROGRAMS` programs read the weight: a decode GEMV of Llama-3.1-8B's o_proj has only 128 column tiles
    for 132 SMs, each SM wanting several tiles in flight."""
    if m <= 16:
        block_m, block_n, block_k, warps, stages = (1 if m == 1 else 16), _DECODE_BLOCK_N, _DECODE_BLOCK_K, 4, 3
    else:
        block_m, block_n, block_k, warps, stages = 64, 64, 128, 4, 3
    tiles = triton.cdiv(n, block_n) * triton.cdiv(m, block_m)
    splits = 1
    while tiles * splits * 2 <= _TARGET_PROGRAMS and k // (splits * 2) >= 2 * block_k:
        splits *= 2
    return block_m, block_n, block_k, splits, warps, stages


def dequantize_wna16_t(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, g_idx: torch.Tensor,
                       bits: int, dtype: torch.dtype, group_size: int = 0) -> torch.Tensor:
    """The layer's weight transposed, [K, N] in `dtype` (the reference's `dequantize_wna16(...).T`, rounded)."""
    k, n = g_idx.shape[0], qweight.shape[1]
    out = torch.empty(k, n, dtype=dtype, device=qweight.device)
    block_k, group = _block_k(k, group_size, 64)
    _wna16_dequantize_kernel[(triton.cdiv(k, block_k), triton.cdiv(n, 64))](
        qweight, scales, zeros, g_idx, out, n, k, BITS=bits, GROUP_SIZE=group, BLOCK_K=block_k, BLOCK_N=64)
    return out
