"""Scatter this step's keys and values into the paged KV cache by slot (`slot = block_id * block_size + offset`);
`rotary_store_kv` first rotates the step's queries and keys in place (RoPE, `kernels.rotary`), in the same launch.

One program per token writes all of its KV heads; a negative slot marks a padded token and is skipped. Fusing the
rotation saves a launch per layer, which at batch-1 decode is most of the two kernels' time. An fp8 cache stores
x / scale (per-layer k_scale, v_scale; float32, correctly rounded division, saturated to the type's range). The
references are `kernels.reference.store_kv` and `kernels.reference.rotary_store_kv`.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from engine.kernels.reference import FP8_KV_MAX
from engine.kernels.rotary import _rotate_token, check_rotary

# The interpreter's float -> fp8 conversion drops the carry when rounding up overflows the mantissa (125.9 becomes 64,
# not 128) and rounds ties away from zero; there values are first rounded onto the fp8 grid, so that it is exact.
_INTERPRET = tl.constexpr(os.environ.get("TRITON_INTERPRET", "0") == "1")


@triton.jit
def _round_to_fp8_grid(x, FP8_MAX: tl.constexpr):
    """float32 x rounded (to nearest, ties to even) to the nearest value of the fp8 type of range FP8_MAX."""
    if FP8_MAX == 448.0:  # e4m3: 3 mantissa bits, smallest normal exponent -6
        mantissa_bits: tl.constexpr = 3
        min_exponent: tl.constexpr = -6
    else:  # e5m2: 2 mantissa bits, smallest normal exponent -14
        mantissa_bits: tl.constexpr = 2
        min_exponent: tl.constexpr = -14
    exponent = tl.maximum(((x.to(tl.int32, bitcast=True) >> 23) & 0xFF) - 127, min_exponent)
    ulp = ((exponent - mantissa_bits + 127) << 23).to(tl.float32, bitcast=True)
    magic = ulp * 12582912.0  # 1.5 * 2**23 ulps: float32 addition rounds x to a multiple of ulp
    return (x + magic) - magic


@triton.jit
def _quantize(x, scale, FP8_MAX: tl.constexpr):
    """x / scale for an fp8 cache (FP8_MAX > 0), saturated; x itself otherwise."""
    if FP8_MAX > 0:
        x = tl.math.div_rn(x.to(tl.float32), scale)  # rounded as the reference's division is
        x = tl.minimum(tl.maximum(x, -FP8_MAX), FP8_MAX)
        if _INTERPRET:
            x = _round_to_fp8_grid(x, FP8_MAX)
    return x


@triton.jit
def _store_token(
    token, key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, k_scale, v_scale,
    NUM_HEADS: tl.constexpr, HEAD_SIZE: tl.constexpr, HEADS_PAD: tl.constexpr, HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, FP8_MAX: tl.constexpr,
):
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:
        block = slot // BLOCK_SIZE
        in_block = slot % BLOCK_SIZE
        offs_h = tl.arange(0, HEADS_PAD)
        offs_d = tl.arange(0, HEAD_PAD)
        mask = (offs_h < NUM_HEADS)[:, None] & (offs_d < HEAD_SIZE)[None, :]  # [HEADS_PAD, HEAD_PAD]
        k = tl.load(key_ptr + token * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :], mask=mask)
        v = tl.load(value_ptr + token * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :], mask=mask)
        k_dst = key_cache_ptr + block * stride_kcb + in_block * stride_kcs
        v_dst = value_cache_ptr + block * stride_vcb + in_block * stride_vcs
        tl.store(k_dst + offs_h[:, None] * stride_kch + offs_d[None, :],
                 _quantize(k, k_scale, FP8_MAX).to(key_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_dst + offs_h[:, None] * stride_vch + offs_d[None, :],
                 _quantize(v, v_scale, FP8_MAX).to(value_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _store_kv_kernel(
    key_ptr,  # [num_tokens, num_kv_heads, head_size]
    value_ptr,  # [num_tokens, num_kv_heads, head_size]
    key_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping_ptr,  # [num_tokens] int64
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    k_scale, v_scale,
    NUM_HEADS: tl.constexpr,
    HEAD_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    FP8_MAX: tl.constexpr,  # > 0: the cache is fp8 of that range
):
    _store_token(tl.program_id(0).to(tl.int64), key_ptr, value_ptr, key_cache_ptr, value_cache_ptr,
                 slot_mapping_ptr, stride_kt, stride_kh, stride_vt, stride_vh,
                 stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, k_scale, v_scale,
                 NUM_HEADS, HEAD_SIZE, HEADS_PAD, HEAD_PAD, BLOCK_SIZE, FP8_MAX)


@triton.jit
def _rotary_store_kv_kernel(
    positions_ptr, q_ptr, key_ptr, value_ptr, cos_sin_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
    stride_qt, stride_qh,
    stride_kt, stride_kh,
    stride_vt, stride_vh,
    stride_cache,
    stride_kcb, stride_kcs, stride_kch,
    stride_vcb, stride_vcs, stride_vch,
    k_scale, v_scale,
    NUM_Q_HEADS: tl.constexpr, NUM_K_HEADS: tl.constexpr, Q_HEADS_PAD: tl.constexpr, K_HEADS_PAD: tl.constexpr,
    HALF: tl.constexpr, HALF_PAD: tl.constexpr, IS_NEOX: tl.constexpr,
    HEAD_SIZE: tl.constexpr, HEAD_PAD: tl.constexpr, BLOCK_SIZE: tl.constexpr, FP8_MAX: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    _rotate_token(token, positions_ptr, q_ptr, key_ptr, cos_sin_ptr,
                  stride_qt, stride_qh, stride_kt, stride_kh, stride_cache,
                  NUM_Q_HEADS, NUM_K_HEADS, Q_HEADS_PAD, K_HEADS_PAD, HALF, HALF_PAD, IS_NEOX)
    tl.debug_barrier()  # the rotated keys, written by other threads of this program, are read back below
    _store_token(token, key_ptr, value_ptr, key_cache_ptr, value_cache_ptr, slot_mapping_ptr,
                 stride_kt, stride_kh, stride_vt, stride_vh,
                 stride_kcb, stride_kcs, stride_kch, stride_vcb, stride_vcs, stride_vch, k_scale, v_scale,
                 NUM_K_HEADS, HEAD_SIZE, K_HEADS_PAD, HEAD_PAD, BLOCK_SIZE, FP8_MAX)


def _check_store(key, value, key_cache, value_cache, slot_mapping) -> None:
    if key.dim() != 3 or value.shape != key.shape:
        raise ValueError(f"key and value must both be [num_tokens, num_kv_heads, head_size], got "
                         f"{tuple(key.shape)} and {tuple(value.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, head_size], "
                         f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    num_tokens, num_heads, head_size = key.shape
    if tuple(key_cache.shape[2:]) != (num_heads, head_size):
        raise ValueError(f"cache heads/head_size {tuple(key_cache.shape[2:])} differ from key's "
                         f"{(num_heads, head_size)}")
    if slot_mapping.shape != (num_tokens,) or slot_mapping.dtype not in (torch.int64, torch.int32):
        raise ValueError(f"slot_mapping must be [num_tokens] int64, got {tuple(slot_mapping.shape)} "
                         f"{slot_mapping.dtype}")
    for name, t in (("key", key), ("value", value), ("key_cache", key_cache), ("value_cache", value_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_size) dimension, got strides {t.stride()}")
    if not slot_mapping.is_contiguous():
        raise ValueError("slot_mapping must be contiguous")


def _cache_args(key_cache: torch.Tensor, value_cache: torch.Tensor, k_scale: float, v_scale: float) -> tuple:
    """The caches' strides, then the scales (1.0 for a cache that is not fp8: it ignores them)."""
    fp8 = key_cache.dtype in FP8_KV_MAX
    return (key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
            value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
            float(k_scale) if fp8 else 1.0, float(v_scale) if fp8 else 1.0)


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; a negative slot marks a padded token and is skipped
    k_scale: float = 1.0,  # an fp8 cache holds key / k_scale; other caches ignore the scales
    v_scale: float = 1.0,
) -> None:
    _check_store(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, num_heads, head_size = key.shape
    if num_tokens == 0:
        return
    heads_pad, head_pad = triton.next_power_of_2(num_heads), triton.next_power_of_2(head_size)
    _store_kv_kernel[(num_tokens,)](
        key, value, key_cache, value_cache, slot_mapping,
        key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        *_cache_args(key_cache, value_cache, k_scale, v_scale),
        NUM_HEADS=num_heads, HEAD_SIZE=head_size, HEADS_PAD=heads_pad, HEAD_PAD=head_pad,
        BLOCK_SIZE=key_cache.shape[1], FP8_MAX=FP8_KV_MAX.get(key_cache.dtype, 0.0),
        num_warps=4 if heads_pad * head_pad <= 2048 else 8,
    )


def rotary_store_kv(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size], rotated in place, then stored
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos in the first half, sin in the second
    is_neox: bool,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    slot_mapping: torch.Tensor,  # [num_tokens] int64; a negative slot marks a padded token and is not stored
    k_scale: float = 1.0,  # as in store_kv
    v_scale: float = 1.0,
) -> None:
    constants, num_warps = check_rotary(positions, query, key, cos_sin_cache)
    _check_store(key, value, key_cache, value_cache, slot_mapping)
    num_tokens, _, head_size = key.shape
    if num_tokens == 0:
        return
    _rotary_store_kv_kernel[(num_tokens,)](
        positions, query, key, value, cos_sin_cache, key_cache, value_cache, slot_mapping,
        query.stride(0), query.stride(1), key.stride(0), key.stride(1), value.stride(0), value.stride(1),
        cos_sin_cache.stride(0), *_cache_args(key_cache, value_cache, k_scale, v_scale),
        **constants, IS_NEOX=bool(is_neox), HEAD_SIZE=head_size, HEAD_PAD=triton.next_power_of_2(head_size),
        BLOCK_SIZE=key_cache.shape[1], FP8_MAX=FP8_KV_MAX.get(key_cache.dtype, 0.0), num_warps=num_warps,
    )
