"""Rotary position embedding applied in place to the query and key of each token.

One program per token: it loads the token's cos/sin row once and rotates every query and key head. Neox style
rotates halves (x[:r/2], x[r/2:r]); the interleaved (GPT-J) style rotates pairs (x[0::2], x[1::2]). Only the first
rotary_dim features of each head are touched. Computed in float32, cast once. The reference is
`kernels.reference.rotary_embedding`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rotate_heads(x_ptr, stride_h, cos, sin, offs_r, r_mask,
                  NUM_HEADS: tl.constexpr, HEADS_PAD: tl.constexpr, HALF: tl.constexpr, IS_NEOX: tl.constexpr):
    """Rotates the first 2 * HALF features of NUM_HEADS heads starting at x_ptr (one token) in place."""
    offs_h = tl.arange(0, HEADS_PAD)
    mask = (offs_h < NUM_HEADS)[:, None] & r_mask[None, :]  # [HEADS_PAD, HALF_PAD]
    if IS_NEOX:
        first, second = offs_r, offs_r + HALF
    else:
        first, second = 2 * offs_r, 2 * offs_r + 1
    p1 = x_ptr + offs_h[:, None] * stride_h + first[None, :]
    p2 = x_ptr + offs_h[:, None] * stride_h + second[None, :]
    x1 = tl.load(p1, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(p2, mask=mask, other=0.0).to(tl.float32)
    tl.store(p1, (x1 * cos[None, :] - x2 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(p2, (x2 * cos[None, :] + x1 * sin[None, :]).to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rotate_token(
    token, positions_ptr, q_ptr, k_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr,
):
    """Rotates every query and key head of one token in place."""
    pos = tl.load(positions_ptr + token).to(tl.int64)
    offs_r = tl.arange(0, HALF_PAD)
    r_mask = offs_r < HALF
    cos = tl.load(cos_sin_ptr + pos * stride_cache + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    sin = tl.load(cos_sin_ptr + pos * stride_cache + HALF + offs_r, mask=r_mask, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * stride_qt, stride_qh, cos, sin, offs_r, r_mask,
                  NUM_Q_HEADS, Q_HEADS_PAD, HALF, IS_NEOX)
    _rotate_heads(k_ptr + token * stride_kt, stride_kh, cos, sin, offs_r, r_mask,
                  NUM_K_HEADS, K_HEADS_PAD, HALF, IS_NEOX)


@triton.jit
def _rotary_kernel(
    positions_ptr,  # [num_tokens] int64
    q_ptr,  # [num_tokens, num_heads, head_size]
    k_ptr,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_ptr,  # [max_position, rotary_dim] float32: cos | sin
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_cache,
    NUM_Q_HEADS: tl.constexpr,
    NUM_K_HEADS: tl.constexpr,
    Q_HEADS_PAD: tl.constexpr,
    K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr,  # rotary_dim / 2
    HALF_PAD: tl.constexpr,
    IS_NEOX: tl.constexpr,
):
    _rotate_token(tl.program_id(0).to(tl.int64), positions_ptr, q_ptr, k_ptr, cos_sin_ptr,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                  NUM_Q_HEADS, NUM_K_HEADS, Q_HEADS_PAD, K_HEADS_PAD, HALF, HALF_PAD, IS_NEOX)


def check_rotary(positions: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                 cos_sin_cache: torch.Tensor) -> tuple[dict, int]:
    """Validates `rotary_embedding`'s arguments; returns the kernel's constexpr arguments and warp count."""
    if query.dim() != 3 or key.dim() != 3:
        raise ValueError(f"query and key must be [num_tokens, heads, head_size], got {tuple(query.shape)} "
                         f"and {tuple(key.shape)}")
    num_tokens = query.shape[0]
    if key.shape[0] != num_tokens or positions.shape != (num_tokens,):
        raise ValueError(f"query, key and positions must agree on num_tokens: {tuple(query.shape)}, "
                         f"{tuple(key.shape)}, {tuple(positions.shape)}")
    if positions.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"positions must be int64, got {positions.dtype}")
    rotary_dim = cos_sin_cache.shape[-1] if cos_sin_cache.dim() == 2 else -1
    if rotary_dim <= 0 or rotary_dim % 2 or rotary_dim > min(query.shape[2], key.shape[2]):
        raise ValueError(f"cos_sin_cache must be [max_position, rotary_dim] with an even rotary_dim no larger than "
                         f"head_size, got {tuple(cos_sin_cache.shape)} for head sizes {query.shape[2]}, "
                         f"{key.shape[2]}")
    if query.dtype != key.dtype or query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"query and key must share a float16, bfloat16 or float32 dtype, got {query.dtype}, "
                        f"{key.dtype}")
    for name, t in (("query", query), ("key", key), ("cos_sin_cache", cos_sin_cache), ("positions", positions)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a unit stride in its last dimension, got strides {t.stride()}")
    half = rotary_dim // 2
    num_q_heads, num_k_heads = query.shape[1], key.shape[1]
    q_heads_pad, k_heads_pad = triton.next_power_of_2(num_q_heads), triton.next_power_of_2(num_k_heads)
    constants = dict(NUM_Q_HEADS=num_q_heads, NUM_K_HEADS=num_k_heads, Q_HEADS_PAD=q_heads_pad,
                     K_HEADS_PAD=k_heads_pad, HALF=half, HALF_PAD=triton.next_power_of_2(half))
    return constants, 4 if q_heads_pad * triton.next_power_of_2(half) <= 2048 else 8


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos in the first half, sin in the second
    is_neox: bool,
) -> None:
    constants, num_warps = check_rotary(positions, query, key, cos_sin_cache)
    num_tokens = query.shape[0]
    if num_tokens == 0:
        return
    _rotary_kernel[(num_tokens,)](
        positions, query, key, cos_sin_cache,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), cos_sin_cache.stride(0),
        **constants, IS_NEOX=bool(is_neox), num_warps=num_warps,
    )
