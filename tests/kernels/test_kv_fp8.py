"""The FP8 KV cache in the kernels: store_kv / rotary_store_kv write x / scale in e4m3 or e5m2, paged attention reads
it back times the scale; each Triton kernel against its torch reference (kernels/reference.py). Without CUDA the
small cases run under the Triton interpreter (see conftest.py); the `gpu` cases run the real kernels at real shapes.
"""

import pytest
import torch

from engine.kernels import attention, kv_store, reference
from tests.kernels.test_kernels import (ATTENTION_TOL, CUDA, DECODE, DEVICE, ELEMENTWISE_TOL, GPU_MIXED, MIXED,
                                        assert_close, dtype_id, gpu, make_attention_batch, make_cos_sin_cache)

FP8 = [torch.float8_e4m3fn, torch.float8_e5m2]
K_SCALE, V_SCALE = 0.37, 1.9  # not 1.0, so that a scale left out or swapped shows


def runnable(fp8):
    """Triton converts e4m3 only on compute capability 8.9+ (the engine refuses it below, see engine/kv_dtype.py)."""
    if CUDA and fp8 == torch.float8_e4m3fn and torch.cuda.get_device_capability() < (8, 9):
        pytest.skip("Triton's e4m3 needs compute capability 8.9")


def fp8_caches(batch, fp8):
    """The batch's random caches as an fp8 cache stores them (through the reference's quantization)."""
    return {**batch, "key_cache": reference.quantize_kv(batch["key_cache"] * 3, fp8, K_SCALE),
            "value_cache": reference.quantize_kv(batch["value_cache"] * 3, fp8, V_SCALE)}


def check_fp8_attention(q_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype, fp8, *,
                        sliding_window=0, soft_cap=0.0, seed=0, **config):
    runnable(fp8)
    g = torch.Generator(DEVICE).manual_seed(seed)
    batch = fp8_caches(make_attention_batch(q_lens, seq_lens, num_heads, num_kv_heads, head_size, block_size, dtype,
                                            num_pad_tokens=2, generator=g), fp8)
    scale, num_valid = head_size**-0.5, sum(q_lens)
    out = torch.full_like(batch["query"], float("nan"))
    attention._paged_attention(**batch, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap, out=out,
                               k_scale=K_SCALE, v_scale=V_SCALE, **config)
    expected = reference.paged_attention(**batch, scale=scale, sliding_window=sliding_window, soft_cap=soft_cap,
                                         k_scale=K_SCALE, v_scale=V_SCALE)
    assert_close(out[:num_valid], expected[:num_valid], ATTENTION_TOL)
    assert torch.isnan(out[num_valid:]).all(), "padding rows must stay untouched"
    return batch, expected


@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("lens", [DECODE, MIXED], ids=["decode", "mixed"])
def test_fp8_paged_attention(lens, dtype, fp8):
    check_fp8_attention(*lens, 6, 2, 32, 16, dtype, fp8)


@pytest.mark.parametrize("config", [dict(num_splits=1), dict(num_splits=3), dict(num_splits=2, tile_n=16, block_m=32)],
                         ids=lambda c: "-".join(f"{k}{v}" for k, v in c.items()))
def test_fp8_paged_attention_split_k(config):
    """v_scale is applied to each split's partial accumulator before the combine."""
    check_fp8_attention(*MIXED, 4, 2, 16, 16, torch.float32, torch.float8_e4m3fn, **config)


def test_fp8_paged_attention_window_and_soft_cap():
    """k_scale is folded into the score scale, which the soft cap divides."""
    check_fp8_attention(*MIXED, 4, 1, 16, 8, torch.float16, torch.float8_e5m2, sliding_window=7, soft_cap=5.0,
                        num_splits=2)


def test_fp8_reference_attends_over_the_dequantized_cache():
    """The reference's fp8 path is its float path over x * scale: what the cache means."""
    g = torch.Generator(DEVICE).manual_seed(2)
    batch = fp8_caches(make_attention_batch(*MIXED, 6, 2, 16, 16, torch.float32, generator=g),
                       torch.float8_e4m3fn)
    fp8_out = reference.paged_attention(**batch, scale=0.25, k_scale=K_SCALE, v_scale=V_SCALE)
    dequantized = {**batch, "key_cache": batch["key_cache"].float() * K_SCALE,
                   "value_cache": batch["value_cache"].float() * V_SCALE}
    torch.testing.assert_close(fp8_out, reference.paged_attention(**dequantized, scale=0.25), atol=1e-5, rtol=1e-5)
    # Scales are those of an fp8 cache only: a float cache ignores them.
    torch.testing.assert_close(reference.paged_attention(**dequantized, scale=0.25, k_scale=3.0, v_scale=3.0),
                               reference.paged_attention(**dequantized, scale=0.25))


def check_fp8_store(num_tokens, num_kv_heads, head_size, block_size, num_blocks, dtype, fp8, seed=0):
    """Byte-identical caches: both divide in float32 with IEEE rounding, then round to nearest and saturate."""
    runnable(fp8)
    g = torch.Generator().manual_seed(seed)
    key = (torch.randn(num_tokens, num_kv_heads, head_size, generator=g) * 40).to(dtype).to(DEVICE)
    value = (torch.randn(num_tokens, num_kv_heads, head_size, generator=g) * 40).to(dtype).to(DEVICE)
    key[0, 0, :4] = torch.tensor([1e6, -1e6, 0.0, 1e-7])  # saturates both ways; a zero; a subnormal
    slots = torch.randperm(num_blocks * block_size, generator=g)[:num_tokens]
    slots[1:][torch.rand(num_tokens - 1, generator=g) < 0.25] = -1  # padded tokens; the first is stored
    slots = slots.to(DEVICE)
    shape = (num_blocks, block_size, num_kv_heads, head_size)
    key_cache = torch.randn(shape, generator=g).to(fp8).to(DEVICE)
    value_cache = torch.randn(shape, generator=g).to(fp8).to(DEVICE)
    expected_k, expected_v = key_cache.clone(), value_cache.clone()
    kv_store.store_kv(key, value, key_cache, value_cache, slots, K_SCALE, V_SCALE)
    reference.store_kv(key, value, expected_k, expected_v, slots, K_SCALE, V_SCALE)
    assert torch.equal(key_cache.view(torch.uint8), expected_k.view(torch.uint8))
    assert torch.equal(value_cache.view(torch.uint8), expected_v.view(torch.uint8))
    top = reference.FP8_KV_MAX[fp8]
    assert key_cache.view(-1, num_kv_heads, head_size)[slots[0], 0, :2].float().tolist() == [top, -top]


@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_fp8_store_kv(dtype, fp8):
    check_fp8_store(13, 3, 24, 8, 5, dtype, fp8)


@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
def test_fp8_rotary_store_kv(fp8):
    """The fused rotation then the fp8 store; the rotated key may differ by an ulp of its dtype between the two, so
    the caches must agree to within one fp8 step, and exactly almost everywhere."""
    runnable(fp8)
    g = torch.Generator().manual_seed(1)
    num_tokens, num_heads, num_kv_heads, head_size = 11, 4, 2, 32
    qkv = (torch.randn(num_tokens, (num_heads + 2 * num_kv_heads) * head_size, generator=g) * 5).to(DEVICE)
    expected_qkv = qkv.clone()

    def split(t):
        q, k, v = t.split([num_heads * head_size, num_kv_heads * head_size, num_kv_heads * head_size], dim=1)
        return (q.view(num_tokens, num_heads, head_size), k.view(num_tokens, num_kv_heads, head_size),
                v.view(num_tokens, num_kv_heads, head_size))

    positions = torch.randint(0, 4096, (num_tokens,), generator=g).to(DEVICE)
    cos_sin = make_cos_sin_cache(4096, head_size)
    slots = torch.randperm(4 * 8, generator=g)[:num_tokens].to(DEVICE)
    caches = [torch.zeros(4, 8, num_kv_heads, head_size, dtype=fp8, device=DEVICE) for _ in range(4)]
    kv_store.rotary_store_kv(positions, *split(qkv), cos_sin, True, *caches[:2], slots, K_SCALE, V_SCALE)
    reference.rotary_store_kv(positions, *split(expected_qkv), cos_sin, True, *caches[2:], slots, K_SCALE, V_SCALE)
    assert_close(qkv, expected_qkv, ELEMENTWISE_TOL)
    assert torch.equal(caches[1].view(torch.uint8), caches[3].view(torch.uint8))  # values are not rotated
    got, want = caches[0].float(), caches[2].float()
    assert (got == want).float().mean() > 0.98
    step = 2.0 ** -(3 if fp8 == torch.float8_e4m3fn else 2)  # one unit in the last place, relative
    torch.testing.assert_close(got, want, rtol=step, atol=2.0 ** -9)


@gpu
@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("heads,head_size", [((32, 8), 128), ((8, 1), 64), ((16, 4), 256)])
def test_fp8_paged_attention_gpu(heads, head_size, dtype, fp8):
    check_fp8_attention(*GPU_MIXED, *heads, head_size, 16, dtype, fp8)
    check_fp8_attention([1] * 6, GPU_MIXED[1][:6], *heads, head_size, 16, dtype, fp8)  # decode only (split-K)
    check_fp8_attention(*GPU_MIXED, *heads, head_size, 16, dtype, fp8, num_splits=5)


@gpu
@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
def test_fp8_paged_attention_gpu_window_and_soft_cap(fp8):
    check_fp8_attention([1, 1, 300, 77], [1, 3000, 1300, 77], 16, 8, 128, 16, torch.bfloat16, fp8,
                        sliding_window=256, soft_cap=30.0)


@gpu
@pytest.mark.parametrize("fp8", FP8, ids=dtype_id)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=dtype_id)
@pytest.mark.parametrize("heads,head_size", [(8, 128), (1, 256), (6, 80)])
def test_fp8_store_kv_gpu(heads, head_size, dtype, fp8):
    check_fp8_store(3000, heads, head_size, 16, 400, dtype, fp8)
