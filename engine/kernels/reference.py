"""Torch references for every kernel: the CPU path of the engine and the ground truth for the Triton kernels.

Each function has the same signature as its Triton launcher (in the kernel's own file). They favour clarity over
speed, compute in float32 and cast back to the input dtype once.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def paged_attention(
    query: torch.Tensor,  # [num_tokens, num_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    block_tables: torch.Tensor,  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor,  # [num_seqs] int32: tokens with K/V in the cache, this step's included
    query_start_loc: torch.Tensor,  # [num_seqs + 1] int32: row offsets of each sequence's queries
    scale: float,
    sliding_window: int = 0,  # 0: none; W: a query at position p sees keys at positions (p - W, p]
    soft_cap: float = 0.0,  # 0: none; c: scores become c * tanh(scores / c)
    out: torch.Tensor | None = None,
    k_scale: float = 1.0,  # an fp8 cache holds key / k_scale (see store_kv); other caches ignore the scales
    v_scale: float = 1.0,
) -> torch.Tensor:
    """Causal attention of each sequence's new queries over its whole cached K/V, read through its block table.

    A sequence's q_len queries are its last q_len positions, so the same code covers decode (q_len 1) and chunked
    prefill (q_len > 1 on top of earlier cached tokens). Rows past `query_start_loc[-1]` (padding) are untouched.
    Single-query sequences (decodes) are computed together, in batches (`_decode_attention`); the CPU engine serves
    many of them per step, and one attention call each cost more than the rest of the step. An fp8 cache is
    dequantized (x * scale, in float32) as it is read.
    """
    _, num_heads, head_size = query.shape
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    group_size = num_heads // num_kv_heads
    if out is None:
        out = torch.empty_like(query)
    starts = query_start_loc.tolist()
    lens = seq_lens.tolist()
    decodes = [seq for seq in range(len(lens)) if starts[seq + 1] - starts[seq] == 1]
    if decodes:
        # Batches of at most _DECODE_GATHER_TOKENS gathered keys, so that long contexts do not gather gigabytes.
        per_batch = max(1, _DECODE_GATHER_TOKENS // max(lens[seq] for seq in decodes))
        for first in range(0, len(decodes), per_batch):
            _decode_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                              decodes[first:first + per_batch], scale, sliding_window, soft_cap, out, k_scale, v_scale)
    for seq, seq_len in enumerate(lens):
        start, end = starts[seq], starts[seq + 1]
        q_len = end - start
        if q_len <= 1:
            continue  # none, or a decode done above
        num_blocks = -(-seq_len // block_size)
        blocks = block_tables[seq, :num_blocks].long()
        keys = key_cache[blocks].reshape(-1, num_kv_heads, head_size)[:seq_len]  # [seq_len, kv_heads, D]
        values = value_cache[blocks].reshape(-1, num_kv_heads, head_size)[:seq_len]
        query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        key_pos = torch.arange(seq_len, device=query.device)[None, :]
        visible = key_pos <= query_pos  # [q_len, seq_len]
        if sliding_window > 0:
            visible &= key_pos > query_pos - sliding_window
        q = query[start:end].float().transpose(0, 1)  # [num_heads, q_len, D]
        k = dequantize_kv(keys, k_scale).transpose(0, 1)  # [kv_heads, seq_len, D]
        v = dequantize_kv(values, v_scale).transpose(0, 1)
        if soft_cap > 0:
            k, v = k.repeat_interleave(group_size, dim=0), v.repeat_interleave(group_size, dim=0)
            scores = soft_cap * torch.tanh(q @ k.transpose(1, 2) * scale / soft_cap)  # [num_heads, q_len, seq_len]
            attended = torch.softmax(scores.masked_fill(~visible, float("-inf")), dim=-1) @ v
        else:
            attended = F.scaled_dot_product_attention(q, k, v, attn_mask=visible, scale=scale,
                                                      enable_gqa=group_size > 1)
        out[start:end] = attended.transpose(0, 1).to(out.dtype)  # [q_len, num_heads, D]
    return out


_DECODE_GATHER_TOKENS = 1 << 16


def _decode_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, seqs: list[int],
                      scale: float, sliding_window: int, soft_cap: float, out: torch.Tensor, k_scale: float,
                      v_scale: float) -> None:
    """`paged_attention` for sequences with one query each, all at once: keys gathered to the longest one's length,
    the positions past each sequence's length masked (and read from its last token, so that no stale slot is
    touched)."""
    num_heads, head_size = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    index = torch.tensor(seqs, device=query.device)
    rows = query_start_loc[index].long()  # each sequence's single query row
    lens = seq_lens[index].long()  # [B]
    max_len = int(lens.max())
    key_pos = torch.arange(max_len, device=query.device)[None, :]  # [1, L]
    pos = torch.minimum(key_pos, lens[:, None] - 1)  # [B, L]
    slots = block_tables[index].long().gather(1, pos // block_size) * block_size + pos % block_size
    keys = key_cache.reshape(-1, num_kv_heads, head_size)[slots]  # [B, L, kv_heads, D]
    values = value_cache.reshape(-1, num_kv_heads, head_size)[slots]
    visible = key_pos < lens[:, None]  # [B, L]; the query sits at position len - 1
    if sliding_window > 0:
        visible &= key_pos > lens[:, None] - 1 - sliding_window
    q = query[rows].float()[:, :, None, :]  # [B, num_heads, 1, D]
    k = dequantize_kv(keys, k_scale).transpose(1, 2)  # [B, kv_heads, L, D]
    v = dequantize_kv(values, v_scale).transpose(1, 2)
    mask = visible[:, None, None, :]  # [B, 1, 1, L]
    if soft_cap > 0:
        group_size = num_heads // num_kv_heads
        k, v = k.repeat_interleave(group_size, dim=1), v.repeat_interleave(group_size, dim=1)
        scores = soft_cap * torch.tanh(q @ k.transpose(2, 3) * scale / soft_cap)  # [B, num_heads, 1, L]
        attended = torch.softmax(scores.masked_fill(~mask, float("-inf")), dim=-1) @ v
    else:
        attended = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale,
                                                  enable_gqa=num_heads != num_kv_heads)
    out[rows] = attended[:, :, 0].to(out.dtype)  # [B, num_heads, D]


# An fp8 KV cache's storage types and their largest finite values (stored values saturate there).
FP8_KV_MAX = {torch.float8_e4m3fn: 448.0, torch.float8_e5m2: 57344.0}


def quantize_kv(x: torch.Tensor, dtype: torch.dtype, scale: float) -> torch.Tensor:
    """x as a cache of `dtype` stores it: fp8 holds x / scale (float32, rounded to nearest, saturated); other types
    hold x itself."""
    if dtype not in FP8_KV_MAX:
        return x.to(dtype)
    top = FP8_KV_MAX[dtype]
    return (x.float() / scale).clamp(-top, top).to(dtype)


def dequantize_kv(x: torch.Tensor, scale: float) -> torch.Tensor:
    """Cached values -> float32: fp8 ones times their scale."""
    return x.float() * scale if x.dtype in FP8_KV_MAX else x.float()


def store_kv(
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; a negative slot marks a padded token and is skipped
    k_scale: float = 1.0,  # an fp8 cache holds key / k_scale; other caches ignore the scales
    v_scale: float = 1.0,
) -> None:
    valid = slot_mapping >= 0
    slots = slot_mapping[valid]
    num_kv_heads, head_size = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, num_kv_heads, head_size)[slots] = quantize_kv(key[valid], key_cache.dtype, k_scale)
    value_cache.view(-1, num_kv_heads, head_size)[slots] = quantize_kv(value[valid], value_cache.dtype, v_scale)


def rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,  # [hidden]
    eps: float,
    weight_offset: float = 0.0,  # Gemma scales by (1 + weight)
) -> torch.Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(dim=-1, keepdim=True) + eps)
    return (normed * (weight.float() + weight_offset)).to(x.dtype)


def fused_add_rms_norm(
    x: torch.Tensor,  # [num_tokens, hidden]
    residual: torch.Tensor,  # [num_tokens, hidden]
    weight: torch.Tensor,
    eps: float,
    weight_offset: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (rms_norm(x + residual), x + residual): the normalized input of the next sublayer and the new residual."""
    summed = (x + residual).to(x.dtype)
    return rms_norm(summed, weight, eps, weight_offset), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
    gate, up = x.float().chunk(2, dim=-1)
    return (F.silu(gate) * up).to(x.dtype)


def gelu_tanh_and_mul(x: torch.Tensor) -> torch.Tensor:  # [num_tokens, 2 * d] -> [num_tokens, d]
    gate, up = x.float().chunk(2, dim=-1)
    return (F.gelu(gate, approximate="tanh") * up).to(x.dtype)


def rotary_embedding(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size], rotated in place
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32: cos in the first half, sin in the second
    is_neox: bool,  # neox: rotate halves (x[:d/2], x[d/2:]); otherwise rotate interleaved pairs (x[0::2], x[1::2])
) -> None:
    rotary_dim = cos_sin_cache.shape[1]
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)  # [num_tokens, rotary_dim / 2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    for x in (query, key):
        rot = x[..., :rotary_dim].float()
        if is_neox:
            x1, x2 = rot.chunk(2, dim=-1)
            rotated = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
        else:
            x1, x2 = rot[..., 0::2], rot[..., 1::2]
            rotated = torch.stack((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).flatten(-2)
        x[..., :rotary_dim] = rotated.to(x.dtype)


def rotary_store_kv(
    positions: torch.Tensor,  # [num_tokens] int64
    query: torch.Tensor,  # [num_tokens, num_heads, head_size], rotated in place
    key: torch.Tensor,  # [num_tokens, num_kv_heads, head_size], rotated in place, then stored
    value: torch.Tensor,  # [num_tokens, num_kv_heads, head_size]
    cos_sin_cache: torch.Tensor,  # [max_position, rotary_dim] float32
    is_neox: bool,
    key_cache: torch.Tensor,  # [num_blocks, block_size, num_kv_heads, head_size]
    value_cache: torch.Tensor,
    slot_mapping: torch.Tensor,  # [num_tokens] int64; a negative slot marks a padded token and is not stored
    k_scale: float = 1.0,  # as in store_kv
    v_scale: float = 1.0,
) -> None:
    rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    store_kv(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def add_lora(
    out: torch.Tensor,  # [num_tokens, out_features], added to in place
    x: torch.Tensor,  # [num_tokens, in_features]
    lora_a: torch.Tensor,  # [num_slices, max_loras, max_rank, in_features]: each slice's A
    lora_b: torch.Tensor,  # [out_features, max_loras, max_rank]: each slice's B, stacked along outputs, scale folded in
    token_slots: torch.Tensor,  # [num_tokens] int, -1: no adapter
    output_slices: tuple[int, ...],  # out_features of each slice (q/k/v, gate/up, or the whole layer), in order
) -> None:
    """Multi-LoRA: out[t] += B[s] @ (A[s] @ x[t]) with s = token_slots[t], each slice with its own A and B."""
    for slot in token_slots.unique().tolist():
        if slot < 0:
            continue
        rows = (token_slots == slot).nonzero().squeeze(1)
        delta = torch.cat([(x[rows].float() @ a.float().T) @ b.float().T  # [n, slice size]
                           for a, b in zip(lora_a[:, slot], lora_b[:, slot].split(output_slices))], dim=1)
        out[rows] = (out[rows].float() + delta).to(out.dtype)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ weight.T + bias, by torch itself (in the input dtype: the CPU path's linears stay as fast as torch's)."""
    return F.linear(x, weight, bias)


def dequantize_wna16(
    qweight: torch.Tensor,  # [in / (32 / bits), out] int32: input rows packed low bits first (GPTQ's layout)
    scales: torch.Tensor,  # [groups, out]
    zeros: torch.Tensor,  # [groups, out] int16: unsigned zero points
    g_idx: torch.Tensor,  # [in] int32: each input row's group
    bits: int,
) -> torch.Tensor:
    """The float32 weight [out, in] of a W4A16 / W8A16 layer: (q - zero[g]) * scale[g] per input row."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=qweight.device)
    q = (qweight.unsqueeze(1) >> shifts[None, :, None]) & ((1 << bits) - 1)  # [in / pack, pack, out]
    q = q.reshape(-1, qweight.shape[1])  # [in, out]
    return ((q.float() - zeros[g_idx].float()) * scales[g_idx].float()).T


def wna16_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                 g_idx: torch.Tensor, bits: int, bias: torch.Tensor | None = None, group_size: int = 0) -> torch.Tensor:
    """y = x @ W.T + bias with W dequantized in float32 for this call only (the packed weight stays packed).
    `group_size` (g_idx is `row // group_size`) only helps the GPU kernel; g_idx alone says it all here."""
    weight = dequantize_wna16(qweight, scales, zeros, g_idx, bits)
    return F.linear(x, weight.to(x.dtype), bias)


# GGUF block types kept packed (ggml's GGMLQuantizationType ids) -> (values per block, bytes per block). A packed
# weight is [rows, row bytes] uint8, each row its blocks in order, as llama.cpp stores it.
GGUF_BLOCKS = {2: (32, 18), 3: (32, 20), 6: (32, 22), 7: (32, 24), 8: (32, 34), 12: (256, 144), 13: (256, 176),
               14: (256, 210)}
GGUF_TYPE_NAMES = {2: "Q4_0", 3: "Q4_1", 6: "Q5_0", 7: "Q5_1", 8: "Q8_0", 12: "Q4_K", 13: "Q5_K", 14: "Q6_K"}


def _f16(b: torch.Tensor) -> torch.Tensor:  # [..., 2] little-endian bytes -> [..., 1] float32
    return b.contiguous().view(torch.float16).float()


def _nibbles(qs: torch.Tensor) -> torch.Tensor:  # [..., n] bytes -> [..., 2n]: the low nibbles, then the high ones
    return torch.cat((qs & 0xF, qs >> 4), dim=-1)


def _bits(qh: torch.Tensor) -> torch.Tensor:  # [..., n] bytes -> [..., 8n] bits: bit i of byte i // 8
    shifts = torch.arange(8, dtype=torch.uint8, device=qh.device)
    return ((qh.unsqueeze(-1) >> shifts) & 1).flatten(-2)


def _k_scales(scales: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins (the upper two bits of the last four of each
    sit in the top bits of the first eight bytes)."""
    d, m, md = scales[..., 0:4], scales[..., 4:8], scales[..., 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    mins = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return sc.float(), mins.float()


def _k_low(qs: torch.Tensor) -> torch.Tensor:  # Q4_K / Q5_K: 128 bytes -> [..., 8, 32]: each 32 bytes hold two sub-blocks
    chunks = qs.unflatten(-1, (4, 1, 32))
    return torch.cat((chunks & 0xF, chunks >> 4), dim=-2).flatten(-3, -2)


def _q4_0(b):
    return _f16(b[..., 0:2]) * (_nibbles(b[..., 2:18]).float() - 8)


def _q4_1(b):
    return _f16(b[..., 0:2]) * _nibbles(b[..., 4:20]).float() + _f16(b[..., 2:4])


def _q5_0(b):
    q = _nibbles(b[..., 6:22]) | (_bits(b[..., 2:6]) << 4)
    return _f16(b[..., 0:2]) * (q.float() - 16)


def _q5_1(b):
    q = _nibbles(b[..., 8:24]) | (_bits(b[..., 4:8]) << 4)
    return _f16(b[..., 0:2]) * q.float() + _f16(b[..., 2:4])


def _q8_0(b):
    return _f16(b[..., 0:2]) * b[..., 2:34].view(torch.int8).float()


def _q4_k(b):
    sc, mins = _k_scales(b[..., 4:16])
    q = _k_low(b[..., 16:144]).float()
    return ((_f16(b[..., 0:2]) * sc)[..., None] * q - (_f16(b[..., 2:4]) * mins)[..., None]).flatten(-2)


def _q5_k(b):
    sc, mins = _k_scales(b[..., 4:16])
    shifts = torch.arange(8, dtype=torch.uint8, device=b.device)[:, None]
    high = (b[..., None, 16:48] >> shifts) & 1  # [..., 8, 32]: sub-block j's fifth bits are bit j of qh
    q = (_k_low(b[..., 48:176]) | (high << 4)).float()
    return ((_f16(b[..., 0:2]) * sc)[..., None] * q - (_f16(b[..., 2:4]) * mins)[..., None]).flatten(-2)


def _q6_k(b):
    low = _nibbles(b[..., 0:128].unflatten(-1, (2, 64)))  # [..., 2, 128]: each half's 128 low 4 bits
    shifts = torch.arange(0, 8, 2, dtype=torch.uint8, device=b.device)[:, None]  # no host copy: graph-capturable
    high = ((b[..., 128:192].unflatten(-1, (2, 1, 32)) >> shifts) & 3).flatten(-2)  # [..., 2, 128]
    q = ((low | (high << 4)).float() - 32).unflatten(-1, (8, 16))  # [..., 2, 8, 16]: 16 values per scale
    scales = (_f16(b[..., 208:210]) * b[..., 192:208].view(torch.int8).float()).unflatten(-1, (2, 8))
    return (scales[..., None] * q).flatten(-3)


_GGUF_DEQUANTIZE = {2: _q4_0, 3: _q4_1, 6: _q5_0, 7: _q5_1, 8: _q8_0, 12: _q4_k, 13: _q5_k, 14: _q6_k}


def dequantize_gguf(packed: torch.Tensor, qtype: int) -> torch.Tensor:
    """[rows, row bytes] uint8 of GGUF type `qtype` -> the float32 weight [rows, row length], as llama.cpp and
    `gguf.quants.dequantize` compute it."""
    _, type_size = GGUF_BLOCKS[qtype]
    blocks = packed.unflatten(-1, (-1, type_size))  # [rows, blocks, type_size]
    return _GGUF_DEQUANTIZE[qtype](blocks).flatten(-2)


def gguf_linear(x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """y = x @ W.T + bias, W [out, in] dequantized from its GGUF blocks `qweight` [out, in bytes] for this call only."""
    return F.linear(x, dequantize_gguf(qweight, qtype).to(x.dtype), bias)


FP8_MAX = 448.0  # float8_e4m3fn's largest finite value
INT8_MAX = 127.0


def quantize_activations(x: torch.Tensor, dtype: torch.dtype, scale: torch.Tensor | None = None):
    """x [n, k] -> (x quantized to `dtype` (float8_e4m3fn or int8), float32 scale): the static per-tensor `scale`
    if given, else one scale per token (row) so that its largest magnitude maps to the type's largest value."""
    top = FP8_MAX if dtype == torch.float8_e4m3fn else INT8_MAX
    x = x.float()
    if scale is None:
        scale = (x.abs().amax(dim=-1, keepdim=True) / top).clamp(min=1e-12)  # [n, 1]
    scaled = (x / scale).clamp(-top, top)
    return (scaled.to(dtype) if dtype == torch.float8_e4m3fn else scaled.round().to(dtype)), scale


INT8_MIN = -128.0


def quantize_activations_asym(x: torch.Tensor, scale: torch.Tensor | None = None,
                              zero_point: torch.Tensor | None = None):
    """x [n, k] -> (int8 x, float32 scale [n, 1], int32 zero point [n, 1]) with x ~ scale * (q - zero point): the
    static per-tensor `scale` / `zero_point` if given, else per token over the row's range widened to hold 0 (as
    compressed-tensors' qparams: the zero point then stays within int8, and a constant row divides by no zero).
    q = clamp(round(x / scale) + zero point), rounding half to even."""
    x = x.float()
    if scale is None:
        low = x.amin(dim=-1, keepdim=True).clamp(max=0.0)
        high = x.amax(dim=-1, keepdim=True).clamp(min=0.0)
        # A tensor divisor: CUDA divides by a Python number as a multiplication by its reciprocal (one ulp off
        # IEEE division on some rows), and the reference must round alike on every device.
        scale = ((high - low) / torch.full_like(high, INT8_MAX - INT8_MIN)).clamp(min=1e-12)
        zero_point = (INT8_MIN - low / scale).round()
    q = ((x / scale).round() + zero_point.float()).clamp(INT8_MIN, INT8_MAX).to(torch.int8)
    return q, scale.expand(x.shape[0], 1).float(), zero_point.expand(x.shape[0], 1).to(torch.int32)


def dequantize_w8(weight: torch.Tensor, weight_scale: torch.Tensor,
                  block_size: tuple[int, int] | None = None) -> torch.Tensor:
    """8-bit weight [out, in] (float8_e4m3fn or int8) -> float32: `weight_scale` is per output channel [out], or
    with `block_size` (b0, b1) per block [ceil(out / b0), ceil(in / b1)], the last row and column of blocks cut
    short (the shapes alone cannot tell: 192 rows in 2 blocks are 128 + 64, not 96 + 96)."""
    w = weight.float()
    if block_size is None:
        return w * weight_scale[:, None]
    rows, cols = block_size
    full = weight_scale.repeat_interleave(rows, 0)[:weight.shape[0]].repeat_interleave(cols, 1)[:, :weight.shape[1]]
    return w * full


def w8a8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor, input_scale: torch.Tensor | None,
                bias: torch.Tensor | None = None, quantize_input: bool = True, azp_adj: torch.Tensor | None = None,
                input_zero_point: torch.Tensor | None = None,
                block_size: tuple[int, int] | None = None) -> torch.Tensor:
    """y = Q(x) @ W.T + bias for 8-bit weights, emulated in float32: Q quantizes x as the GPU's W8A8 GEMM does
    (static per-tensor `input_scale`, or dynamic per token when it is None); quantize_input=False: weight-only, the
    only way block scales (`block_size`, see `dequantize_w8`) run.
    `azp_adj` (int8 weights with per-channel scales only): the activations are asymmetric (`input_zero_point` with a
    static scale), and azp_adj [N] is each output channel's int8 weight summed over K, so that
    y = s_x * s_w * (q @ W.T - z * azp_adj): the integer GEMM on q, then the zero point's share taken off."""
    xf = x.float()
    if quantize_input and azp_adj is not None:
        q, scale, zero_point = quantize_activations_asym(xf.reshape(-1, xf.shape[-1]), input_scale, input_zero_point)
        acc = q.float() @ weight.float().T - zero_point.float() * azp_adj.float()
        y = (acc * scale * weight_scale).view(*x.shape[:-1], weight.shape[0])
        return (y if bias is None else y + bias.float()).to(x.dtype)
    if quantize_input:
        q, scale = quantize_activations(xf, weight.dtype, input_scale)
        return w8a8_gemm(q, scale, weight, weight_scale, bias, x.dtype)
    y = xf @ dequantize_w8(weight, weight_scale, block_size).T
    return (y if bias is None else y + bias.float()).to(x.dtype)


def w8a8_gemm(q: torch.Tensor, scale: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor,
              bias: torch.Tensor | None, out_dtype: torch.dtype) -> torch.Tensor:
    """y = (q * scale) @ W.T + bias in `out_dtype` for activations already quantized: q [..., K] 8-bit with its
    float32 `scale` [..., 1] (per token) or [1] (per tensor)."""
    y = (q.float() * scale) @ dequantize_w8(weight, weight_scale).T
    return (y if bias is None else y + bias.float()).to(out_dtype)
