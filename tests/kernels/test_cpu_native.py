"""The CPU kernels in C (kernels/cpu_native.py) against the torch references, their build cache, and the torch paths
they fall back to."""

import logging
import shutil

import pytest
import torch
from test_kernels import ATTENTION_TOL, assert_close, make_attention_batch, make_cos_sin_cache

from engine.kernels import cpu, cpu_native, reference

pytestmark = pytest.mark.skipif(not (shutil.which("cc") or shutil.which("gcc")), reason="no C compiler")

# (heads, kv heads, head size): GQA as SmolLM2 has it, MHA, MQA, a head size that is no multiple of 16.
HEADS = [(9, 3, 64), (4, 4, 32), (8, 1, 128), (6, 2, 80)]


def decode_batch(num_seqs, max_len, heads, dtype, block_size, seed):
    """num_seqs decoding sequences of random lengths (one block boundary, one single token among them), over a
    shuffled pool; the query a strided view into a fused qkv tensor, as the model gives it."""
    g = torch.Generator().manual_seed(seed)
    lens = torch.randint(1, max_len + 1, (num_seqs,), generator=g).tolist()
    lens[0], lens[-1] = 1, block_size * 2
    return make_attention_batch([1] * num_seqs, lens, *heads, block_size, dtype, generator=g)


def within_rounding(actual, expected_float32, dtype):
    """float32: the same sums in another order; bfloat16: the float result rounded once, so within one bf16 ulp."""
    if dtype == torch.float32:
        torch.testing.assert_close(actual, expected_float32, rtol=2e-6, atol=2e-6)
    else:
        error = (actual.float() - expected_float32).abs()
        bound = expected_float32.abs() * 2.0**-8 + 1e-6
        assert (error <= bound).all(), f"{(error - bound).max().item()} past one bf16 ulp"


def expected(batch, **kwargs):
    """The reference on float32 copies of the inputs (exact for bf16 ones): the result before its final rounding."""
    widened = {k: v.float() if v.is_floating_point() else v for k, v in batch.items()}
    return reference.paged_attention(**widened, **kwargs)


@pytest.fixture(params=["head", "sequence"], ids=["task-a-head", "task-a-sequence"])
def decode_tasks(request, monkeypatch):
    """Decode attention's two task shapes, whatever the batch and dtype: one KV head of a sequence a task, or all of
    a sequence's heads in one."""
    whole = request.param == "sequence"
    monkeypatch.setattr(cpu_native, "_SEQS_PER_THREAD", 0 if whole else 1 << 30)
    monkeypatch.setattr(cpu_native, "_WHOLE_SEQUENCE_DTYPES", (torch.float32, torch.bfloat16))
    return request.param


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "q{}kv{}d{}".format(*h))
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_attention_matches_the_reference(heads, dtype, block_size, decode_tasks):
    batch = decode_batch(7, 90, heads, dtype, block_size, seed=block_size)
    out = torch.full_like(batch["query"], float("nan"))
    assert cpu_native.supports_decode_attention(batch["query"], batch["key_cache"], batch["value_cache"],
                                                batch["block_tables"], out)
    cpu.paged_attention(**batch, scale=0.3, out=out)
    within_rounding(out, expected(batch, scale=0.3), dtype)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window(window, decode_tasks):
    batch = decode_batch(6, 70, (6, 2, 64), torch.float32, 16, seed=window)
    out = cpu.paged_attention(**batch, scale=0.125, sliding_window=window)
    within_rounding(out, expected(batch, scale=0.125, sliding_window=window), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "q{}kv{}d{}".format(*h))
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_prefill_attention_matches_the_reference(heads, dtype, block_size):
    """Prefills without context (one longer than a chunk of 64 keys), chunks after cached context, one token's
    prefill after context (a decode-shaped row kept with the decodes), and equal shapes side by side."""
    g = torch.Generator().manual_seed(block_size)
    batch = make_attention_batch([7, 130, 20, 1, 33, 33], [7, 130, 95, 12, 33, 33], *heads, block_size, dtype,
                                 generator=g)
    out = torch.full_like(batch["query"], float("nan"))
    assert cpu_native.supports_prefill_attention(batch["query"], batch["key_cache"], batch["value_cache"],
                                                 batch["block_tables"], out)
    cpu.paged_attention(**batch, scale=0.3, out=out)
    within_rounding(out, expected(batch, scale=0.3), dtype)


@pytest.mark.parametrize("window", [1, 5, 16, 70, 200])
def test_prefill_attention_in_a_sliding_window(window):
    g = torch.Generator().manual_seed(window)
    batch = make_attention_batch([40, 100, 9], [40, 150, 80], 6, 2, 64, 16, torch.float32, generator=g)
    out = cpu.paged_attention(**batch, scale=0.125, sliding_window=window)
    within_rounding(out, expected(batch, scale=0.125, sliding_window=window), torch.float32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("window", [0, 300])
def test_prefill_attention_over_several_key_blocks(dtype, window):
    """Longer than a key block (cpu_prefill_attention.c's KB, 256 positions) and than a task's rows: the running
    max and sum carry across blocks, each sequence splits into tasks, a row's window starts inside a block."""
    g = torch.Generator().manual_seed(11 + window)
    batch = make_attention_batch([300, 70], [700, 70], 8, 2, 64, 16, dtype, generator=g)
    out = torch.full_like(batch["query"], float("nan"))
    assert cpu_native.supports_prefill_attention(batch["query"], batch["key_cache"], batch["value_cache"],
                                                 batch["block_tables"], out)
    cpu.paged_attention(**batch, scale=0.125, sliding_window=window, out=out)
    within_rounding(out, expected(batch, scale=0.125, sliding_window=window), dtype)


def test_prefill_heads_of_a_size_the_kernel_does_not_take_keep_sdpa():
    g = torch.Generator().manual_seed(4)
    batch = make_attention_batch([20, 1], [30, 9], 4, 2, 40, 16, torch.float32, generator=g)
    out = torch.empty_like(batch["query"])
    assert not cpu_native.supports_prefill_attention(batch["query"], batch["key_cache"], batch["value_cache"],
                                                     batch["block_tables"], out)
    within_rounding(cpu.paged_attention(**batch, scale=0.2, out=out), expected(batch, scale=0.2), torch.float32)


def test_prefill_attention_sees_a_wrong_key():
    g = torch.Generator().manual_seed(9)
    batch = make_attention_batch([50], [80], 4, 2, 32, 16, torch.float32, generator=g)
    want = expected(batch, scale=0.5)
    batch["key_cache"].view(-1, 2, 32)[int(batch["block_tables"][0, 1]) * 16 + 3, 1] += 1.0  # position 19, kv head 1
    with pytest.raises(AssertionError):
        within_rounding(cpu.paged_attention(**batch, scale=0.5), want, torch.float32)


def test_decodes_among_prefills_write_only_their_rows(decode_tasks):
    """A mixed step: the kernels take the decodes and the prefills (their query rows scattered among each other's);
    padding rows stay untouched."""
    g = torch.Generator().manual_seed(3)
    batch = make_attention_batch([5, 1, 12, 1, 3, 1], [5, 30, 20, 41, 50, 2], 6, 2, 64, 16, torch.bfloat16,
                                 num_pad_tokens=2, generator=g)
    out = torch.full_like(batch["query"], float("nan"))
    cpu.paged_attention(**batch, scale=0.2, out=out)
    want = expected(batch, scale=0.2)
    within_rounding(out[:23], want[:23], torch.bfloat16)
    assert torch.isnan(out[23:]).all(), "padding rows must stay untouched"


def test_a_wrong_scale_is_caught():
    """The comparison is tight enough to see a softmax temperature off by 1%."""
    batch = decode_batch(4, 60, (9, 3, 64), torch.float32, 16, seed=1)
    with pytest.raises(AssertionError):
        within_rounding(cpu.paged_attention(**batch, scale=0.2), expected(batch, scale=0.202), torch.float32)


def test_long_context_and_large_scores(decode_tasks):
    """Thousands of keys, scores a hundred apart (exp's range reduction over many octaves, the clamp below -87);
    within the float32 tolerance every attention kernel is held to."""
    g = torch.Generator().manual_seed(5)
    batch = make_attention_batch([1, 1], [3000, 1500], 4, 2, 64, 16, torch.float32, generator=g)
    batch["key_cache"] *= 8
    out = cpu.paged_attention(**batch, scale=0.25)
    assert_close(out, expected(batch, scale=0.25), ATTENTION_TOL)


def test_unsupported_inputs_keep_the_torch_path(monkeypatch):
    batch = decode_batch(3, 40, (4, 2, 32), torch.float16, 16, seed=2)
    out = torch.empty_like(batch["query"])
    assert not cpu_native.supports_decode_attention(batch["query"], batch["key_cache"], batch["value_cache"],
                                                    batch["block_tables"], out)
    monkeypatch.setenv(cpu_native.ENV_VAR, "0")
    f32 = decode_batch(3, 40, (4, 2, 32), torch.float32, 16, seed=2)
    assert not cpu_native.supports_decode_attention(f32["query"], f32["key_cache"], f32["value_cache"],
                                                    f32["block_tables"], torch.empty_like(f32["query"]))
    torch.testing.assert_close(cpu.paged_attention(**f32, scale=0.5), reference.paged_attention(**f32, scale=0.5),
                               rtol=2e-5, atol=2e-5)


def test_one_openmp_runtime():
    """The libraries share torch's libgomp (one thread pool), not a second copy."""
    assert all(cpu_native.library(name) is not None for name in cpu_native.SOURCES)
    with open("/proc/self/maps") as maps:
        gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


@pytest.mark.parametrize("name", sorted(cpu_native.SOURCES))
def test_built_once_per_source_compiler_and_cpu(name, tmp_path, monkeypatch):
    monkeypatch.setenv("KVBOX_CACHE_DIR", str(tmp_path))
    first = cpu_native._build(name, cpu_native.SOURCES[name][0])
    assert first.parent == tmp_path / "native" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert cpu_native._build(name, cpu_native.SOURCES[name][0]) == first  # loaded, not rebuilt
    assert first.stat().st_mtime_ns == stamp
    assert list((tmp_path / "native").iterdir()) == [first]  # no temporary left behind
    header = tmp_path / "cpu_common.h"
    header.write_bytes(cpu_native.HEADER.read_bytes() + b"\n/* changed */\n")
    monkeypatch.setattr(cpu_native, "HEADER", header)
    assert cpu_native._build(name, cpu_native.SOURCES[name][0]) != first  # the shared header is part of the digest


def test_without_a_working_compiler_the_torch_paths_serve(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KVBOX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(shutil.which("false")))
    cpu_native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kvbox.engine"):
            assert cpu_native.library("decode_attention") is None
        assert "the torch path serves" in caplog.text
        batch = decode_batch(3, 40, (4, 2, 32), torch.float32, 16, seed=4)
        torch.testing.assert_close(cpu.paged_attention(**batch, scale=0.5),
                                   reference.paged_attention(**batch, scale=0.5), rtol=2e-5, atol=2e-5)
        x = torch.randn(3, 64)
        assert not cpu_native.supports_rms_norm(x, torch.ones(64))
        torch.testing.assert_close(cpu.rms_norm(x, torch.ones(64), 1e-6), reference.rms_norm(x, torch.ones(64), 1e-6))
    finally:
        cpu_native.library.cache_clear()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_rms_norm_and_the_residual_add(rows, dtype, weight_offset):
    """As the reference rounds: float32 to within its sum of squares' order, bf16 to one ulp at most (the same
    float32 value rounded, but for a sum of squares summed in another order); the residual sum exactly."""
    g = torch.Generator().manual_seed(rows)
    wide = torch.randn(rows, 3 * 96, generator=g).to(dtype)
    x = wide[:, 96:192]  # a strided view, as a slice of a wider output is
    residual, weight = torch.randn(rows, 96, generator=g).to(dtype), torch.randn(96, generator=g).to(dtype)
    assert cpu_native.supports_rms_norm(x, weight, residual)
    normed, summed = cpu.fused_add_rms_norm(x, residual, weight, 1e-5, weight_offset)
    want_normed, want_summed = reference.fused_add_rms_norm(x, residual, weight, 1e-5, weight_offset)
    assert torch.equal(summed, want_summed)
    alone = cpu.rms_norm(x, weight, 1e-5, weight_offset)
    for got, want in ((normed, want_normed), (alone, reference.rms_norm(x, weight, 1e-5, weight_offset))):
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)
        else:
            ulp = want.float().abs() * 2.0**-7 + 1e-30
            assert ((got.float() - want.float()).abs() <= ulp).all()
            assert (got == want).float().mean() > 0.98  # almost all the very same value


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rotary_dim", [32, 16], ids=["full", "partial"])
@pytest.mark.parametrize("tokens", [1, 20])
def test_rotary_store_kv_is_the_reference_to_the_bit(tokens, rotary_dim, dtype):
    """The fused qkv output's q, k, v views rotated in place and k, v stored at their slots; a padding token
    (slot -1) rotated, not stored. The same products and differences as torch's, so equal to the bit."""
    g = torch.Generator().manual_seed(tokens + rotary_dim)
    heads, kv_heads, head_size = 6, 2, 32
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_size, generator=g).to(dtype)
    positions = torch.randint(0, 300, (tokens,), generator=g)
    slots = torch.randperm(8 * 16, generator=g)[:tokens]
    slots[tokens // 2] = -1
    caches = [torch.randn(8, 16, kv_heads, head_size, generator=g).to(dtype) for _ in range(2)]
    cos_sin = make_cos_sin_cache(512, rotary_dim).cpu()

    def split(t):
        q, k, v = t.split([heads * head_size, kv_heads * head_size, kv_heads * head_size], dim=-1)
        return q.view(tokens, heads, head_size), k.view(tokens, kv_heads, head_size), v.view(tokens, kv_heads,
                                                                                             head_size)

    expected_qkv, expected_caches = qkv.clone(), [c.clone() for c in caches]
    assert cpu_native.supports_rotary_store_kv(*split(qkv), cos_sin, *caches)
    cpu.rotary_store_kv(positions, *split(qkv), cos_sin, True, *caches, slots)
    reference.rotary_store_kv(positions, *split(expected_qkv), cos_sin, True, *expected_caches, slots)
    assert torch.equal(qkv, expected_qkv)
    assert all(torch.equal(c, e) for c, e in zip(caches, expected_caches))


def has_packed_bf16() -> bool:
    return cpu_native.supports_packing(torch.zeros(16, 2, dtype=torch.bfloat16))


DTYPES = [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.skipif(
    not has_packed_bf16(), reason="the CPU has no AVX512_BF16 (bf16 weights keep oneDNN)"))]


# Across the kernel's tiles of 8 rows and its chunks of 192.
@pytest.mark.parametrize("rows", [1, 3, 8, 9, 33, 200, 385])
@pytest.mark.parametrize("with_bias", [False, True], ids=["", "bias"])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_linears_from_packed_weights(rows, with_bias, dtype):
    """`prepack` packs a weight whose outputs are a multiple of 16 into panels, and `linear` runs it: an odd number
    of panels (the last tile has one), an input width no multiple of the vector (odd for float32), the input a
    strided view. float32: the same sums in another order, within float32 rounding of F.linear on the plain weight;
    bf16: the float32 sums of the bf16 products rounded once, so within one bf16 ulp of that."""
    g = torch.Generator().manual_seed(rows)
    in_features = 77 if dtype == torch.float32 else 78
    weight = torch.randn(13 * 16, in_features, generator=g).to(dtype)
    bias = torch.randn(13 * 16, generator=g).to(dtype) if with_bias else None
    x = torch.randn(rows, 2 * in_features, generator=g).to(dtype)[:, in_features:]
    packed = cpu.prepack(weight)
    assert cpu_native.is_packed(packed) and torch.equal(cpu.unpacked(packed), weight)
    want = torch.nn.functional.linear(x.float(), weight.float(), bias.float() if with_bias else None)

    def check(got):
        assert got.dtype == dtype and got.shape == want.shape
        if dtype == torch.float32:
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        else:
            error = (got.float() - want).abs()
            assert (error <= want.abs() * 2.0**-8 + 1e-6).all(), f"{(error - want.abs() * 2.0**-8).max()}"

    check(cpu.linear(x, packed, bias))
    wrong = weight.clone()
    wrong[200, 5] += 0.25  # one weight of the last panel moved: the comparison sees it
    with pytest.raises(AssertionError):
        check(cpu.linear(x, cpu.prepack(wrong), bias))


def test_packed_linear_keeps_leading_dimensions():
    g = torch.Generator().manual_seed(0)
    weight, x = torch.randn(32, 40, generator=g), torch.randn(2, 5, 40, generator=g)
    torch.testing.assert_close(cpu.linear(x, cpu.prepack(weight)), torch.nn.functional.linear(x, weight),
                               rtol=1e-5, atol=1e-5)


def test_weights_the_packed_kernel_does_not_take_keep_the_torch_paths(monkeypatch):
    """Outputs no multiple of 16, a bf16 weight of odd width, or the C kernels off: a float32 weight stays as it is
    (MKL's GEMM runs it), a bf16 one goes to oneDNN's layout where torch has it."""
    assert cpu.prepack(torch.randn(203, 96)) is None
    odd_bf16 = cpu.prepack(torch.randn(64, 97, dtype=torch.bfloat16))
    assert odd_bf16 is None or odd_bf16.is_mkldnn
    monkeypatch.setenv(cpu_native.ENV_VAR, "0")
    assert cpu.prepack(torch.randn(64, 96)) is None
    off_bf16 = cpu.prepack(torch.randn(64, 96, dtype=torch.bfloat16))
    assert off_bf16 is None or off_bf16.is_mkldnn


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("rows", [1, 7, 64])
def test_silu_and_mul(dtype, rows):
    """Against torch's silu, then the product, in the input dtype (the torch path it replaces; bf16 rounds the silu,
    then the product, as transformers does): float32 within a few ulp of torch's exp, bf16 within one bf16 ulp;
    gates far out where exp over- or underflows, the input a strided view."""
    g = torch.Generator().manual_seed(rows)
    x = (torch.randn(rows, 3 * 2 * 40, generator=g) * 6)[:, :2 * 40].to(dtype)
    x[0, :4] = torch.tensor([-120.0, -88.0, 90.0, 120.0], dtype=dtype)
    assert cpu_native.supports_silu_and_mul(x)
    gate, up = x.chunk(2, dim=-1)
    got, want = cpu.silu_and_mul(x), torch.nn.functional.silu(gate) * up
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-30)
    else:
        error = (got.float() - want.float()).abs()
        assert (error <= want.float().abs() * 2.0**-7 + 1e-30).all()
    wrong = x.clone()
    wrong[rows - 1, 45] += 0.5  # one up value moved: the comparison sees it
    assert not torch.allclose(cpu.silu_and_mul(wrong).float(), want.float(), rtol=1e-3, atol=1e-6)


def gguf_blocks(qtype, rows: int, in_features: int, seed: int) -> torch.Tensor:
    """[rows, row bytes] of real blocks: gguf-py quantizes the small types; the K-quants come from their fields."""
    import gguf
    import numpy as np
    from test_gguf_kernel import SMALL_TYPES, k_quant_blocks

    rng = np.random.default_rng(seed)
    if qtype in SMALL_TYPES:
        data = gguf.quants.quantize(rng.standard_normal((rows, in_features)).astype(np.float32), qtype)
    else:
        data = k_quant_blocks(qtype, rows, in_features // 256, rng)[0]
    return torch.from_numpy(np.ascontiguousarray(data))


@pytest.mark.parametrize("qtype", list(reference.GGUF_BLOCKS), ids=lambda t: reference.GGUF_TYPE_NAMES[t])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
def test_gguf_blocks_dequantize_to_the_reference_bit_for_bit(qtype, dtype):
    """Rows and the packed linear's panels, float32 and bf16 (the reference's values rounded once)."""
    packed = gguf_blocks(qtype, 32, 512, qtype)
    want = reference.dequantize_gguf(packed, qtype).to(dtype)
    assert cpu_native.supports_gguf(torch.empty(1, dtype=dtype), packed, qtype)
    assert torch.equal(cpu_native.gguf_dequantize(packed, qtype, 512, dtype, panels=False), want)
    assert torch.equal(cpu_native.unpack_linear_weight(cpu_native.gguf_dequantize(packed, qtype, 512, dtype,
                                                                                  panels=True)), want)


@pytest.mark.parametrize("rows", [1, 5, 40])
@pytest.mark.parametrize("dtype", DTYPES, ids=["f32", "bf16"])
@pytest.mark.parametrize(("out_features", "chunk_rows"), [(96, 32), (50, 32)])  # three chunks; no whole panels
def test_gguf_linear_a_chunk_of_rows_at_a_time(monkeypatch, rows, dtype, out_features, chunk_rows):
    """`kernels.cpu.gguf_linear` against F.linear on the reference's weight, with a bias: up to 8 rows multiply from
    the blocks (`gguf_matvec`; bf16 rows in float32 with the weight unrounded, the result rounded once); more rows
    chunks of rows dequantized into panels (or a width the panels do not take: the rows, then F.linear)."""
    in_features = 256
    monkeypatch.setattr(cpu, "_GGUF_CHUNK_BYTES", chunk_rows * in_features * torch.empty(0, dtype=dtype).element_size())
    qtype = 3  # Q4_1, the built-in SmolLM2's
    packed = gguf_blocks(qtype, out_features, in_features, rows)
    g = torch.Generator().manual_seed(rows)
    x = torch.randn(rows, in_features, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    weight = reference.dequantize_gguf(packed, qtype).to(dtype)
    want = torch.nn.functional.linear(x.float(), weight.float(), bias.float())
    got = cpu.gguf_linear(x, packed, qtype, bias)
    assert got.dtype == dtype and got.shape == want.shape
    if dtype == torch.float32:
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    elif rows <= cpu_native.gguf_matvec_rows():
        exact = torch.nn.functional.linear(x.float(), reference.dequantize_gguf(packed, qtype), bias.float())
        assert ((got.float() - exact).abs() <= exact.abs() * 2.0**-8 + 1e-4).all()  # one rounding to bf16
    else:
        assert ((got.float() - want).abs() <= want.abs() * 2.0**-7 + 1e-3).all()
    moved = packed.clone()
    moved[-1, 30] ^= 0x11  # two values in the last row's second block: the last chunk's columns see it
    assert not torch.allclose(cpu.gguf_linear(x, moved, qtype, bias).float(), got.float())


@pytest.mark.parametrize("qtype", list(reference.GGUF_BLOCKS), ids=lambda t: reference.GGUF_TYPE_NAMES[t])
def test_gguf_matvec_from_the_blocks(qtype):
    """float32 decode rows (1 and the most, 8) from every block type, against the reference's weight in float64:
    within float32 rounding of sums of 512 products (2^-24 of the magnitudes summed, times the terms)."""
    packed = gguf_blocks(qtype, 48, 512, qtype)
    weight = reference.dequantize_gguf(packed, qtype).double()
    for rows in (1, cpu_native.gguf_matvec_rows()):
        x = torch.randn(rows, 512, generator=torch.Generator().manual_seed(rows))
        error = (cpu_native.gguf_matvec(x, packed, qtype, 512).double() - x.double() @ weight.T).abs()
        assert (error <= 512 * 2.0**-24 * (x.double().abs() @ weight.abs().T)).all()
    # Rows of the identity pick single weights: the values it multiplies are the reference's to the bit.
    picks = torch.eye(512)[torch.arange(0, 512, 67)[:cpu_native.gguf_matvec_rows()]]
    assert torch.equal(cpu_native.gguf_matvec(picks, packed, qtype, 512), (picks.double() @ weight.T).float())
