"""The CPU fast paths (kernels/cpu.py) against the torch references they stand in for, and the torch backend's
choice of them."""

import pytest
import torch
from test_kernels import (ATTENTION_TOL, CPU_DTYPES, DECODE, ELEMENTWISE_TOL, MIXED, assert_close, dtype_id,
                          make_attention_batch, make_cos_sin_cache)

from engine import kernels
from engine.kernels import cpu, cpu_native, reference

# Prefills of one shape (a batch of prompts: one SDPA call), and chunks on top of earlier context.
SAME_SHAPE = ([9, 9, 9], [9, 9, 9])
CHUNKS = ([4, 4, 1], [20, 20, 33])


@pytest.fixture(params=["native", "torch"])
def decode_path(request, monkeypatch):
    """Decodes go to the C kernel where it builds (tests/kernels/test_cpu_native.py holds it); the torch path they
    take without one is held here too."""
    monkeypatch.setenv(cpu_native.ENV_VAR, "1" if request.param == "native" else "0")


def check_attention(q_lens, seq_lens, num_heads, num_kv_heads, dtype, *, sliding_window=0, soft_cap=0.0,
                    in_order=False, seed=0):
    batch = make_attention_batch(q_lens, seq_lens, num_heads, num_kv_heads, 32, 16, dtype, num_pad_tokens=2,
                                 generator=torch.Generator().manual_seed(seed))
    if in_order:  # every sequence's blocks consecutive in the pool: read as a view, not gathered
        first = 0
        for seq, seq_len in enumerate(seq_lens):
            n = -(-seq_len // 16)
            batch["block_tables"][seq, :n] = torch.arange(first, first + n)
            first += n
    out = torch.full_like(batch["query"], float("nan"))
    result = cpu.paged_attention(**batch, scale=0.2, sliding_window=sliding_window, soft_cap=soft_cap, out=out)
    expected = reference.paged_attention(**batch, scale=0.2, sliding_window=sliding_window, soft_cap=soft_cap)
    num_valid = sum(q_lens)
    assert result is out
    assert_close(out[:num_valid], expected[:num_valid], ATTENTION_TOL)
    assert torch.isnan(out[num_valid:]).all(), "padding rows must stay untouched"


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("heads", [(6, 2), (4, 4)], ids=lambda h: f"{h[0]}q{h[1]}kv")
@pytest.mark.parametrize("lens", [DECODE, MIXED, SAME_SHAPE, CHUNKS], ids=["decode", "mixed", "same", "chunks"])
def test_paged_attention(lens, heads, dtype, decode_path):
    check_attention(*lens, *heads, dtype)


@pytest.mark.parametrize("lens", [([1], [40]), ([1], [16]), ([30], [30]), DECODE], ids=["one", "one-block", "prefill",
                                                                                      "decode"])
def test_paged_attention_blocks_in_order(lens, decode_path):
    check_attention(*lens, 6, 2, torch.float32, in_order=True)


@pytest.mark.parametrize("window,cap", [(7, 0.0), (0, 5.0)])
@pytest.mark.parametrize("lens", [DECODE, MIXED, SAME_SHAPE, ([1], [40])], ids=["decode", "mixed", "same", "one"])
def test_paged_attention_window_and_soft_cap(lens, window, cap, decode_path):
    check_attention(*lens, 4, 2, torch.float32, sliding_window=window, soft_cap=cap)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("padded", [False, True], ids=["all-stored", "padded"])
@pytest.mark.parametrize("is_neox", [True, False], ids=["neox", "interleaved"])
def test_rotary_store_kv(is_neox, padded, dtype):
    """q and k as the fused qkv projection lays them out (rotated in one pass), and as separate tensors."""
    g = torch.Generator().manual_seed(0)
    num_tokens, heads, kv_heads, head_size, rotary_dim = 11, 6, 2, 32, 16
    qkv = torch.randn(num_tokens, (heads + 2 * kv_heads) * head_size, generator=g).to(dtype)
    q_size, kv_size = heads * head_size, kv_heads * head_size

    def split(t):
        return (t[:, :q_size].view(num_tokens, heads, head_size),
                t[:, q_size:q_size + kv_size].view(num_tokens, kv_heads, head_size),
                t[:, q_size + kv_size:].view(num_tokens, kv_heads, head_size))

    positions = torch.randint(0, 512, (num_tokens,), generator=g)
    slots = torch.randperm(8 * 16, generator=g)[:num_tokens]
    if padded:
        slots[::3] = -1
    caches = [torch.randn(8, 16, kv_heads, head_size, generator=g).to(dtype) for _ in range(2)]
    expected_caches = [c.clone() for c in caches]
    expected_qkv, separate_qkv = qkv.clone(), qkv.clone()
    cos_sin = make_cos_sin_cache(512, rotary_dim).cpu()
    cpu.rotary_store_kv(positions, *split(qkv), cos_sin, is_neox, *caches, slots)
    reference.rotary_store_kv(positions, *split(expected_qkv), cos_sin, is_neox, *expected_caches, slots)
    assert_close(qkv, expected_qkv, ELEMENTWISE_TOL)
    assert torch.equal(qkv[:, q_size + kv_size:], expected_qkv[:, q_size + kv_size:])
    assert_close(caches[0], expected_caches[0], ELEMENTWISE_TOL)
    assert torch.equal(caches[1], expected_caches[1])
    if dtype == torch.float32:  # the same products and sums as the reference, in fewer ops: equal to the bit
        assert torch.equal(qkv, expected_qkv)
    q, k, _ = split(separate_qkv)
    q, k = q.clone(), k.clone()  # not side by side: rotated one after the other
    cpu.rotary_embedding(positions, q, k, cos_sin, is_neox)
    assert_close(q, split(expected_qkv)[0], ELEMENTWISE_TOL)
    assert_close(k, split(expected_qkv)[1], ELEMENTWISE_TOL)


def test_step_metadata_is_computed_once_per_step_and_follows_writes():
    """What the layers of one step share is computed by the first (its memo sits on the step's seq_lens view, which
    every layer receives); a new step's views start empty, and a write to the same tensor outside inference mode
    (it counts its writes) drops the memo."""
    batch = make_attention_batch([1, 1], [40, 17], 4, 2, 32, 16, torch.float32,
                                 generator=torch.Generator().manual_seed(1))
    calls = []
    sequences = cpu._sequences
    try:
        cpu._sequences = lambda *args: calls.append(1) or sequences(*args)
        for _ in range(3):  # three layers of one step
            out = cpu.paged_attention(**batch, scale=0.2)
        assert len(calls) == 1
        batch["seq_lens"][1] = 30  # the same tensor, rewritten
        out = cpu.paged_attention(**batch, scale=0.2)
        assert len(calls) == 2
        assert_close(out[:2], reference.paged_attention(**batch, scale=0.2)[:2], ATTENTION_TOL)
        batch["seq_lens"] = batch["seq_lens"].clone()  # the next step's view
        cpu.paged_attention(**batch, scale=0.2)
        assert len(calls) == 3
    finally:
        cpu._sequences = sequences


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
def test_norms_and_activation(weight_offset, dtype):
    g = torch.Generator().manual_seed(0)
    x, residual = (torch.randn(5, 64, generator=g).to(dtype) for _ in range(2))
    weight = torch.randn(64, generator=g).to(dtype)
    assert_close(cpu.rms_norm(x, weight, 1e-5, weight_offset), reference.rms_norm(x, weight, 1e-5, weight_offset),
                 ELEMENTWISE_TOL)
    normed, summed = cpu.fused_add_rms_norm(x, residual, weight, 1e-5, weight_offset)
    expected_normed, expected_summed = reference.fused_add_rms_norm(x, residual, weight, 1e-5, weight_offset)
    assert_close(normed, expected_normed, ELEMENTWISE_TOL)
    assert torch.equal(summed, expected_summed)
    gate_up = torch.randn(5, 64, generator=g).to(dtype)
    assert_close(cpu.silu_and_mul(gate_up), reference.silu_and_mul(gate_up), ELEMENTWISE_TOL)


def test_torch_backend_takes_the_fast_paths():
    ops = kernels.load_backend("torch")
    assert ops.paged_attention is cpu.paged_attention and ops.rms_norm is cpu.rms_norm
    assert ops.linear is cpu.linear


def has_onednn_bf16() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@pytest.mark.skipif(not has_onednn_bf16(), reason="no oneDNN bf16 here")
@pytest.mark.parametrize("rows", [1, 5, 64])
def test_a_bf16_weight_reordered_for_onednn_gives_torch_linears_result_to_the_bit(rows, monkeypatch):
    """Where the packed C kernel does not take a bf16 weight (here: the C kernels off), oneDNN's layout serves."""
    monkeypatch.setenv(cpu_native.ENV_VAR, "0")
    g = torch.Generator().manual_seed(rows)
    weight = torch.randn(96, 80, generator=g).to(torch.bfloat16)
    bias = torch.randn(96, generator=g).to(torch.bfloat16)
    x = torch.randn(rows, 160, generator=g).to(torch.bfloat16)[:, ::2]  # a strided input, as a qkv slice is
    packed = cpu.prepack(weight)
    assert packed.is_mkldnn and packed.dtype == torch.bfloat16
    assert torch.equal(cpu.linear(x, packed, bias), torch.nn.functional.linear(x, weight, bias))
    assert torch.equal(cpu.linear(x, packed), reference.linear(x, weight))


def test_without_the_c_kernels_only_bf16_matrices_are_prepacked(monkeypatch):
    """float32 then keeps MKL's GEMM on the plain weight; vectors are never reordered."""
    monkeypatch.setenv(cpu_native.ENV_VAR, "0")
    assert cpu.prepack(torch.zeros(16, 4)) is None
    assert cpu.prepack(torch.zeros(16, dtype=torch.bfloat16)) is None


@pytest.mark.skipif(cpu.prepack(torch.zeros(2, 2, dtype=torch.bfloat16)) is None, reason="no oneDNN bf16 here")
def test_a_bf16_model_on_the_cpu_holds_its_linears_prepacked_with_the_checkpoints_values(tiny_model):
    from safetensors.torch import load_file

    from engine import LLM, SamplingParams

    path = tiny_model("llama")
    llm = LLM(path, device="cpu", dtype="bfloat16", kv_cache_memory_bytes=8 << 20)
    layer = llm.core.runner.model.model.layers[0].mlp.down_proj
    # one copy, the reordered one: packed panels where the C kernel takes bf16, oneDNN's layout elsewhere
    assert cpu_native.is_packed(layer.weight) or layer.weight.is_mkldnn
    stored = load_file(f"{path}/model.safetensors")["model.layers.0.mlp.down_proj.weight"]
    assert torch.equal(cpu.unpacked(layer.weight), stored.to(torch.bfloat16))
    out = llm.generate([[5, 6, 7]], SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 4
