"""Multi-LoRA for one linear layer: out[t] += B[s] @ (A[s] @ x[t]) with s = token_slots[t], for every token whose
slot is set (-1: none, the base model alone). One batch mixes adapters freely.

The adapters sit in fixed-size slot tensors, padded to the largest rank with zeros and with their scale folded into
B, so loading one copies into a slot and the kernels' arguments never move, as CUDA graphs need. A merged layer
(q/k/v, gate/up) has one A and one B per output slice. Layouts: A is [num_slices, max_loras, max_rank, in_features]
and B is [out_features, max_loras, max_rank], so that every slot's A of a slice, and every slot's B of an output
row, lie side by side: the dense path below reads them as plain matrices.

Two ways, chosen by batch size:
- per token (Triton, as in Punica / S-LoRA), for decode-sized batches, the ones CUDA graphs capture:
  - shrink: h = x @ A[s]^T -> [num_tokens, num_slices * max_rank], float32. One pass serves every slice. Small
    batches give it few token blocks, so it splits in_features over programs as well (split-K), each writing its
    partial sum: one program walking all of in_features took longer than the base GEMM. One torch sum adds the
    partial sums up (in a fixed order, so results are deterministic).
  - expand: out[:, slice] += h[:, the slice's ranks] @ B[s, the slice's rows]^T, one program per (token block,
    column block, slice).
  Each program takes a block of tokens and loops over the slots, doing work only for those present in its block;
  the runner orders a batch by adapter, so a block usually holds one adapter and reads its weights once. The grid
  depends on shapes only (no host sync), so CUDA graphs can capture it.
- dense (cuBLAS), for prefill-sized batches when the slots' ranks are few next to in_features: one GEMM shrinks
  every token through every slot's A, a mask keeps each token's own slot, and one GEMM per slice expands and adds
  into `out` in its epilogue (beta = 1). Its waste (every slot for every token) costs less than the per-token
  kernels' read-modify-write passes at these sizes, it runs at cuBLAS's speed, and it needs no Triton variant per
  batch size (a variant compiled mid-run stalls the GPU).
The reference is `kernels.reference.add_lora`.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

# bf16 dots are wrong in the interpreter, so there every dot runs in float32.
_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["num_tokens"])
def _shrink_kernel(
    x_ptr,  # [num_tokens, in_features]
    a_ptr,  # [num_slices, max_loras, max_rank, in_features] contiguous
    slots_ptr,  # [num_tokens]
    h_ptr,  # [num_splits, num_tokens, num_ranks] float32 contiguous: each split's partial sum
    num_tokens,
    stride_x,
    NUM_RANKS: tl.constexpr,  # num_slices * max_rank
    MAX_RANK: tl.constexpr,
    IN_FEATURES: tl.constexpr,
    MAX_LORAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,  # in_features per split, a multiple of BLOCK_K
    F32_DOT: tl.constexpr,
):
    tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    ranks = tl.program_id(1) * BLOCK_R + tl.arange(0, BLOCK_R)
    split = tl.program_id(2)
    slots = tl.load(slots_ptr + tokens, mask=tokens < num_tokens, other=-1)
    x_rows = x_ptr + tokens.to(tl.int64)[:, None] * stride_x
    # Rank j of the shrink's output is rank j % MAX_RANK of slice j // MAX_RANK.
    rank_rows = (ranks // MAX_RANK) * (MAX_LORAS * MAX_RANK) + ranks % MAX_RANK
    acc = tl.zeros((BLOCK_T, BLOCK_R), dtype=tl.float32)
    for lora in range(MAX_LORAS):
        in_slot = slots == lora
        if tl.max(in_slot.to(tl.int32), 0) > 0:
            a_rows = a_ptr + (rank_rows[None, :] + lora * MAX_RANK).to(tl.int64) * IN_FEATURES
            for k in range(0, SPLIT_K, BLOCK_K):  # constant bounds: the interpreter takes no tensor in range()
                cols = split * SPLIT_K + k + tl.arange(0, BLOCK_K)
                x = tl.load(x_rows + cols[None, :], mask=in_slot[:, None] & (cols[None, :] < IN_FEATURES),
                            other=0.0)  # [BLOCK_T, BLOCK_K]
                a = tl.load(a_rows + cols[:, None], mask=(ranks[None, :] < NUM_RANKS) & (cols[:, None] < IN_FEATURES),
                            other=0.0)  # [BLOCK_K, BLOCK_R]
                if F32_DOT:
                    acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(x, a)
    # Every split stores, even one past the end of in_features (zeros): the expand sums all of them.
    h_rows = h_ptr + (split * num_tokens + tokens.to(tl.int64))[:, None] * NUM_RANKS
    tl.store(h_rows + ranks[None, :], acc, mask=(slots >= 0)[:, None] & (ranks[None, :] < NUM_RANKS))


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["num_tokens"])
def _expand_kernel(
    h_ptr,  # [num_tokens, num_slices * max_rank] float32 contiguous: the shrink's output
    b_ptr,  # [out_features, max_loras, max_rank] contiguous
    slots_ptr,  # [num_tokens]
    out_ptr,  # [num_tokens, out_features]
    slice_starts_ptr,  # [num_slices + 1] int32: first output feature of each slice, then out_features
    num_tokens,
    stride_out,
    MAX_RANK: tl.constexpr,
    NUM_RANKS: tl.constexpr,
    MAX_LORAS: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_R: tl.constexpr,
    F32_DOT: tl.constexpr,
):
    part = tl.program_id(2)
    start = tl.load(slice_starts_ptr + part)
    end = tl.load(slice_starts_ptr + part + 1)
    cols = start + tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    # The grid covers the widest slice; narrower slices' programs past their end have nothing to do.
    if start + tl.program_id(1) * BLOCK_N < end:
        tokens = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
        slots = tl.load(slots_ptr + tokens, mask=tokens < num_tokens, other=-1)
        ranks = tl.arange(0, BLOCK_R)
        h_rows = h_ptr + tokens.to(tl.int64)[:, None] * NUM_RANKS + part * MAX_RANK
        acc = tl.zeros((BLOCK_T, BLOCK_N), dtype=tl.float32)
        for lora in range(MAX_LORAS):
            in_slot = slots == lora
            if tl.max(in_slot.to(tl.int32), 0) > 0:
                h = tl.load(h_rows + ranks[None, :], mask=in_slot[:, None] & (ranks[None, :] < MAX_RANK),
                            other=0.0)  # [BLOCK_T, BLOCK_R]
                b = tl.load(b_ptr + (cols[None, :] * MAX_LORAS + lora) * MAX_RANK + ranks[:, None],
                            mask=(cols[None, :] < end) & (ranks[:, None] < MAX_RANK), other=0.0)  # [BLOCK_R, BLOCK_N]
                if F32_DOT:
                    acc += tl.dot(h, b.to(tl.float32), input_precision="ieee")
                else:
                    acc += tl.dot(h.to(b.dtype), b)  # h rounded to the weights' dtype, as PEFT computes it
        mask = (slots >= 0)[:, None] & (cols[None, :] < end)
        out = out_ptr + tokens.to(tl.int64)[:, None] * stride_out + cols[None, :]
        base = tl.load(out, mask=mask, other=0.0)
        tl.store(out, (base.to(tl.float32) + acc).to(out_ptr.dtype.element_ty), mask=mask)


# Programs that keep an H100's 132 SMs busy; fewer token x rank blocks than this get split-K.
_TARGET_PROGRAMS = 128
# Batches above this size take the dense path (when it is cheap, see `add_lora`): larger than any decode batch that
# CUDA graphs capture, so the per-token kernels' variants are all compiled during the capture.
_DENSE_MIN_TOKENS = 512
# The dense shrink computes every slot's ranks for every token: it is taken while they are at most this fraction of
# in_features (8 slots of rank 16 next to 4096 inputs: 3% more work than the base GEMM).
_DENSE_MAX_RANK_SHARE = 1 / 16


@functools.lru_cache(maxsize=None)
def _slice_starts(output_slices: tuple[int, ...], device: torch.device) -> torch.Tensor:
    # Built once per layer shape, before any CUDA graph capture (the warm-up runs come first).
    starts = [0]
    for size in output_slices:
        starts.append(starts[-1] + size)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def _check(out, x, lora_a, lora_b, token_slots, output_slices):
    if x.dim() != 2 or out.dim() != 2 or out.shape[0] != x.shape[0]:
        raise ValueError(f"x and out must be [num_tokens, features], got {tuple(x.shape)} and {tuple(out.shape)}")
    if lora_a.dim() != 4 or lora_b.dim() != 3 or lora_a.shape[1:3] != lora_b.shape[1:3]:
        raise ValueError(f"lora_a must be [num_slices, max_loras, max_rank, in_features] and lora_b "
                         f"[out_features, max_loras, max_rank], got {tuple(lora_a.shape)} and {tuple(lora_b.shape)}")
    num_slices, _, _, in_features = lora_a.shape
    if (in_features != x.shape[1] or lora_b.shape[0] != out.shape[1] or sum(output_slices) != out.shape[1]
            or num_slices != len(output_slices)):
        raise ValueError(f"shapes disagree: x {tuple(x.shape)}, out {tuple(out.shape)}, lora_a "
                         f"{tuple(lora_a.shape)}, lora_b {tuple(lora_b.shape)}, output_slices {output_slices}")
    if token_slots.shape != (x.shape[0],) or token_slots.dtype not in (torch.int32, torch.int64):
        raise ValueError(f"token_slots must be an int [num_tokens] tensor, got {token_slots.dtype} "
                         f"{tuple(token_slots.shape)}")
    if not (x.dtype == out.dtype == lora_a.dtype == lora_b.dtype):
        raise TypeError(f"x, out, lora_a and lora_b must share a dtype, got {x.dtype}, {out.dtype}, {lora_a.dtype}, "
                        f"{lora_b.dtype}")
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {x.dtype}; expected float16, bfloat16 or float32")
    if x.stride(1) != 1 or out.stride(1) != 1 or not (lora_a.is_contiguous() and lora_b.is_contiguous()
                                                       and token_slots.is_contiguous()):
        raise ValueError("x and out need a contiguous last dimension; lora_a, lora_b and token_slots must be "
                         "contiguous")


def add_lora(
    out: torch.Tensor,  # [num_tokens, out_features], added to in place
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a: torch.Tensor,  # [num_slices, max_loras, max_rank, in_features]
    lora_b: torch.Tensor,  # [out_features, max_loras, max_rank]
    token_slots: torch.Tensor,  # [num_tokens] int32 or int64, -1: no adapter
    output_slices: tuple[int, ...],  # out_features of each slice, in order
) -> None:
    _check(out, x, lora_a, lora_b, token_slots, output_slices)
    _, max_loras, max_rank, in_features = lora_a.shape
    if x.shape[0] > _DENSE_MIN_TOKENS and max_loras * max_rank <= in_features * _DENSE_MAX_RANK_SHARE:
        _add_lora_dense(out, x, lora_a, lora_b, token_slots, output_slices)
    else:
        _add_lora_per_token(out, x, lora_a, lora_b, token_slots, output_slices)


def add_lora_dense(out, x, lora_a, lora_b, token_slots, output_slices) -> None:
    """`add_lora` by the dense path whatever the batch size (tests compare it with the reference)."""
    _check(out, x, lora_a, lora_b, token_slots, output_slices)
    _add_lora_dense(out, x, lora_a, lora_b, token_slots, output_slices)


def _add_lora_dense(out, x, lora_a, lora_b, token_slots, output_slices) -> None:
    num_tokens = x.shape[0]
    num_slices, max_loras, max_rank, in_features = lora_a.shape
    # h rounded to the weights' dtype, as PEFT computes it; the mask zeroes every slot but the token's own.
    h = torch.nn.functional.linear(x, lora_a.view(-1, in_features)).view(num_tokens, num_slices, max_loras, max_rank)
    own_slot = token_slots[:, None] == torch.arange(max_loras, device=x.device, dtype=token_slots.dtype)
    h.mul_(own_slot.to(h.dtype)[:, None, :, None])
    start = 0
    for i, size in enumerate(output_slices):
        # Strided views, no copies: h's slice i is [num_tokens, max_loras * max_rank] with a longer row stride,
        # B's rows of the slice are one contiguous [size, max_loras * max_rank] block.
        out[:, start:start + size].addmm_(h[:, i].reshape(num_tokens, max_loras * max_rank),
                                          lora_b[start:start + size].view(size, max_loras * max_rank).T)
        start += size


def _add_lora_per_token(out, x, lora_a, lora_b, token_slots, output_slices) -> None:
    num_tokens = x.shape[0]
    if num_tokens == 0:
        return
    num_slices, max_loras, max_rank, in_features = lora_a.shape
    num_ranks = num_slices * max_rank
    f32_dot = _INTERPRET or x.dtype == torch.float32
    # Decode batches are small: 16-token blocks waste less on masked rows; prefill takes bigger tiles.
    block_t = 16 if num_tokens <= 64 else 64
    block_r = max(16, min(64, triton.next_power_of_2(num_ranks)))
    block_k = 64 if f32_dot else 128
    num_blocks = triton.cdiv(num_tokens, block_t) * triton.cdiv(num_ranks, block_r)
    num_k_blocks = triton.cdiv(in_features, block_k)
    # A power of two, so that few (shape-only, CUDA-graph-safe) variants get compiled; none above the largest
    # captured batch, whose sizes vary step by step (each new variant would compile mid-run).
    num_splits = 1
    if num_tokens <= _DENSE_MIN_TOKENS:
        num_splits = min(_prev_power_of_2(num_k_blocks),
                         triton.next_power_of_2(triton.cdiv(_TARGET_PROGRAMS, num_blocks)))
    split_k = triton.cdiv(num_k_blocks, num_splits) * block_k
    h = torch.empty(num_splits, num_tokens, num_ranks, dtype=torch.float32, device=x.device)
    _shrink_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(num_ranks, block_r), num_splits)](
        x, lora_a, token_slots, h, num_tokens, x.stride(0),
        NUM_RANKS=num_ranks, MAX_RANK=max_rank, IN_FEATURES=in_features, MAX_LORAS=max_loras, BLOCK_T=block_t,
        BLOCK_R=block_r, BLOCK_K=block_k, SPLIT_K=split_k, F32_DOT=f32_dot, num_warps=4,
    )
    # One small reduction here, rather than every expand program (one per 64 output columns) summing the splits
    # again: at decode sizes that re-reading cost more than the expand's own work.
    h = h[0] if num_splits == 1 else h.sum(dim=0)
    block_n = 64
    _expand_kernel[(triton.cdiv(num_tokens, block_t), triton.cdiv(max(output_slices), block_n), len(output_slices))](
        h, lora_b, token_slots, out, _slice_starts(tuple(output_slices), x.device), num_tokens, out.stride(0),
        MAX_RANK=max_rank, NUM_RANKS=num_ranks, MAX_LORAS=max_loras,
        BLOCK_T=block_t, BLOCK_N=block_n, BLOCK_R=max(16, triton.next_power_of_2(max_rank)),
        F32_DOT=f32_dot, num_warps=4,
    )


def _prev_power_of_2(n: int) -> int:
    return 1 << (n.bit_length() - 1)
