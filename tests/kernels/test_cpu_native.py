"""The CPU decode attention in C (kernels/cpu_native.py) against the torch reference, its build cache, and the torch
path it falls back to."""

import logging
import shutil

import pytest
import torch
from test_kernels import ATTENTION_TOL, assert_close, make_attention_batch

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


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["f32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=lambda h: "q{}kv{}d{}".format(*h))
@pytest.mark.parametrize("block_size", [8, 16, 32])
def test_decode_attention_matches_the_reference(heads, dtype, block_size):
    batch = decode_batch(7, 90, heads, dtype, block_size, seed=block_size)
    out = torch.full_like(batch["query"], float("nan"))
    assert cpu_native.supports(batch["query"], batch["key_cache"], batch["value_cache"], batch["block_tables"], out)
    cpu.paged_attention(**batch, scale=0.3, out=out)
    within_rounding(out, expected(batch, scale=0.3), dtype)


@pytest.mark.parametrize("window", [1, 5, 16, 40])
def test_sliding_window(window):
    batch = decode_batch(6, 70, (6, 2, 64), torch.float32, 16, seed=window)
    out = cpu.paged_attention(**batch, scale=0.125, sliding_window=window)
    within_rounding(out, expected(batch, scale=0.125, sliding_window=window), torch.float32)


def test_decodes_among_prefills_write_only_their_rows():
    """A mixed step: the kernel takes the decodes (their query rows scattered among the prefills'), SDPA the rest."""
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


def test_long_context_and_large_scores():
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
    assert not cpu_native.supports(batch["query"], batch["key_cache"], batch["value_cache"], batch["block_tables"],
                                   out)
    monkeypatch.setenv(cpu_native.ENV_VAR, "0")
    f32 = decode_batch(3, 40, (4, 2, 32), torch.float32, 16, seed=2)
    assert not cpu_native.supports(f32["query"], f32["key_cache"], f32["value_cache"], f32["block_tables"],
                                   torch.empty_like(f32["query"]))
    torch.testing.assert_close(cpu.paged_attention(**f32, scale=0.5), reference.paged_attention(**f32, scale=0.5),
                               rtol=2e-5, atol=2e-5)


def test_one_openmp_runtime():
    """The library shares torch's libgomp (one thread pool), not a second copy."""
    assert cpu_native.library() is not None
    with open("/proc/self/maps") as maps:
        gomp = {line.split()[-1] for line in maps if "libgomp" in line}
    assert len(gomp) == 1, gomp


def test_built_once_per_source_compiler_and_cpu(tmp_path, monkeypatch):
    monkeypatch.setenv("KVBOX_CACHE_DIR", str(tmp_path))
    first = cpu_native._build()
    assert first.parent == tmp_path / "native" and first.is_file()
    stamp = first.stat().st_mtime_ns
    assert cpu_native._build() == first and first.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert list((tmp_path / "native").iterdir()) == [first]  # no temporary left behind


def test_without_a_working_compiler_the_torch_path_serves(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("KVBOX_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("CC", str(shutil.which("false")))
    cpu_native.library.cache_clear()
    try:
        with caplog.at_level(logging.WARNING, logger="kvbox.engine"):
            assert cpu_native.library() is None
        assert "the torch path serves" in caplog.text
        batch = decode_batch(3, 40, (4, 2, 32), torch.float32, 16, seed=4)
        torch.testing.assert_close(cpu.paged_attention(**batch, scale=0.5),
                                   reference.paged_attention(**batch, scale=0.5), rtol=2e-5, atol=2e-5)
    finally:
        cpu_native.library.cache_clear()
