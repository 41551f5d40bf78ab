"""Paged attention for a mixed batch: decode rows and chunked-prefill rows in one launch, K/V read through block tables.

One program owns one *q block* (up to BLOCK_Q consecutive query tokens of one sequence) for one KV head, and all
GROUP = num_heads / num_kv_heads query heads that share that KV head: its BLOCK_M = BLOCK_Q * GROUP rows are
(token, head) pairs, so each K/V tile is loaded once for the whole group. Programs find their sequence by binary
search over `query_start_loc`, so the grid depends on tensor shapes only (no host sync; CUDA-graph safe).

Split-K (flash-decoding): when the batch has too few (q block, KV head) pairs to fill the GPU, axis 2 of the grid
splits each q block's KV range into NUM_SPLITS segments. Each writes an unnormalized float32 partial (acc, running max
m, running sum l); `_combine_kernel` merges them. Scores live in the log2 domain (scaled by log2(e)) so the softmax
uses exp2. Online softmax and accumulation are float32.

An fp8 cache (holding K / k_scale and V / v_scale) is widened to the query's dtype as each tile is loaded (exact:
e4m3 and e5m2 fit in fp16 and bf16); its dequantization is folded into the float32 math: k_scale into the score
scale, v_scale into the accumulator as it is written.

The reference is `kernels.reference.paged_attention`; this file holds only the kernels and their launcher.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl

from engine.kernels.reference import FP8_KV_MAX

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
_MAX_SPLITS = 64
# A split covers at least this many keys of the longest possible context (the interpreter's tiny "GPU" splits short
# test contexts too, so that the CPU tests exercise split-K).
_MIN_SPLIT_TOKENS = 16 if _INTERPRET else 64
# Block tables this long (tokens) take the long-prefill tiles on GPUs with this much shared memory per program.
_LONG_PREFILL_CONTEXT = 16384
_LONG_PREFILL_SHARED_MEMORY = 200 * 1024


@triton.jit
def _find_seq(query_start_loc_ptr, q_block_idx, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose q blocks include `q_block_idx`; sequence s's q blocks start at qsl[s] // BLOCK_Q + s."""
    lo: tl.int32 = 0
    hi = num_seqs
    while lo < hi:
        mid = (lo + hi) // 2
        first_block = tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid
        if first_block <= q_block_idx:
            lo = mid + 1
        else:
            hi = mid
    return lo - 1


@triton.jit
def _attend_tile(
    tile, q, m_i, l_i, acc,  # acc: [BLOCK_M, HEAD_PAD] float32; m_i, l_i: [BLOCK_M] float32 (log2 domain)
    query_pos, key_start, key_end, block_table, k_head, v_head, offs_n, offs_d, d_valid,
    stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, cap_log2, sliding_window,
    BLOCK_SIZE: tl.constexpr, TILE_N: tl.constexpr, USE_SOFT_CAP: tl.constexpr, USE_WINDOW: tl.constexpr,
    IEEE_DOT: tl.constexpr, MASKED: tl.constexpr,
):
    """One KV tile of the online softmax; returns the updated (m_i, l_i, acc). An unmasked tile (every key in range
    and visible to every row of the q block) skips the masks: most tiles of a long prefill are such."""
    key_pos = tile * TILE_N + offs_n  # [TILE_N]
    in_block = key_pos % BLOCK_SIZE
    if MASKED:
        key_valid = (key_pos < key_end) & (key_pos >= key_start)
        block = tl.load(block_table + key_pos // BLOCK_SIZE, mask=key_valid, other=0).to(tl.int64)
        kv_mask = key_valid[:, None] & d_valid[None, :]
    else:
        block = tl.load(block_table + key_pos // BLOCK_SIZE).to(tl.int64)
        kv_mask = d_valid[None, :]
    k = tl.load(k_head + (block * stride_kb + in_block * stride_ks)[:, None] + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [TILE_N, HEAD_PAD]
    v = tl.load(v_head + (block * stride_vb + in_block * stride_vs)[:, None] + offs_d[None, :],
                mask=kv_mask, other=0.0)  # [TILE_N, HEAD_PAD]
    # To the query's dtype: float32 in the interpreter; widens an fp8 cache; a no-op otherwise.
    k = k.to(q.dtype)
    v = v.to(q.dtype)

    if IEEE_DOT:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")  # [BLOCK_M, TILE_N]
    else:
        s = tl.dot(q, tl.trans(k))
    if USE_SOFT_CAP:
        # cap * tanh(s / cap) with tanh(x) = 1 - 2 / (exp(2x) + 1): no libdevice in the interpreter
        x = s * qk_scale
        s = cap_log2 * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))
    else:
        s = s * qk_scale
    if MASKED:
        visible = (key_pos[None, :] <= query_pos[:, None]) & key_valid[None, :]
        if USE_WINDOW:
            visible = visible & (key_pos[None, :] > query_pos[:, None] - sliding_window)
        s = tl.where(visible, s, float("-inf"))

    m_new = tl.maximum(m_i, tl.max(s, 1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a row with nothing visible yet keeps p = 0
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    if IEEE_DOT:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return m_new, l_i, acc


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["num_seqs", "num_tokens"])
def _paged_attention_kernel(
    q_ptr,  # [num_tokens, num_heads, head_size]
    k_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    v_cache_ptr,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables_ptr,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens_ptr,  # [num_seqs] int32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    out_ptr,  # [num_tokens, num_heads, head_size]
    part_acc_ptr,  # [NUM_SPLITS, num_tokens, num_heads, HEAD_PAD] float32 (split-K only)
    part_m_ptr,  # [NUM_SPLITS, num_tokens, num_heads] float32 (split-K only)
    part_l_ptr,  # [NUM_SPLITS, num_tokens, num_heads] float32 (split-K only)
    scale,
    soft_cap,
    sliding_window,
    k_scale,  # an fp8 cache's scales (1.0 otherwise)
    v_scale,
    num_seqs,
    num_tokens,
    num_heads,
    stride_qt, stride_qh,
    stride_kb, stride_ks, stride_kh,
    stride_vb, stride_vs, stride_vh,
    stride_bt,
    stride_ot, stride_oh,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    GROUP: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    TILE_N: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    USE_SOFT_CAP: tl.constexpr,
    USE_WINDOW: tl.constexpr,
    INTERPRET: tl.constexpr,  # bf16 dots are wrong in the interpreter, so there every dot runs in float32
    IEEE_DOT: tl.constexpr,  # float32 inputs: full-precision dots instead of tf32
    FP8_KV: tl.constexpr,
):
    q_block_idx = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    seq = _find_seq(query_start_loc_ptr, q_block_idx, num_seqs, BLOCK_Q)
    q_start = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    local_block = q_block_idx - (q_start // BLOCK_Q + seq)
    if local_block * BLOCK_Q >= q_len:
        return  # the grid is an upper bound on the number of q blocks
    seq_len = tl.load(seq_lens_ptr + seq)
    context_len = seq_len - q_len  # the queries are the sequence's last q_len positions

    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_PAD)
    offs_n = tl.arange(0, TILE_N)
    row_tok = local_block * BLOCK_Q + offs_m // GROUP  # [BLOCK_M] query index within the sequence
    row_head = kv_head * GROUP + offs_m % GROUP  # [BLOCK_M] query head
    row_valid = (offs_m < BLOCK_Q * GROUP) & (row_tok < q_len)
    d_valid = offs_d < HEAD_SIZE
    token = (q_start + row_tok).to(tl.int64)  # [BLOCK_M] row in query/out
    query_pos = context_len + row_tok  # [BLOCK_M] position of each row's query in its sequence

    q_mask = row_valid[:, None] & d_valid[None, :]
    q = tl.load(q_ptr + token[:, None] * stride_qt + row_head[:, None] * stride_qh + offs_d[None, :],
                mask=q_mask, other=0.0)  # [BLOCK_M, HEAD_PAD]
    if INTERPRET:
        q = q.to(tl.float32)

    # Keys this q block may see: [key_start, key_end).
    key_end = tl.minimum(context_len + (local_block + 1) * BLOCK_Q, seq_len)
    key_start = 0
    if USE_WINDOW:
        key_start = tl.maximum(context_len + local_block * BLOCK_Q - sliding_window + 1, 0)
    tile_lo = key_start // TILE_N
    tile_hi = tl.cdiv(key_end, TILE_N)
    if NUM_SPLITS > 1:
        tiles_per_split = tl.cdiv(tile_hi - tile_lo, NUM_SPLITS)
        tile_lo = tile_lo + split * tiles_per_split
        tile_hi = tl.minimum(tile_lo + tiles_per_split, tile_hi)

    if USE_SOFT_CAP:
        qk_scale = scale * k_scale / soft_cap
    else:
        qk_scale = scale * k_scale * 1.4426950408889634
    cap_log2 = soft_cap * 1.4426950408889634

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_PAD], dtype=tl.float32)
    block_table = block_tables_ptr + seq.to(tl.int64) * stride_bt
    k_head = k_cache_ptr + kv_head * stride_kh
    v_head = v_cache_ptr + kv_head * stride_vh

    # Tiles below `open_hi` hold keys every row of the q block sees (its first query's position and all before it):
    # they run without masks. A sliding window cuts rows differently, so there every tile is masked.
    open_hi = tile_lo
    if not USE_WINDOW:
        open_hi = tl.maximum(tl.minimum((context_len + local_block * BLOCK_Q + 1) // TILE_N, tile_hi), tile_lo)
    if INTERPRET:
        # The interpreter's scalars are 1-element arrays that numpy >= 2.4 refuses as range() bounds.
        tile = tile_lo
        while tile < tile_hi:
            m_i, l_i, acc = _attend_tile(
                tile, q, m_i, l_i, acc, query_pos, key_start, key_end, block_table, k_head, v_head, offs_n, offs_d,
                d_valid, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, cap_log2, sliding_window,
                BLOCK_SIZE, TILE_N, USE_SOFT_CAP, USE_WINDOW, False, tile >= open_hi)
            tile += 1
    else:
        for tile in range(tile_lo, open_hi):
            m_i, l_i, acc = _attend_tile(
                tile, q, m_i, l_i, acc, query_pos, key_start, key_end, block_table, k_head, v_head, offs_n, offs_d,
                d_valid, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, cap_log2, sliding_window,
                BLOCK_SIZE, TILE_N, USE_SOFT_CAP, USE_WINDOW, IEEE_DOT, False)
        for tile in range(open_hi, tile_hi):
            m_i, l_i, acc = _attend_tile(
                tile, q, m_i, l_i, acc, query_pos, key_start, key_end, block_table, k_head, v_head, offs_n, offs_d,
                d_valid, stride_kb, stride_ks, stride_vb, stride_vs, qk_scale, cap_log2, sliding_window,
                BLOCK_SIZE, TILE_N, USE_SOFT_CAP, USE_WINDOW, IEEE_DOT, True)

    if FP8_KV:
        acc = acc * v_scale  # the split-K partials are combined linearly, so each may carry the scale
    if NUM_SPLITS == 1:
        out = acc / tl.where(l_i == 0.0, 1.0, l_i)[:, None]
        tl.store(out_ptr + token[:, None] * stride_ot + row_head[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=q_mask)
    else:
        row = (split * num_tokens + token) * num_heads + row_head  # [BLOCK_M] int64
        tl.store(part_acc_ptr + row[:, None] * HEAD_PAD + offs_d[None, :], acc, mask=row_valid[:, None])
        tl.store(part_m_ptr + row, m_i, mask=row_valid)
        tl.store(part_l_ptr + row, l_i, mask=row_valid)


# Step sizes vary: one compiled variant for all of them (a variant compiled mid-run stalls the GPU).
@triton.jit(do_not_specialize=["num_seqs", "num_tokens"])
def _combine_kernel(
    out_ptr,  # [num_tokens, num_heads, head_size]
    part_acc_ptr,  # [NUM_SPLITS, num_tokens, num_heads, HEAD_PAD] float32
    part_m_ptr,  # [NUM_SPLITS, num_tokens, num_heads] float32, log2 domain
    part_l_ptr,  # [NUM_SPLITS, num_tokens, num_heads] float32
    query_start_loc_ptr,  # [num_seqs + 1] int32
    num_seqs,
    num_tokens,
    num_heads,
    stride_ot, stride_oh,
    HEAD_SIZE: tl.constexpr,
    HEAD_PAD: tl.constexpr,
    NUM_SPLITS: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    token = tl.program_id(0)
    head = tl.program_id(1)
    if token < tl.load(query_start_loc_ptr) or token >= tl.load(query_start_loc_ptr + num_seqs):
        return  # padding rows stay untouched
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_PAD)
    s_valid = offs_s < NUM_SPLITS
    row = (offs_s.to(tl.int64) * num_tokens + token) * num_heads + head  # [SPLITS_PAD]
    m = tl.load(part_m_ptr + row, mask=s_valid, other=float("-inf"))
    l = tl.load(part_l_ptr + row, mask=s_valid, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)
    w = tl.exp2(m - m_max)  # [SPLITS_PAD]; an empty split has m = -inf, so w = 0
    total = tl.sum(w * l, 0)
    acc = tl.load(part_acc_ptr + row[:, None] * HEAD_PAD + offs_d[None, :], mask=s_valid[:, None], other=0.0)
    out = tl.sum(acc * w[:, None], 0) / tl.where(total == 0.0, 1.0, total)  # [HEAD_PAD]
    tl.store(out_ptr + token.to(tl.int64) * stride_ot + head * stride_oh + offs_d,
             out.to(out_ptr.dtype.element_ty), mask=offs_d < HEAD_SIZE)


@functools.lru_cache(maxsize=None)
def _num_sms(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 4  # interpreter: a tiny "GPU", so that small test batches exercise split-K


def _config(num_tokens: int, num_seqs: int, num_kv_heads: int, group: int, head_pad: int, max_context: int,
            device: torch.device, element_size: int = 2) -> dict:
    """Block shapes, split count and warps from tensor shapes alone (no host sync), so CUDA graphs can capture it.

    Chosen from `python bench/kernel_speed.py --sweep` on an H100 (Llama-3.1-8B shapes, bf16): decode 64 x 2048 ran best
    with 64-key tiles, 4 warps, 3 stages and no split; few long decodes with 128-key tiles and a power-of-two split
    count giving about 4 programs per SM; a single short decode (256 or 1024 keys) with splits of 64 keys in one
    64-key tile (10.9 us against 13.0 unsplit at 256 keys, 14.6 against 16.0 with 4 splits at 1024). Prefill swept
    again on an H200 (`--sweep --cases prefill`, twelfth session): 64-row q blocks, 64-key tiles, 4 warps, 2 stages,
    except for long contexts (below).
    """
    maybe_decode = num_tokens <= num_seqs  # every sequence may have a single query
    block_m = max(16 if maybe_decode else 64, triton.next_power_of_2(group))
    block_q = block_m // group
    # Split-K when (q block, KV head) pairs alone leave the GPU mostly idle. The estimate counts real q blocks
    # (decode: one per sequence) rather than the grid's upper bound.
    programs = max(triton.cdiv(num_tokens, block_q), num_seqs) * num_kv_heads
    target = 2 * _num_sms(device)
    num_splits = 1
    if programs < target:
        # No more splits than the longest context the block tables can hold fills: with a short max_model_len the
        # combine kernel would cost more than the split saves.
        most = max(1, triton.cdiv(max_context, _MIN_SPLIT_TOKENS))
        num_splits = min(_MAX_SPLITS, triton.next_power_of_2(triton.cdiv(target, programs)), most)
        num_splits = 1 << (num_splits.bit_length() - 1)  # a power of two
    if head_pad > 128:
        tile_n, num_stages = (64 if maybe_decode else 32), 2
    elif maybe_decode and num_splits > 1:
        # Splits of a few hundred keys and more: fewer, larger tiles; short splits: one or two 64-key tiles each.
        tile_n, num_stages = (128 if max_context >= 256 * num_splits else 64), 2
    elif maybe_decode:
        tile_n, num_stages = 64, 3
    elif (max_context >= _LONG_PREFILL_CONTEXT and element_size <= 2
          and _shared_memory(device) >= _LONG_PREFILL_SHARED_MEMORY):
        # Long prompts: chunks attend to thousands of cached keys through unmasked tiles, where 128 x 128 tiles
        # on 8 warps win (397 against 370 TFLOP/s for an 8192-token chunk at 32k on an H200); on short prompts
        # they lose (225 against 253 for 8 x 1024), so the table's capacity picks them.
        return dict(block_m=max(128, block_m), tile_n=128, num_splits=num_splits, num_warps=8, num_stages=3)
    else:
        tile_n, num_stages = 64, 2  # two stages beat three on every prefill shape swept (H200: +6 to +11%)
    return dict(block_m=block_m, tile_n=tile_n, num_splits=num_splits, num_warps=4, num_stages=num_stages)


@functools.lru_cache(maxsize=None)
def _shared_memory(device: torch.device) -> int:
    """Bytes of shared memory one program may use (the long-prefill tiles need Hopper's 227 KiB)."""
    if device.type == "cuda":
        return getattr(torch.cuda.get_device_properties(device), "shared_memory_per_block_optin", 0)
    return 0


def _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out):
    if query.dim() != 3:
        raise ValueError(f"query must be [num_tokens, num_heads, head_size], got shape {tuple(query.shape)}")
    if key_cache.dim() != 4 or value_cache.shape != key_cache.shape:
        raise ValueError("key_cache and value_cache must both be [num_blocks, block_size, num_kv_heads, head_size], "
                         f"got {tuple(key_cache.shape)} and {tuple(value_cache.shape)}")
    num_heads, head_size = query.shape[1], query.shape[2]
    num_kv_heads = key_cache.shape[2]
    if key_cache.shape[3] != head_size:
        raise ValueError(f"head_size differs: query {head_size}, cache {key_cache.shape[3]}")
    if num_heads % num_kv_heads != 0:
        raise ValueError(f"num_heads ({num_heads}) must be a multiple of num_kv_heads ({num_kv_heads})")
    if key_cache.dtype != value_cache.dtype or key_cache.dtype not in (query.dtype, *FP8_KV_MAX):
        raise TypeError(f"query, key_cache and value_cache must share a dtype (or both caches be fp8), got "
                        f"{query.dtype}, {key_cache.dtype}, {value_cache.dtype}")
    if query.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise TypeError(f"unsupported dtype {query.dtype}; expected float16, bfloat16 or float32")
    for name, t in (("block_tables", block_tables), ("seq_lens", seq_lens), ("query_start_loc", query_start_loc)):
        if t.dtype != torch.int32:
            raise TypeError(f"{name} must be int32, got {t.dtype}")
    if block_tables.dim() != 2 or block_tables.stride(1) != 1:
        raise ValueError("block_tables must be a 2-D [num_seqs, max_blocks_per_seq] tensor with unit column stride")
    if seq_lens.dim() != 1 or query_start_loc.shape != (seq_lens.shape[0] + 1,):
        raise ValueError(f"seq_lens must be [num_seqs] and query_start_loc [num_seqs + 1], got "
                         f"{tuple(seq_lens.shape)} and {tuple(query_start_loc.shape)}")
    if not (seq_lens.is_contiguous() and query_start_loc.is_contiguous()):
        raise ValueError("seq_lens and query_start_loc must be contiguous")
    if out.shape != query.shape or out.dtype != query.dtype:
        raise ValueError(f"out must match query: {tuple(query.shape)} {query.dtype}, "
                         f"got {tuple(out.shape)} {out.dtype}")
    for name, t in (("query", query), ("key_cache", key_cache), ("value_cache", value_cache), ("out", out)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} must have a contiguous last (head_size) dimension, got strides {t.stride()}")
    devices = {t.device for t in (query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)}
    if len(devices) != 1:
        raise ValueError(f"all tensors must be on one device, got {sorted(map(str, devices))}")


def _paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                     sliding_window=0, soft_cap=0.0, out=None, k_scale=1.0, v_scale=1.0, *, block_m=None,
                     tile_n=None, num_splits=None, num_warps=None, num_stages=None):
    """`paged_attention` with the launch configuration overridable (tests force split-K; the bench sweeps)."""
    if out is None:
        out = torch.empty_like(query)
    _check(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out)
    num_tokens, num_heads, head_size = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_seqs = seq_lens.shape[0]
    if num_tokens == 0 or num_seqs == 0:
        return out
    group = num_heads // num_kv_heads
    head_pad = max(16, triton.next_power_of_2(head_size))
    cfg = _config(num_tokens, num_seqs, num_kv_heads, group, head_pad, block_tables.shape[1] * block_size,
                  query.device, query.element_size())
    for key, value in (("block_m", block_m), ("tile_n", tile_n), ("num_splits", num_splits),
                       ("num_warps", num_warps), ("num_stages", num_stages)):
        if value is not None:
            cfg[key] = value
    block_m = max(cfg["block_m"], triton.next_power_of_2(group))
    block_q = block_m // group
    splits = cfg["num_splits"]
    if splits > 1:
        part_acc = torch.empty(splits, num_tokens, num_heads, head_pad, dtype=torch.float32, device=query.device)
        part_m = torch.empty(splits, num_tokens, num_heads, dtype=torch.float32, device=query.device)
        part_l = torch.empty_like(part_m)
    else:
        part_acc = part_m = part_l = out  # unused
    # Upper bound on q blocks: sequence s has at most qsl[s+1] // BLOCK_Q - qsl[s] // BLOCK_Q + 1 of them.
    grid = (num_tokens // block_q + num_seqs, num_kv_heads, splits)
    fp8 = key_cache.dtype in FP8_KV_MAX
    _paged_attention_kernel[grid](
        query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, out, part_acc, part_m, part_l,
        float(scale), float(soft_cap) if soft_cap > 0 else 1.0, int(sliding_window),
        float(k_scale) if fp8 else 1.0, float(v_scale) if fp8 else 1.0, num_seqs, num_tokens, num_heads,
        query.stride(0), query.stride(1),
        key_cache.stride(0), key_cache.stride(1), key_cache.stride(2),
        value_cache.stride(0), value_cache.stride(1), value_cache.stride(2),
        block_tables.stride(0),
        out.stride(0), out.stride(1),
        HEAD_SIZE=head_size, HEAD_PAD=head_pad, GROUP=group, BLOCK_SIZE=block_size, BLOCK_M=block_m,
        BLOCK_Q=block_q, TILE_N=cfg["tile_n"], NUM_SPLITS=splits, USE_SOFT_CAP=soft_cap > 0,
        USE_WINDOW=sliding_window > 0, INTERPRET=_INTERPRET, IEEE_DOT=query.dtype == torch.float32 and not _INTERPRET,
        FP8_KV=fp8,
        num_warps=cfg["num_warps"], num_stages=cfg["num_stages"],
    )
    if splits > 1:
        _combine_kernel[(num_tokens, num_heads)](
            out, part_acc, part_m, part_l, query_start_loc, num_seqs, num_tokens, num_heads,
            out.stride(0), out.stride(1),
            HEAD_SIZE=head_size, HEAD_PAD=head_pad, NUM_SPLITS=splits, SPLITS_PAD=triton.next_power_of_2(splits),
            num_warps=4 if head_pad >= 128 else 2,
        )
    return out


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: tokens with K/V in the cache, this step's included
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: row offsets of each sequence's queries
    scale: float,
    sliding_window: int = 0,
    soft_cap: float = 0.0,
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,  # an fp8 cache holds key / k_scale; other caches ignore the scales
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Triton version of `kernels.reference.paged_attention` (same semantics; padding rows are untouched)."""
    return _paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale,
                            sliding_window, soft_cap, out, k_scale, v_scale)
