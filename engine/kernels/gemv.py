"""Linear layers for decode-sized batches: y = x @ weight.T (+ bias) when x has at most 16 rows.

At batch 1 to 16 a linear layer only streams its weight, so the time is bytes over bandwidth. cuBLAS picks split-K
kernels for some of these shapes that reach little of the copy bandwidth and need a second reduce kernel (in the
decode graph on an H100 the 4096 x 4096 projection ran at ~55%). Each program here takes BLOCK_N output columns
over all of K: one pass over the weight, no reduction kernel, rows padded to one 16-row tensor-core tile (free: the
weight read dominates). In `python bench/kernel_speed.py --linear` on an H100 it matched or beat cuBLAS on every
Llama-3.1-8B projection at 1, 4 and 16 rows (o_proj 20 vs 24 us, gate/up 91 vs 95 us, the LM head 347 vs 383 us),
so `linear` uses it for every half-precision batch of up to 16 rows on CUDA and cuBLAS for the rest.
The reference is `kernels.reference.linear` (torch's F.linear).
"""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

MAX_ROWS = 16
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["M"])
def _skinny_linear_kernel(
    x_ptr,  # [M, K], rows contiguous
    w_ptr,  # [N, K], rows contiguous
    bias_ptr,  # [N] (unused without HAS_BIAS)
    out_ptr,  # [M, N] contiguous
    M,
    N,
    stride_x,
    stride_w,
    K: tl.constexpr,  # a layer's in_features: constant, so the loop count is too (one compile per K)
    HAS_BIAS: tl.constexpr,
    F32_DOT: tl.constexpr,  # bf16 dots are wrong in the interpreter, so there the dot runs in float32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    ks = tl.arange(0, BLOCK_K)
    col_mask = cols < N
    row_mask = rows < M
    w_ptrs = w_ptr + cols[:, None].to(tl.int64) * stride_w + ks[None, :]
    x_ptrs = x_ptr + rows[:, None] * stride_x + ks[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, K, BLOCK_K):
        if K % BLOCK_K == 0:
            w = tl.load(w_ptrs, mask=col_mask[:, None], other=0.0)
            x = tl.load(x_ptrs, mask=row_mask[:, None], other=0.0)
        else:
            k_mask = ks < K - k
            w = tl.load(w_ptrs, mask=col_mask[:, None] & k_mask[None, :], other=0.0)
            x = tl.load(x_ptrs, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        if F32_DOT:
            acc = tl.dot(x.to(tl.float32), tl.trans(w.to(tl.float32)), acc, input_precision="ieee")
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        w_ptrs += BLOCK_K
        x_ptrs += BLOCK_K
    if HAS_BIAS:
        acc += tl.load(bias_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + rows[:, None] * N + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


def _config(n: int, element_size: int) -> dict:
    """32 output columns a program, 512-wide K tiles, 3 stages: the best or within 2% on every Llama-3.1-8B projection
    at 1 to 16 rows (`python bench/kernel_speed.py --linear` on an H100). The widest weights (gate/up, the LM head)
    take 128-wide tiles in 3 stages: on an H200, timed where they run (`--chain`: a decode step's dense kernels back
    to back in one CUDA graph), that took the step from 4.37 to 4.19 ms, where the H100's isolated sweep had picked
    5 stages of 512. Float32 (twice the bytes a tile) keeps the 512-wide tiles everywhere."""
    if n >= 16384 and element_size <= 2:
        return dict(block_n=32, block_k=128, num_warps=4, num_stages=3)
    return dict(block_n=32, block_k=512, num_warps=4, num_stages=3)


def skinny_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                  block_n: int | None = None, block_k: int | None = None, num_warps: int | None = None,
                  num_stages: int | None = None) -> torch.Tensor:
    """[M <= 16, K] x [N, K] -> [M, N] in x's dtype; the launch configuration is overridable (tests, the sweep)."""
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"x has {x.shape[-1]} features, the weight expects {weight.shape[1]}")
    x2 = x.reshape(-1, x.shape[-1])
    m, k = x2.shape
    n = weight.shape[0]
    if m > MAX_ROWS:
        raise ValueError(f"skinny_linear takes at most {MAX_ROWS} rows, got {m}")
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    weight = weight if weight.stride(-1) == 1 else weight.contiguous()
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    if m == 0:
        return out.view(*x.shape[:-1], n)
    cfg = _config(n, x.element_size())
    for key, value in (("block_n", block_n), ("block_k", block_k), ("num_warps", num_warps),
                       ("num_stages", num_stages)):
        if value is not None:
            cfg[key] = value
    block_k = min(cfg["block_k"], triton.next_power_of_2(k))
    _skinny_linear_kernel[(triton.cdiv(n, cfg["block_n"]),)](
        x2, weight, bias if bias is not None else weight, out, m, n, x2.stride(0), weight.stride(0), K=k,
        HAS_BIAS=bias is not None, F32_DOT=_INTERPRET or x.dtype == torch.float32, BLOCK_M=MAX_ROWS,
        BLOCK_N=cfg["block_n"], BLOCK_K=block_k, num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    return out.view(*x.shape[:-1], n)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The layers' linear: the kernel for half-precision decode batches on CUDA, cuBLAS for everything else."""
    if x.numel() // x.shape[-1] <= MAX_ROWS and x.dtype in (torch.float16, torch.bfloat16) and x.is_cuda:
        return skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)
