"""Each Triton kernel against its torch reference in kernels/reference.py, on fresh random inputs.

Without CUDA the small cases run under the Triton interpreter (see conftest.py); the full sweep (big shapes, head
sizes 64/128/256, fp16/bf16, long contexts through split-K, a KV pool past 2**31 elements) is marked `gpu`.
"""

import os

import pytest
import torch

from engine.kernels import activation, attention, kv_store, norm, reference, rotary

CUDA = torch.cuda.is_available()
DEVICE = torch.device("cuda" if CUDA else "cpu")
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def gpu(test):
    return pytest.mark.gpu(pytest.mark.skipif(not CUDA, reason="needs a CUDA device")(test))


if not CUDA and not INTERPRET:
    pytest.skip("no CUDA device and TRITON_INTERPRET is not set (see conftest.py)", allow_module_level=True)

# (atol, rtol). The interpreter truncates float32 -> bfloat16 casts (the GPU rounds), so bf16 there gets one more ulp.
ELEMENTWISE_TOL = {
    torch.float32: (1e-5, 1e-5),
    torch.float16: (1e-3, 1e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2) if INTERPRET else (8e-3, 8e-3),
}
# Attention rounds the probabilities to the input dtype before P @ V (as flash attention does).
ATTENTION_TOL = {
    torch.float32: (2e-5, 2e-5),
    torch.float16: (3e-3, 3e-3),
    torch.bfloat16: (3e-2, 3e-2) if INTERPRET else (2e-2, 2e-2),
}
CPU_DTYPES = [torch.float32, torch.float16, torch.bfloat16]
GPU_DTYPES = [torch.float16, torch.bfloat16, torch.float32]


def dtype_id(dtype):
    return str(dtype).removeprefix("torch.")


def assert_close(actual, expected, tol):
    atol, rtol = tol[expected.dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


def cdiv(a, b):
    return -(-a // b)


# ---------------------------------------------------------------------------------------------------------------------
# paged attention


def make_attention_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, *,
                         num_pad_tokens=0, pool_blocks=None, generator=None):
    """A mixed batch over a shuffled block pool. The query is a strided view into a fused qkv tensor, as the model
    gives it; block-table entries past each sequence's blocks hold garbage ids that must never be read."""
    g = generator or torch.Generator(DEVICE)
    num_needed = sum(cdiv(s, block_size) for s in seq_lens)
    num_blocks = pool_blocks or num_needed + 7
    cache_shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(cache_shape, generator=g, device=DEVICE, dtype=dtype)
    value_cache = torch.randn(cache_shape, generator=g, device=DEVICE, dtype=dtype)
    blocks = torch.randperm(num_blocks, generator=g, device=DEVICE)[:num_needed].to(torch.int32).cpu()
    max_blocks = max(cdiv(s, block_size) for s in seq_lens) + 2
    garbage = 2**30 if CUDA else num_blocks - 1  # a stray read faults on a GPU; the interpreter reads real memory
    block_tables = torch.full((len(seq_lens), max_blocks), garbage, dtype=torch.int32)
    used = 0
    for seq, seq_len in enumerate(seq_lens):
        n = cdiv(seq_len, block_size)
        block_tables[seq, :n] = blocks[used:used + n]
        used += n
    query_start_loc = torch.tensor([0, *torch.tensor(q_lens).cumsum(0).tolist()], dtype=torch.int32)
    num_tokens = int(query_start_loc[-1]) + num_pad_tokens
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, generator=g, device=DEVICE, dtype=dtype)
    query = qkv[:, :num_heads * head_size].view(num_tokens, num_heads, head_size)
    return dict(query=query, key_cache=key_cache, value_cache=value_cache, block_tables=block_tables.to(DEVICE),
                seq_lens=torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE),
                query_start_loc=query_start_loc.to(DEVICE))


def check_attention(q_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, *, sliding_window=0,
                    soft_cap=0.0, num_pad_tokens=0, pool_blocks=None, seed=0, **config):
    g = torch.Generator(DEVICE).manual_seed(seed)
    batch = make_attention_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype,
                                 num_pad_tokens=num_pad_tokens, pool_blocks=pool_blocks, generator=g)
    scale = head_size**-0.5
    num_valid = sum(q_lens)
    out = torch.full_like(batch["query"], float("nan"))  # poisoned: every valid element must be written
    result = attention._paged_attention(**batch, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                                        out=out, **config)
    assert result is out
    expected = reference.paged_attention(**batch, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap)
    assert_close(out[:num_valid], expected[:num_valid], ATTENTION_TOL)
    assert torch.isnan(out[num_valid:]).all(), "padding rows must stay untouched"


# (q_lens, seq_lens): decode rows have q_len 1; chunked-prefill rows have q_len < seq_len; a q_len of 0 is a padded
# sequence. Lengths are deliberately not multiples of the block size.
DECODE = ([1, 1, 1, 1], [1, 17, 40, 33])
MIXED = ([5, 1, 12, 0, 3], [5, 30, 20, 7, 50])


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads", [(8, 1), (6, 2), (4, 4)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("lens", [DECODE, MIXED], ids=["decode", "mixed"])
def test_paged_attention_small(lens, heads, dtype):
    check_attention(*lens, *heads, 32, 16, dtype, num_pad_tokens=2)


@pytest.mark.parametrize("config", [
    dict(num_splits=1),
    dict(num_splits=3),  # split-K with a combine step; some splits of short sequences are empty
    dict(num_splits=2, tile_n=16, block_m=32),
    dict(tile_n=64),  # a KV tile spans four blocks
], ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
@pytest.mark.parametrize("lens", [DECODE, MIXED], ids=["decode", "mixed"])
def test_paged_attention_launch_configs(lens, config):
    check_attention(*lens, 6, 2, 16, 16, torch.float32, **config)


@pytest.mark.parametrize("config", [dict(tile_n=16, block_m=16), dict(tile_n=16, block_m=64, num_splits=2),
                                    dict(tile_n=128, block_m=128)], ids=["unsplit", "split", "long-prefill-tiles"])
def test_paged_attention_unmasked_tiles(config):
    """Chunks on top of a long cache: most tiles lie wholly before the q block's first query and run unmasked, the
    rest (the diagonal, a chunk's own keys, a split starting past the open tiles) masked."""
    check_attention([40, 1, 17, 33], [100, 64, 17, 160], 6, 2, 16, 16, torch.float32, num_pad_tokens=1, **config)


@pytest.mark.parametrize("window,cap", [(7, 0.0), (0, 5.0), (7, 5.0)])
@pytest.mark.parametrize("num_splits", [1, 2])
def test_paged_attention_window_and_soft_cap(window, cap, num_splits):
    check_attention(*MIXED, 4, 2, 16, 16, torch.float32, sliding_window=window, soft_cap=cap, num_splits=num_splits)


@pytest.mark.parametrize("block_size,head_size", [(8, 16), (32, 24), (16, 64)])
def test_paged_attention_block_and_head_sizes(block_size, head_size):
    check_attention(*MIXED, 4, 1, head_size, block_size, torch.float16)


def test_paged_attention_public_entry_point():
    """The signature shared with the reference; `out` omitted allocates a fresh tensor."""
    batch = make_attention_batch(*MIXED, 8, 2, 16, 16, torch.float32, generator=torch.Generator(DEVICE).manual_seed(1))
    out = attention.paged_attention(*batch.values(), 0.25, 0, 0.0)
    expected = reference.paged_attention(*batch.values(), 0.25, 0, 0.0)
    assert_close(out, expected, ATTENTION_TOL)


def test_paged_attention_rejects_bad_input():
    batch = make_attention_batch(*DECODE, 4, 2, 16, 16, torch.float32)
    with pytest.raises(TypeError, match="block_tables must be int32"):
        attention.paged_attention(**{**batch, "block_tables": batch["block_tables"].long()}, scale=1.0)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        attention.paged_attention(**{**batch, "query": batch["query"][:, :3]}, scale=1.0)
    with pytest.raises(TypeError, match="share a dtype"):
        attention.paged_attention(**{**batch, "query": batch["query"].half()}, scale=1.0)


# decode rows, chunked prefills on top of a cache, a fresh prefill, a padded sequence
GPU_MIXED = ([1, 1, 300, 1, 0, 77, 1, 129], [1, 1000, 1300, 2049, 9, 77, 517, 4000])


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("heads", [(32, 8), (8, 1), (6, 2), (4, 4)], ids=lambda h: f"{h[0]}q{h[1]}kv")
def test_paged_attention_gpu_sweep(heads, head_size, dtype):
    if dtype == torch.float32 and head_size != 128:
        pytest.skip("float32 caches: head size 128 only, to keep the sweep's compile time down")
    check_attention(*GPU_MIXED, *heads, head_size, 16, dtype, num_pad_tokens=3)
    check_attention([1] * 6, GPU_MIXED[1][:6], *heads, head_size, 16, dtype)  # decode only


@gpu
@pytest.mark.parametrize("head_size", [64, 128, 256])
@pytest.mark.parametrize("heads", [(16, 1), (6, 2)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("block_size", [16, 32])
def test_paged_attention_gpu_forced_split(block_size, heads, head_size):
    check_attention(*GPU_MIXED, *heads, head_size, block_size, torch.bfloat16, num_pad_tokens=3, num_splits=5)


@gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("window,cap", [(256, 0.0), (0, 30.0), (1024, 50.0)])
def test_paged_attention_gpu_window_and_soft_cap(window, cap, dtype):
    q_lens = [1, 1, 300, 1, 77, 513]
    seq_lens = [1, 3000, 1300, 700, 77, 5000]
    check_attention(q_lens, seq_lens, 16, 8, 128, 16, dtype, sliding_window=window, soft_cap=cap)
    check_attention([1, 1], [1500, 20000], 16, 8, 256, 16, dtype, sliding_window=window, soft_cap=cap)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
def test_paged_attention_gpu_long_prefill(dtype):
    """Block tables of a long max_model_len: prefill chunks take the long-prefill tiles where the GPU has the
    shared memory (16-bit inputs only), decodes and float32 their usual ones."""
    config = attention._config(2048 + 3, 4, 8, 4, 128, 20480, DEVICE, dtype.itemsize)
    long_tiles = attention._shared_memory(DEVICE) >= attention._LONG_PREFILL_SHARED_MEMORY and dtype.itemsize == 2
    assert (config["tile_n"], config["num_warps"]) == ((128, 8) if long_tiles else (64, 4))
    check_attention([2048, 1, 1, 1], [20000, 17000, 1, 9000], 32, 8, 128, 16, dtype, num_pad_tokens=3)
    check_attention([1000, 3000], [1000, 19500], 32, 8, 128, 16, dtype)


@gpu
@pytest.mark.parametrize("heads,head_size", [((32, 8), 128), ((8, 1), 128), ((16, 4), 256)])
@pytest.mark.parametrize("batch", [1, 3])
def test_paged_attention_gpu_long_context_split_k(batch, heads, head_size):
    """Few long decodes: the launcher's own heuristic must split the KV sequence across programs."""
    seq_lens = [32768, 20001, 9000][:batch]
    q_lens = [1] * batch
    max_context = -(-max(seq_lens) // 16) * 16  # what the block tables of 16-token blocks hold
    config = attention._config(batch, batch, heads[1], heads[0] // heads[1], head_size, max_context, DEVICE)
    assert config["num_splits"] > 1
    check_attention(q_lens, seq_lens, *heads, head_size, 16, torch.bfloat16)
    check_attention([1] + q_lens, [5] + seq_lens, *heads, head_size, 16, torch.float16, sliding_window=4096)


@gpu
def test_paged_attention_gpu_pool_past_int32():
    """A KV pool of more than 2**31 elements: the sequences' blocks sit at the top of it, so 32-bit offsets wrap."""
    dtype, num_kv_heads, head_size, block_size = torch.bfloat16, 8, 128, 16
    pool_blocks = 2**31 // (block_size * num_kv_heads * head_size) + 128  # 8.6 GB for K and V together in bf16
    g = torch.Generator(DEVICE).manual_seed(3)
    q_lens, seq_lens = [1, 40, 1], [700, 300, 100]
    batch = make_attention_batch(q_lens, seq_lens, 32, num_kv_heads, head_size, block_size, dtype,
                                 pool_blocks=pool_blocks, generator=g)
    top = torch.arange(pool_blocks - 128, pool_blocks, dtype=torch.int32, device=DEVICE)
    used = batch["block_tables"] < pool_blocks  # the rest hold garbage ids
    batch["block_tables"][used] = top[torch.randperm(128, device=DEVICE)][: int(used.sum())]
    assert batch["key_cache"].numel() > 2**31
    for config in (dict(num_splits=1), dict(num_splits=4)):
        out = attention._paged_attention(**batch, scale=0.1, **config)
        expected = reference.paged_attention(**batch, scale=0.1)
        assert_close(out, expected, ATTENTION_TOL)
    # store_kv into the same high slots
    num_tokens = 5
    key = torch.randn(num_tokens, num_kv_heads, head_size, device=DEVICE, dtype=dtype)
    value = torch.randn_like(key)
    slots = (pool_blocks - 1 - torch.arange(num_tokens, device=DEVICE)) * block_size + 3
    kv_store.store_kv(key, value, batch["key_cache"], batch["value_cache"], slots)
    torch.testing.assert_close(batch["key_cache"].view(-1, num_kv_heads, head_size)[slots], key, atol=0, rtol=0)
    torch.testing.assert_close(batch["value_cache"].view(-1, num_kv_heads, head_size)[slots], value, atol=0, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# store_kv


def check_store_kv(num_tokens, num_kv_heads, head_size, block_size, num_blocks, dtype, cache_dtype=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    cache_dtype = cache_dtype or dtype
    qkv = torch.randn(num_tokens, (4 + 2) * num_kv_heads * head_size, generator=g).to(dtype).to(DEVICE)
    key = qkv[:, 4 * num_kv_heads * head_size:5 * num_kv_heads * head_size].view(num_tokens, num_kv_heads, head_size)
    value = qkv[:, 5 * num_kv_heads * head_size:].view(num_tokens, num_kv_heads, head_size)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[torch.rand(num_tokens, generator=g) < 0.25] = -1  # padded tokens
    slots = slots.to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, generator=g).to(cache_dtype).to(DEVICE)
    value_cache = torch.randn(shape, generator=g).to(cache_dtype).to(DEVICE)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    kv_store.store_kv(key, value, key_cache, value_cache, slots)
    reference.store_kv(key, value, expected_k, expected_v, slots)
    assert torch.equal(key_cache, expected_k) and torch.equal(value_cache, expected_v)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads,head_size", [(1, 16), (3, 24), (4, 32)])
def test_store_kv_small(heads, head_size, dtype):
    check_store_kv(13, heads, head_size, 16, 5, dtype)


def test_store_kv_casts_to_cache_dtype():
    check_store_kv(9, 2, 16, 8, 4, torch.float32, cache_dtype=torch.float16)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads,head_size", [(8, 128), (1, 256), (2, 64), (6, 80)])
def test_store_kv_gpu(heads, head_size, dtype):
    check_store_kv(3000, heads, head_size, 16, 400, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# rms norm


def strided_rows(num_tokens, hidden, dtype, g):
    """[num_tokens, hidden] as a column slice of a wider tensor: rows are not contiguous with each other."""
    return (torch.randn(num_tokens, hidden + 8, generator=g) * 3).to(dtype).to(DEVICE)[:, :hidden]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("num_tokens,hidden", [(7, 48), (3, 1000), (40, 128)])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm(num_tokens, hidden, weight_offset, dtype):
    g = torch.Generator().manual_seed(hidden)
    x = strided_rows(num_tokens, hidden, dtype, g)
    weight = torch.randn(hidden, generator=g).to(dtype).to(DEVICE)
    assert_close(norm.rms_norm(x, weight, 1e-6, weight_offset),
                 reference.rms_norm(x, weight, 1e-6, weight_offset), ELEMENTWISE_TOL)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("num_tokens,hidden", [(7, 48), (3, 1000)])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_fused_add_rms_norm(num_tokens, hidden, weight_offset, dtype):
    g = torch.Generator().manual_seed(hidden + 1)
    x = strided_rows(num_tokens, hidden, dtype, g)
    residual = torch.randn(num_tokens, hidden, generator=g).to(dtype).to(DEVICE)
    weight = torch.randn(hidden, generator=g).to(dtype).to(DEVICE)
    x_before, residual_before = x.clone(), residual.clone()
    normed, new_residual = norm.fused_add_rms_norm(x, residual, weight, 1e-5, weight_offset)
    expected_normed, expected_residual = reference.fused_add_rms_norm(x, residual, weight, 1e-5, weight_offset)
    assert_close(new_residual, expected_residual, ELEMENTWISE_TOL)
    assert_close(normed, expected_normed, ELEMENTWISE_TOL)
    assert torch.equal(x, x_before) and torch.equal(residual, residual_before)


def test_rms_norm_per_head():
    """Per-head q/k norm: a 3-D input normalized over its last dimension."""
    g = torch.Generator().manual_seed(5)
    x = torch.randn(5, 6, 32, generator=g).to(DEVICE)
    weight = torch.randn(32, generator=g).to(DEVICE)
    assert_close(norm.rms_norm(x, weight, 1e-6), reference.rms_norm(x, weight, 1e-6), ELEMENTWISE_TOL)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("hidden", [128, 2048, 4096, 5120, 8192])
def test_norms_gpu(hidden, dtype):
    g = torch.Generator().manual_seed(hidden)
    x = strided_rows(1000, hidden, dtype, g)
    residual = torch.randn(1000, hidden, generator=g).to(dtype).to(DEVICE)
    weight = torch.randn(hidden, generator=g).to(dtype).to(DEVICE)
    assert_close(norm.rms_norm(x, weight, 1e-6, 1.0), reference.rms_norm(x, weight, 1e-6, 1.0), ELEMENTWISE_TOL)
    for actual, expected in zip(norm.fused_add_rms_norm(x, residual, weight, 1e-6),
                                reference.fused_add_rms_norm(x, residual, weight, 1e-6)):
        assert_close(actual, expected, ELEMENTWISE_TOL)


# ---------------------------------------------------------------------------------------------------------------------
# gated activations


@pytest.mark.filterwarnings("ignore:overflow encountered in exp")  # interpreter (numpy): exp(large) = inf is fine
@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", ["silu_and_mul", "gelu_tanh_and_mul"])
@pytest.mark.parametrize("num_tokens,d", [(5, 96), (2, 2500)])  # 2500: more than one column block
def test_activation(op, num_tokens, d, dtype):
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(num_tokens, 2 * d, generator=g) * 4).to(dtype).to(DEVICE)
    assert_close(getattr(activation, op)(x), getattr(reference, op)(x), ELEMENTWISE_TOL)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("op", ["silu_and_mul", "gelu_tanh_and_mul"])
@pytest.mark.parametrize("d", [1408, 14336, 6000])
def test_activation_gpu(op, d, dtype):
    g = torch.Generator().manual_seed(d)
    x = (torch.randn(777, 2 * d, generator=g) * 4).to(dtype).to(DEVICE)
    assert_close(getattr(activation, op)(x), getattr(reference, op)(x), ELEMENTWISE_TOL)


# ---------------------------------------------------------------------------------------------------------------------
# rotary embedding


def make_cos_sin_cache(max_position, rotary_dim, base=10000.0):
    inv_freq = 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)
    freqs = torch.outer(torch.arange(max_position, dtype=torch.float32), inv_freq)
    return torch.cat((freqs.cos(), freqs.sin()), dim=-1).to(DEVICE)  # [max_position, rotary_dim]


def check_rotary(num_tokens, num_heads, num_kv_heads, head_size, rotary_dim, is_neox, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    qkv = torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, generator=g).to(dtype).to(DEVICE)
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    query = qkv[:, :q_size].view(num_tokens, num_heads, head_size)  # strided views, rotated in place
    key = qkv[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_size)
    positions = torch.randint(0, 4096, (num_tokens,), generator=g).to(DEVICE)
    cache = make_cos_sin_cache(4096, rotary_dim)
    expected_q, expected_k = query.clone(), key.clone()
    untouched = qkv[:, q_size + kv_size:].clone()
    rotary.rotary_embedding(positions, query, key, cache, is_neox)
    reference.rotary_embedding(positions, expected_q, expected_k, cache, is_neox)
    assert_close(query, expected_q, ELEMENTWISE_TOL)
    assert_close(key, expected_k, ELEMENTWISE_TOL)
    assert torch.equal(qkv[:, q_size + kv_size:], untouched)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("head_size,rotary_dim", [(32, 32), (32, 16), (24, 12)])
def test_rotary(head_size, rotary_dim, is_neox, dtype):
    check_rotary(6, 6, 2, head_size, rotary_dim, is_neox, dtype)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("heads,head_size,rotary_dim", [((32, 8), 128, 128), ((16, 16), 256, 64),
                                                        ((40, 8), 64, 32), ((12, 2), 80, 80)])
def test_rotary_gpu(heads, head_size, rotary_dim, is_neox, dtype):
    check_rotary(1000, *heads, head_size, rotary_dim, is_neox, dtype)


# ---------------------------------------------------------------------------------------------------------------------
# rotary_store_kv: RoPE and the K/V store in one launch


def check_rotary_store_kv(num_tokens, num_heads, num_kv_heads, head_size, rotary_dim, is_neox, dtype, block_size,
                          num_blocks, seed=0):
    """Against the reference (rotary_embedding, then store_kv): the rotated query and key, both caches (padded
    tokens stored nowhere), and the value columns of the fused qkv tensor untouched."""
    g = torch.Generator().manual_seed(seed)
    q_size, kv_size = num_heads * head_size, num_kv_heads * head_size
    qkv = torch.randn(num_tokens, q_size + 2 * kv_size, generator=g).to(dtype).to(DEVICE)
    expected_qkv = qkv.clone()

    def split(t):  # strided views of the fused projection, as the model passes them
        return (t[:, :q_size].view(num_tokens, num_heads, head_size),
                t[:, q_size:q_size + kv_size].view(num_tokens, num_kv_heads, head_size),
                t[:, q_size + kv_size:].view(num_tokens, num_kv_heads, head_size))

    positions = torch.randint(0, 4096, (num_tokens,), generator=g).to(DEVICE)
    cos_sin = make_cos_sin_cache(4096, rotary_dim)
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[torch.rand(num_tokens, generator=g) < 0.25] = -1  # padded tokens
    slots = slots.to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache, value_cache = (torch.randn(shape, generator=g).to(dtype).to(DEVICE) for _ in range(2))
    expected_k, expected_v, before_k = key_cache.clone(), value_cache.clone(), key_cache.clone()
    kv_store.rotary_store_kv(positions, *split(qkv), cos_sin, is_neox, key_cache, value_cache, slots)
    reference.rotary_store_kv(positions, *split(expected_qkv), cos_sin, is_neox, expected_k, expected_v, slots)
    assert_close(qkv, expected_qkv, ELEMENTWISE_TOL)
    assert torch.equal(qkv[:, q_size + kv_size:], expected_qkv[:, q_size + kv_size:])
    assert_close(key_cache, expected_k, ELEMENTWISE_TOL)
    assert torch.equal(value_cache, expected_v)
    assert not torch.equal(key_cache, before_k)  # some tokens were stored


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("heads,head_size,rotary_dim", [((6, 2), 32, 32), ((4, 4), 24, 12), ((3, 1), 16, 8)])
def test_rotary_store_kv(heads, head_size, rotary_dim, is_neox, dtype):
    check_rotary_store_kv(11, *heads, head_size, rotary_dim, is_neox, dtype, 8, 4)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "interleaved"])
@pytest.mark.parametrize("heads,head_size,rotary_dim", [((32, 8), 128, 128), ((16, 16), 256, 64),
                                                        ((12, 2), 80, 80)])
def test_rotary_store_kv_gpu(heads, head_size, rotary_dim, is_neox, dtype):
    check_rotary_store_kv(1000, *heads, head_size, rotary_dim, is_neox, dtype, 16, 100)


def test_split_k_is_bounded_by_the_longest_context(monkeypatch):
    """One decode on an H100-sized GPU splits its keys only as far as the block tables can hold keys, 64 keys a
    split at least; short splits take one 64-key tile each, long ones 128-key tiles."""
    monkeypatch.setattr(attention, "_num_sms", lambda device: 132)
    monkeypatch.setattr(attention, "_MIN_SPLIT_TOKENS", 64)
    one_decode = dict(num_tokens=1, num_seqs=1, num_kv_heads=8, group=4, head_pad=128, device=DEVICE)
    splits_and_tile = lambda max_context: tuple(  # noqa: E731
        attention._config(max_context=max_context, **one_decode)[key] for key in ("num_splits", "tile_n"))
    assert splits_and_tile(64) == (1, 64)  # no combine kernel
    assert splits_and_tile(256) == (4, 64)
    assert splits_and_tile(1024) == (16, 64)
    assert splits_and_tile(32768) == (64, 128)


@pytest.mark.parametrize("window,cap", [(0, 0.0), (7, 5.0)])
def test_reference_decode_batches_match_one_batch(monkeypatch, window, cap):
    """The reference computes decode rows together, in batches bounded by the keys they gather: any split of the
    batch gives the same rows, and prefill rows in between keep their own path."""
    q_lens, seq_lens = [1, 4, 1, 1, 0, 1], [17, 9, 40, 3, 5, 33]
    batch = make_attention_batch(q_lens, seq_lens, 6, 2, 16, 16, torch.float32,
                                 generator=torch.Generator(DEVICE).manual_seed(3))
    args = dict(**batch, scale=0.25, sliding_window=window, soft_cap=cap)
    whole = reference.paged_attention(**args)
    monkeypatch.setattr(reference, "_DECODE_GATHER_TOKENS", 40)  # one decode per batch
    torch.testing.assert_close(reference.paged_attention(**args)[:sum(q_lens)], whole[:sum(q_lens)],
                               atol=1e-6, rtol=1e-6)
