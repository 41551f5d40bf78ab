"""CPU fast paths of the torch backend: the ops whose reference (`kernels.reference`) spends the CPU engine's time in
many small ops, with the same signatures and the same results within float rounding.

The reference stays the ground truth of the Triton kernel tests; the torch backend (`kernels.load_backend`) takes
these in its place. What they change:
- what every layer would recompute from the step's metadata (each sequence's query rows and length, the decode
  batch's gather index and mask, the rotary cos / sin of the step's positions, whether any slot is padding) is
  computed by the first layer and kept on the metadata tensor itself (`_step_cached`): at batch 1 a decode step of
  a 30-layer model spent more time on that, and on the ops around it, than in its GEMMs.
- paged attention runs the C kernels (`cpu_native`: decodes and prefills, reading the cache in place) where they
  take the tensors; else it reads K/V a whole block at a time (one index per block, not per token), or not at all
  when a sequence's blocks lie in order in the cache (a view); one decoding sequence attends over exactly its keys
  (no mask); more decodes are one masked SDPA call; prefills of equal shape (a batch of prompts) are one SDPA call,
  causal without a mask when the sequence has no earlier context. fp8 caches and soft-capping keep the reference.
- the K/V store is one `index_copy_` per cache when no token is padding (always, on a CPU: padding only comes with
  CUDA graphs), instead of boolean masks and their gathers;
- RoPE rotates q and k in one pass when they sit side by side in the fused qkv output (the model's layout), as
  x * cos + swap_halves(x) * (-sin, sin), the reference's products and sums in fewer ops, written back in place;
- RMSNorm is torch's `rms_norm` (on the CPU still a few ops, but none of the reference's casts and offset add);
  the gated activation runs in the input dtype, as transformers computes it.
"""

from __future__ import annotations

import functools
import threading

import torch
import torch.nn.functional as F

from engine.kernels import cpu_native, reference
from engine.kernels.reference import FP8_KV_MAX


def _step_cached(tensor: torch.Tensor, key, compute):
    """`compute()`, remembered on `tensor` under `key`. The runner makes these views afresh for each forward
    (`InputBatch.fill`) and every layer receives the same one, so the memo lives exactly as long as the step's
    metadata; outside inference mode, where tensors count their in-place writes, a write also drops it."""
    version = 0 if tensor.is_inference() else tensor._version
    memo = tensor.__dict__.get("_kvbox_step_memo")
    if memo is None or memo[0] != version:
        memo = tensor._kvbox_step_memo = (version, {})
    if key not in memo[1]:
        memo[1][key] = compute()
    return memo[1][key]


def _sequences(seq_lens: torch.Tensor, query_start_loc: torch.Tensor) -> tuple[list[int], list[int], dict]:
    """(query starts, sequence lengths, groups): groups map (q_len, seq_len) to the sequences of that shape; all
    decodes share the key (1, 0)."""
    starts, lens = query_start_loc.tolist(), seq_lens.tolist()
    groups: dict[tuple[int, int], list[int]] = {}
    for seq, seq_len in enumerate(lens):
        q_len = starts[seq + 1] - starts[seq]
        if q_len:
            groups.setdefault((1, 0) if q_len == 1 else (q_len, seq_len), []).append(seq)
    return starts, lens, groups


def paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc, scale: float,
                    sliding_window: int = 0, soft_cap: float = 0.0, out: torch.Tensor | None = None,
                    k_scale: float = 1.0, v_scale: float = 1.0) -> torch.Tensor:
    if soft_cap > 0 or key_cache.dtype in FP8_KV_MAX:
        return reference.paged_attention(query, key_cache, value_cache, block_tables, seq_lens, query_start_loc,
                                         scale, sliding_window, soft_cap, out, k_scale, v_scale)
    if out is None:
        out = torch.empty_like(query)
    starts, lens, groups = _step_cached(seq_lens, ("sequences", id(query_start_loc)),
                                        lambda: _sequences(seq_lens, query_start_loc))
    if any(seq_len for _, seq_len in groups) and cpu_native.supports_prefill_attention(
            query, key_cache, value_cache, block_tables, out):
        native = _step_cached(seq_lens, ("native prefills", id(query_start_loc)),
                              lambda: _native_prefills(starts, lens, groups))
        cpu_native.prefill_attention(query, key_cache, value_cache, block_tables, *native, scale, sliding_window, out)
        groups = {key: seqs for key, seqs in groups.items() if key[1] == 0}  # the decodes, if any
    for (q_len, seq_len), seqs in groups.items():
        if seq_len == 0 and cpu_native.supports_decode_attention(query, key_cache, value_cache, block_tables, out):
            native_seqs, rows, lens32, max_len = _step_cached(seq_lens, ("native", sliding_window), lambda: (
                _native_rows(seq_lens, starts, lens, seqs, sliding_window)))
            cpu_native.decode_attention(query, key_cache, value_cache, block_tables, lens32, native_seqs, rows,
                                        max_len, scale, sliding_window, out)
        elif seq_len == 0 and len(seqs) == 1:
            _decode_one(query, key_cache, value_cache, block_tables, starts[seqs[0]], seqs[0], lens[seqs[0]],
                        scale, sliding_window, out)
        elif seq_len == 0:
            _decode(query, key_cache, value_cache, block_tables, seq_lens, starts, lens, seqs, scale,
                    sliding_window, out)
        else:
            _prefill(query, key_cache, value_cache, block_tables, starts, seqs, q_len, seq_len, scale,
                     sliding_window, out)
    return out


def _blocks(cache: torch.Tensor, block_tables: torch.Tensor, seqs: list[int], num_blocks: int) -> torch.Tensor:
    """[len(seqs), num_blocks * block_size, kv_heads, D]: each sequence's first blocks, in order; a view of the
    cache when there is one sequence whose blocks are consecutive."""
    if len(seqs) == 1:
        first = _step_cached(block_tables, ("consecutive", seqs[0], num_blocks),
                             lambda: _consecutive_start(block_tables[seqs[0], :num_blocks].tolist()))
        if first is not None:
            return cache[first:first + num_blocks].flatten(0, 1)[None]
        return cache.index_select(0, block_tables[seqs[0], :num_blocks].long()).flatten(0, 1)[None]
    rows = _step_cached(block_tables, ("rows", tuple(seqs), num_blocks), lambda: (
        block_tables[seqs] if len(seqs) < block_tables.shape[0] else block_tables)[:, :num_blocks].flatten().long())
    # index_select, not cache[rows]: advanced indexing copied 32 sequences' blocks 5x slower (bench/RESULTS.md)
    picked = cache.index_select(0, rows)
    return picked.view(len(seqs), num_blocks * cache.shape[1], *cache.shape[2:])


def _consecutive_start(ids: list[int]) -> int | None:
    return ids[0] if ids == list(range(ids[0], ids[0] + len(ids))) else None


def _decode_one(query, key_cache, value_cache, block_tables, row, seq, seq_len, scale, sliding_window, out) -> None:
    """One decoding sequence: SDPA over exactly its visible keys, so no mask and no padding."""
    num_heads, head_size = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    first = max(0, seq_len - sliding_window) if sliding_window > 0 else 0
    num_blocks = -(-seq_len // block_size)
    keys = _blocks(key_cache, block_tables, [seq], num_blocks)[0, first:seq_len].transpose(0, 1)  # [kv_heads, L, D]
    values = _blocks(value_cache, block_tables, [seq], num_blocks)[0, first:seq_len].transpose(0, 1)
    q = query[row:row + 1].view(1, num_heads, 1, head_size).float()
    attended = F.scaled_dot_product_attention(q, keys.float()[None], values.float()[None], scale=scale,
                                              enable_gqa=num_heads != num_kv_heads)
    out[row] = attended.view(num_heads, head_size)


def _decode(query, key_cache, value_cache, block_tables, seq_lens, starts, lens, seqs, scale, sliding_window,
            out) -> None:
    """One query per sequence, all sequences in one SDPA call; positions past a sequence's length (the rest of its
    last block, and blocks of shorter sequences) are masked. The cache is zeroed at allocation and written with
    finite values only, so what those masked positions hold cannot turn the weighted sum into NaN."""
    num_heads, head_size = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    max_len = max(lens[seq] for seq in seqs)
    num_blocks = -(-max_len // block_size)
    keys = _blocks(key_cache, block_tables, seqs, num_blocks).transpose(1, 2)  # [B, kv_heads, L, D]
    values = _blocks(value_cache, block_tables, seqs, num_blocks).transpose(1, 2)
    index, visible = _step_cached(seq_lens, ("decode", tuple(seqs), sliding_window), lambda: _decode_rows(
        starts, lens, seqs, num_blocks * block_size, sliding_window, query.device))
    q = query.index_select(0, index).view(len(seqs), num_heads, 1, head_size).float()
    attended = F.scaled_dot_product_attention(q, keys.float(), values.float(), attn_mask=visible, scale=scale,
                                              enable_gqa=num_heads != num_kv_heads)
    out.index_copy_(0, index, attended.view(len(seqs), num_heads, head_size).to(out.dtype))


def _native_rows(seq_lens, starts, lens, seqs, sliding_window) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """The C kernel's inputs for the step's decodes: their sequence indices and query rows (int64), the lengths as
    contiguous int32, and the most keys any of them sees."""
    visible = [min(lens[seq], sliding_window) if sliding_window > 0 else lens[seq] for seq in seqs]
    return (torch.tensor(seqs, dtype=torch.int64), torch.tensor([starts[seq] for seq in seqs], dtype=torch.int64),
            seq_lens.to(torch.int32).contiguous(), max(visible))


def _native_prefills(starts, lens, groups) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The C prefill kernel's inputs for the step's prefills: their sequence indices, first query rows, query
    lengths and lengths (contiguous int64)."""
    seqs = [seq for (q_len, seq_len), group in groups.items() if seq_len for seq in group]
    as_tensor = functools.partial(torch.tensor, dtype=torch.int64)
    return (as_tensor(seqs), as_tensor([starts[seq] for seq in seqs]),
            as_tensor([starts[seq + 1] - starts[seq] for seq in seqs]), as_tensor([lens[seq] for seq in seqs]))


def _decode_rows(starts, lens, seqs, num_keys, sliding_window, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The decodes' query rows [B] and which of the gathered keys each may see [B, 1, 1, num_keys]."""
    key_pos = torch.arange(num_keys, device=device)
    lengths = torch.tensor([lens[seq] for seq in seqs], device=device)[:, None]
    visible = key_pos < lengths
    if sliding_window > 0:
        visible &= key_pos > lengths - 1 - sliding_window
    return torch.tensor([starts[seq] for seq in seqs], device=device), visible[:, None, None, :]


def _prefill(query, key_cache, value_cache, block_tables, starts, seqs, q_len, seq_len, scale, sliding_window,
             out) -> None:
    """Sequences of the same query and context lengths: one causal SDPA over them all."""
    num_heads, head_size = query.shape[1], query.shape[2]
    block_size, num_kv_heads = key_cache.shape[1], key_cache.shape[2]
    num_blocks = -(-seq_len // block_size)
    keys = _blocks(key_cache, block_tables, seqs, num_blocks)[:, :seq_len].transpose(1, 2)  # [B, kv_heads, S, D]
    values = _blocks(value_cache, block_tables, seqs, num_blocks)[:, :seq_len].transpose(1, 2)
    index = (torch.tensor([starts[seq] for seq in seqs])[:, None] + torch.arange(q_len)).flatten().to(query.device)
    consecutive = all(starts[b] == starts[a] + q_len for a, b in zip(seqs, seqs[1:]))
    q = query[starts[seqs[0]]:starts[seqs[0]] + len(seqs) * q_len] if consecutive else query[index]
    q = q.view(len(seqs), q_len, num_heads, head_size).transpose(1, 2).float()  # [B, num_heads, q_len, D]
    mask, causal = None, q_len == seq_len and sliding_window <= 0
    if not causal:
        query_pos = torch.arange(seq_len - q_len, seq_len, device=query.device)[:, None]
        key_pos = torch.arange(seq_len, device=query.device)[None, :]
        mask = key_pos <= query_pos
        if sliding_window > 0:
            mask &= key_pos > query_pos - sliding_window
    attended = F.scaled_dot_product_attention(q, keys.float(), values.float(), attn_mask=mask, is_causal=causal,
                                              scale=scale, enable_gqa=num_heads != num_kv_heads)
    attended = attended.transpose(1, 2).reshape(-1, num_heads, head_size).to(out.dtype)
    if consecutive:
        out[starts[seqs[0]]:starts[seqs[0]] + len(seqs) * q_len] = attended
    else:
        out.index_copy_(0, index, attended)


def store_kv(key, value, key_cache, value_cache, slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    if key_cache.dtype in FP8_KV_MAX or slot_mapping.numel() == 0 or _step_cached(
            slot_mapping, "padded", lambda: int(slot_mapping.min()) < 0):
        reference.store_kv(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)
        return
    num_kv_heads, head_size = key_cache.shape[2], key_cache.shape[3]
    key_cache.view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, key.to(key_cache.dtype))
    value_cache.view(-1, num_kv_heads, head_size).index_copy_(0, slot_mapping, value.to(value_cache.dtype))


def rotary_embedding(positions, query, key, cos_sin_cache, is_neox: bool) -> None:
    if not is_neox:
        reference.rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
        return
    rotary_dim = cos_sin_cache.shape[1]
    cos, signed_sin = _step_cached(positions, ("rotary", id(cos_sin_cache)), lambda: _cos_sin(positions,
                                                                                                cos_sin_cache))
    for x in _side_by_side(query, key):
        rot = x[..., :rotary_dim]  # a view: written in place below
        f = rot.float()
        # (x1 cos - x2 sin, x2 cos + x1 sin) as the reference computes it: x2 * -sin is -(x2 * sin), exactly
        rot.copy_(f * cos + f.roll(rotary_dim // 2, dims=-1) * signed_sin)


def _cos_sin(positions: torch.Tensor, cos_sin_cache: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[num_tokens, 1, rotary_dim] each: (cos, cos) and (-sin, sin) of the step's positions."""
    cos, sin = cos_sin_cache[positions].chunk(2, dim=-1)
    return torch.cat((cos, cos), dim=-1)[:, None, :], torch.cat((-sin, sin), dim=-1)[:, None, :]


def _side_by_side(query: torch.Tensor, key: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(q and k as one [num_tokens, heads + kv_heads, D] view) when k's heads follow q's in memory with the same
    strides, as in the fused qkv projection's output; else (query, key)."""
    num_tokens, num_heads, head_size = query.shape
    if (key.dtype == query.dtype and key.shape[0] == num_tokens and key.shape[2] == head_size
            and key.stride() == query.stride() and query.stride(1) == head_size and query.stride(2) == 1
            and key.data_ptr() == query.data_ptr() + num_heads * head_size * query.element_size()):
        return (query.as_strided((num_tokens, num_heads + key.shape[1], head_size), query.stride()),)
    return query, key


def rotary_store_kv(positions, query, key, value, cos_sin_cache, is_neox: bool, key_cache, value_cache,
                    slot_mapping, k_scale: float = 1.0, v_scale: float = 1.0) -> None:
    if (is_neox and positions.dtype == slot_mapping.dtype == torch.int64 and positions.is_contiguous()
            and slot_mapping.is_contiguous()
            and cpu_native.supports_rotary_store_kv(query, key, value, cos_sin_cache, key_cache, value_cache)):
        cpu_native.rotary_store_kv(positions, query, key, value, cos_sin_cache, key_cache, value_cache, slot_mapping)
        return
    rotary_embedding(positions, query, key, cos_sin_cache, is_neox)
    store_kv(key, value, key_cache, value_cache, slot_mapping, k_scale, v_scale)


def prepack(weight: torch.Tensor) -> torch.Tensor | None:
    """`weight` [out, in] in the layout `linear` runs fastest from, or None to keep it as it is: in panels of 16
    output channels for `cpu_native.packed_linear` where it takes the weight (float32; bf16 on CPUs with
    AVX512_BF16), else a bf16 weight in oneDNN's blocked layout (torch's bf16 `F.linear` reorders it at every call).
    Against the plain weights' GEMMs (MKL's sgemm, oneDNN's bf16) the packed kernel runs SmolLM2-135M's decode rows
    at up to 2-3x and its prefills at about the same rate."""
    if weight.device.type != "cpu" or weight.dim() != 2:
        return None
    if cpu_native.supports_packing(weight):
        return cpu_native.pack_linear_weight(weight)
    if weight.dtype != torch.bfloat16:
        return None
    if not torch.backends.mkldnn.is_available() or not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return None
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), 1)


def unpacked(weight: torch.Tensor) -> torch.Tensor:
    """A weight `prepack` returned, as the plain [out, in] tensor it was made from."""
    if weight.is_mkldnn:
        return weight.to_dense()
    return cpu_native.unpack_linear_weight(weight) if cpu_native.is_packed(weight) else weight


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    if weight.is_mkldnn:
        return torch.ops.mkldnn._linear_pointwise(x, weight, bias, "none", [], "")
    if cpu_native.is_packed(weight):  # by `prepack`
        return cpu_native.packed_linear(x, weight, bias)
    return F.linear(x, weight, bias)


# A chunk of a GGUF layer's rows is dequantized, then multiplied, while it is still in cache (2 x 1 MB of L2 and
# 32 MB of L3 here): SmolLM2's linears, 1 and 16 rows, float32 and bf16, ran 4 MB chunks 2-25% faster than 1 MB
# (more calls) and level with or faster than 16 MB (/tmp micro-benchmark, best of three each).
_GGUF_CHUNK_BYTES = 4 << 20


_gguf_scratches = threading.local()  # offline data-parallel replicas step in threads of one process


def _gguf_scratch(numel: int, dtype: torch.dtype) -> torch.Tensor:
    """This thread's chunk buffer, kept between calls: a fresh 4 MB a call was mapped and faulted in anew (half of a
    SmolLM2 gate/up's time at 16 rows where the heap does not keep freed memory)."""
    buffers = _gguf_scratches.__dict__
    if buffers.get(dtype) is None or buffers[dtype].numel() < numel:
        buffers[dtype] = torch.empty(numel, dtype=dtype)
    return buffers[dtype][:numel]


def gguf_linear(x: torch.Tensor, qweight: torch.Tensor, qtype: int, bias: torch.Tensor | None = None) -> torch.Tensor:
    """`reference.gguf_linear` in C: up to `gguf_matvec_rows` rows (decode) multiply from the blocks in float32;
    otherwise each chunk of the weight's rows is dequantized into the packed linear's panels, then its columns of y
    computed from them. The layer is never whole in float, nor kept. bf16 rows take the float32 products too, with
    the weight unrounded (closer to the float32 dequantization than the reference's bf16 weight): through the
    panels a bf16 stream of the built-in SmolLM2 dequantized every weight at every step, 18.5 tok/s against 68.1
    dequantized at load (bench/RESULTS.md, twenty-first session)."""
    if not cpu_native.supports_gguf(x, qweight, qtype):
        return reference.gguf_linear(x, qweight, qtype, bias)
    values, type_size = reference.GGUF_BLOCKS[qtype]
    n, k = qweight.shape[0], qweight.shape[1] // type_size * values
    x2 = x.reshape(-1, k)
    if x2.shape[0] <= cpu_native.gguf_matvec_rows():
        y = cpu_native.gguf_matvec(x2.float(), qweight, qtype, k)
        y = y if bias is None else y + bias.float()
        return y.to(x.dtype).view(*x.shape[:-1], n)
    if not cpu_native.supports_packing(torch.empty(cpu_native.PANEL, k, dtype=x.dtype)) or n % cpu_native.PANEL:
        return F.linear(x, cpu_native.gguf_dequantize(qweight, qtype, k, x.dtype, panels=False), bias)
    chunk = max(cpu_native.PANEL, _GGUF_CHUNK_BYTES // (k * x.element_size()) // cpu_native.PANEL * cpu_native.PANEL)
    out = torch.empty(x2.shape[0], n, dtype=x.dtype)
    scratch = _gguf_scratch(min(chunk, n) * k, x.dtype)
    for start in range(0, n, chunk):
        rows = qweight[start:start + chunk]
        panels = cpu_native.gguf_dequantize(rows, qtype, k, x.dtype, panels=True, out=scratch[:rows.shape[0] * k])
        cpu_native.packed_linear(x2, panels, bias[start:start + chunk] if bias is not None else None,
                                 out=out[:, start:start + rows.shape[0]])
    return out.view(*x.shape[:-1], n)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, weight_offset: float = 0.0) -> torch.Tensor:
    if cpu_native.supports_rms_norm(x, weight):
        return cpu_native.rms_norm(x, weight, eps, weight_offset)
    if weight_offset or weight.dtype != x.dtype:
        return reference.rms_norm(x, weight, eps, weight_offset)
    return F.rms_norm(x, (x.shape[-1],), weight, eps)


def fused_add_rms_norm(x, residual, weight, eps: float, weight_offset: float = 0.0):
    if cpu_native.supports_rms_norm(x, weight, residual):
        return cpu_native.rms_norm(x, weight, eps, weight_offset, residual)
    summed = x + residual
    return rms_norm(summed, weight, eps, weight_offset), summed


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    if cpu_native.supports_silu_and_mul(x):
        return cpu_native.silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up
