"""GGUF linears on CUDA: y = x @ dequant(W).T (+ bias) with W kept in llama.cpp's blocks (Q4_0, Q4_1, Q5_0, Q5_1,
Q8_0, Q4_K, Q5_K, Q6_K), a [rows, row bytes] uint8 tensor as the file stores it (`kernels.reference.GGUF_BLOCKS`).

Two paths, chosen by the number of rows (as `wna16.py` does):
- up to `FUSED_MAX_ROWS` rows (decode, small mixed steps): one fused kernel. Each program owns BLOCK_N output
  features and BLOCK_M rows over all of K, and walks K 32 inputs at a time: 32 is the block of the small types and
  the sub-block of the K-quants, so a tile's scales and mins are one value per weight row, loaded once, and only the
  quant bits are read per value. The tile is rounded to x's dtype before the dot, as the reference does.
- more rows (prefill): the layer is dequantized once into a scratch [N, K] of x's dtype and cuBLAS runs the GEMM.
`_dequantized_tile` mirrors `kernels.reference.dequantize_gguf`, the reference both paths are tested against.
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from engine.kernels.reference import GGUF_BLOCKS

FUSED_MAX_ROWS = 256
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_TILE_K = 32  # inputs per tile: a block (Q4_0 .. Q8_0) or one sub-block (the K-quants)
# Where each type's quant bits start in its block (Q5_0 / Q5_1 keep their 32 fifth bits in the 4 bytes before).
_QS_AT = {2: 2, 3: 4, 6: 6, 7: 8, 8: 2, 12: 16, 13: 48, 14: 0}


@triton.jit
def _byte(ptr, offsets, mask):
    return tl.load(ptr + offsets, mask=mask, other=0).to(tl.int32)


@triton.jit
def _f16(ptr, offsets, mask):
    """The little-endian float16 at byte `offsets`, as float32."""
    lo = tl.load(ptr + offsets, mask=mask, other=0).to(tl.uint16)
    hi = tl.load(ptr + offsets + 1, mask=mask, other=0).to(tl.uint16)
    return (lo | (hi << 8)).to(tl.float16, bitcast=True).to(tl.float32)


@triton.jit
def _k_scale_min(w_ptr, row, sub, mask):
    """Q4_K / Q5_K: sub-block `sub`'s six-bit scale and min from the 12 bytes at row + 4 (reference._k_scales)."""
    lo = _byte(w_ptr, row + 4 + sub % 4, mask)
    mid = _byte(w_ptr, row + 8 + sub % 4, mask)
    hi = _byte(w_ptr, row + 12 + sub % 4, mask)
    first = sub < 4
    scale = tl.where(first, lo & 63, (hi & 15) | ((lo >> 6) << 4))
    minimum = tl.where(first, mid & 63, (hi >> 4) | ((mid >> 6) << 4))
    return scale.to(tl.float32), minimum.to(tl.float32)


@triton.jit
def _dequantized_tile(w_ptr, k0, cols, col_mask, row_bytes,
                      QTYPE: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr, QS_AT: tl.constexpr):
    """The float32 weight tile [32, BLOCK_N]: inputs k0 .. k0 + 31 (k0 a multiple of 32) of weight rows `cols`."""
    row = cols.to(tl.int64) * row_bytes + (k0 // QK) * TYPE_SIZE  # [BLOCK_N]: the block holding the tile
    j0 = k0 % QK  # the tile's first value within its block
    lane = tl.arange(0, 32)[:, None]  # [32, 1]
    at = row[None, :]  # [1, BLOCK_N]
    mask = col_mask[None, :]
    vmask = (lane < 32) & mask  # the column mask broadcast to the tile
    d = _f16(w_ptr, row, col_mask)[None, :]
    if QTYPE == 8:  # Q8_0: d, 32 int8
        q = _byte(w_ptr, at + 2 + lane, vmask)
        w = d * tl.where(q >= 128, q - 256, q).to(tl.float32)
    elif QTYPE == 2 or QTYPE == 3 or QTYPE == 6 or QTYPE == 7:  # Q4_0, Q4_1, Q5_0, Q5_1: d, [m], [qh], nibbles
        b = _byte(w_ptr, at + QS_AT + lane % 16, vmask)
        q = tl.where(lane < 16, b & 15, b >> 4)
        if QTYPE == 6 or QTYPE == 7:
            qh = _byte(w_ptr, at + (QS_AT - 4) + lane // 8, vmask)
            q = q | (((qh >> (lane % 8)) & 1) << 4)
        if QTYPE == 2:
            w = d * (q - 8).to(tl.float32)
        elif QTYPE == 6:
            w = d * (q - 16).to(tl.float32)
        else:
            w = d * q.to(tl.float32) + _f16(w_ptr, row + 2, col_mask)[None, :]
    elif QTYPE == 12 or QTYPE == 13:  # Q4_K, Q5_K: d, dmin, 12 scale bytes, [32 qh], 128 nibble bytes
        sub = j0 // 32
        scale, minimum = _k_scale_min(w_ptr, row, sub, col_mask)
        b = _byte(w_ptr, at + QS_AT + 32 * (sub // 2) + lane, vmask)
        q = tl.where(sub % 2 == 0, b & 15, b >> 4)
        if QTYPE == 13:
            q = q | (((_byte(w_ptr, at + 16 + lane, vmask) >> sub) & 1) << 4)
        dmin = _f16(w_ptr, row + 2, col_mask)
        w = (d * scale[None, :]) * q.to(tl.float32) - (dmin * minimum)[None, :]
    else:  # Q6_K: 128 low-nibble bytes, 64 two-bit bytes, 16 int8 scales, d (last)
        half = j0 // 128
        quarter = (j0 % 128) // 32
        b = _byte(w_ptr, at + 64 * half + 32 * (quarter % 2) + lane, vmask)
        low = tl.where(quarter < 2, b & 15, b >> 4)
        high = (_byte(w_ptr, at + 128 + 32 * half + lane, vmask) >> (2 * quarter)) & 3
        s = _byte(w_ptr, at + 192 + j0 // 16 + lane // 16, vmask)
        scale = tl.where(s >= 128, s - 256, s).to(tl.float32)
        d6 = _f16(w_ptr, row + 208, col_mask)[None, :]
        w = (d6 * scale) * ((low | (high << 4)) - 32).to(tl.float32)
    return w


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["M"])
def _gguf_fused_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, M, N, stride_x, row_bytes,
    K: tl.constexpr, QTYPE: tl.constexpr, QK: tl.constexpr, TYPE_SIZE: tl.constexpr, QS_AT: tl.constexpr,
    HAS_BIAS: tl.constexpr, F32_DOT: tl.constexpr,  # bf16 dots are wrong in the interpreter
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    ks = tl.arange(0, 32)
    col_mask, row_mask = cols < N, rows < M
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, 32):
        w = _dequantized_tile(w_ptr, k, cols, col_mask, row_bytes, QTYPE, QK, TYPE_SIZE, QS_AT)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + (k + ks)[None, :], mask=row_mask[:, None],
                    other=0.0)
        if F32_DOT:
            acc = tl.dot(x.to(tl.float32), w.to(x.dtype).to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, w.to(x.dtype), acc)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@triton.jit
def _gguf_dequantize_kernel(w_ptr, out_ptr, N, K, row_bytes, QTYPE: tl.constexpr, QK: tl.constexpr,
                            TYPE_SIZE: tl.constexpr, QS_AT: tl.constexpr, BLOCK_N: tl.constexpr):
    k0 = tl.program_id(0) * 32
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    w = _dequantized_tile(w_ptr, k0, cols, col_mask, row_bytes, QTYPE, QK, TYPE_SIZE, QS_AT)
    kk = k0 + tl.arange(0, 32)
    tl.store(out_ptr + cols[None, :].to(tl.int64) * K + kk[:, None], w.to(out_ptr.dtype.element_ty),
             mask=col_mask[None, :])


def _layout(qweight: torch.Tensor, qtype: int) -> tuple[int, int, dict[str, int]]:
    """(N, K, the kernels' layout constants) of a packed weight."""
    if qtype not in GGUF_BLOCKS:
        raise ValueError(f"GGUF type {qtype} is not one kvbox keeps packed")
    block, type_size = GGUF_BLOCKS[qtype]
    constants = dict(QTYPE=qtype, QK=block, TYPE_SIZE=type_size, QS_AT=_QS_AT[qtype])
    return qweight.shape[0], qweight.shape[1] // type_size * block, constants


def gguf_linear(x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None, *,
                fused_max_rows: int = FUSED_MAX_ROWS) -> torch.Tensor:
    """[..., K] -> [..., N] in x's dtype; `fused_max_rows` is overridable for the tests."""
    n, k, constants = _layout(qweight, qtype)
    x2 = x.reshape(-1, k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    if m > fused_max_rows:
        return F.linear(x2, dequantize_gguf(qweight, qtype, x.dtype), bias).view(*x.shape[:-1], n)
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    block_m = 16 if m <= 16 else 64
    block_n = 64
    grid = (triton.cdiv(n, block_n), triton.cdiv(m, block_m))
    _gguf_fused_kernel[grid](
        x2, qweight, bias if bias is not None else x2, out, m, n, x2.stride(0), qweight.shape[1],
        K=k, **constants, HAS_BIAS=bias is not None,
        F32_DOT=_INTERPRET or x.dtype == torch.float32, BLOCK_M=block_m, BLOCK_N=block_n,
        num_warps=4, num_stages=4 if m <= 16 else 3)
    return out.view(*x.shape[:-1], n)


def dequantize_gguf(qweight: torch.Tensor, qtype: int, dtype: torch.dtype) -> torch.Tensor:
    """The layer's weight [N, K] in `dtype` (the reference's `dequantize_gguf(...)`, rounded)."""
    n, k, constants = _layout(qweight, qtype)
    out = torch.empty(n, k, dtype=dtype, device=qweight.device)
    block_n = 64
    _gguf_dequantize_kernel[(k // _TILE_K, triton.cdiv(n, block_n))](
        qweight, out, n, k, qweight.shape[1], **constants, BLOCK_N=block_n)
    return out
