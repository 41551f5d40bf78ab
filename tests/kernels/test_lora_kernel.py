"""The multi-LoRA kernels (kernels/lora.py) against `kernels.reference.add_lora`, on fresh random inputs: mixed
slots in one batch (tokens with no adapter included), adapters of several ranks zero-padded to the slot rank, plain
and merged (q/k/v, gate/up) layers; the per-token Triton kernels and the dense (GEMM) path of large batches.

Without CUDA the tiny cases run under the Triton interpreter (see conftest.py); the sweep at Llama-3-8B shapes is
marked `gpu`.
"""

import pytest
import torch
from test_kernels import CPU_DTYPES, DEVICE, GPU_DTYPES, dtype_id, gpu

from engine.kernels import lora, reference

# (atol, rtol). float32 sums up to 14336 products in another order than the reference; on the GPU, half-precision
# expands round the shrunk activations to the weights' dtype (as PEFT does) where the reference keeps float32.
TOL = {
    torch.float32: (5e-5, 1e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (2e-2, 2e-2),
}


def make_lora_batch(num_tokens, in_features, output_slices, max_loras, max_rank, dtype, *, grouped=False, seed=0):
    """Random adapters in every slot, each of its own rank zero-padded to max_rank as the engine stores them, and
    one slot per token (-1: none), shuffled or grouped by slot as the runner orders them. x is a strided view."""
    g = torch.Generator().manual_seed(seed)
    num_slices, out_features = len(output_slices), sum(output_slices)
    ranks = torch.randint(1, max_rank + 1, (max_loras,), generator=g).tolist()
    ranks[0] = max_rank
    lora_a = torch.randn(max_loras, num_slices, max_rank, in_features, generator=g) * in_features**-0.5
    lora_b = torch.randn(max_loras, out_features, max_rank, generator=g) * max_rank**-0.5
    for slot, rank in enumerate(ranks):
        lora_a[slot, :, rank:] = 0
        lora_b[slot, :, rank:] = 0
    token_slots = torch.randint(-1, max_loras, (num_tokens,), generator=g, dtype=torch.int32)
    if grouped:
        token_slots = token_slots.sort().values
    wide = torch.randn(num_tokens, in_features + 8, generator=g)
    out = torch.randn(num_tokens, out_features, generator=g)
    return dict(
        out=out.to(dtype).to(DEVICE),
        x=wide.to(dtype).to(DEVICE)[:, :in_features],
        lora_a=lora_a.transpose(0, 1).contiguous().to(dtype).to(DEVICE),  # [num_slices, max_loras, max_rank, in]
        lora_b=lora_b.transpose(0, 1).contiguous().to(dtype).to(DEVICE),  # [out, max_loras, max_rank]
        token_slots=token_slots.to(DEVICE),
        output_slices=tuple(output_slices),
    )


def check_add_lora(*args, add_lora=lora.add_lora, **kwargs):
    batch = make_lora_batch(*args, **kwargs)
    expected = batch["out"].clone()
    reference.add_lora(**{**batch, "out": expected})
    before = batch["out"].clone()
    add_lora(**batch)
    atol, rtol = TOL[expected.dtype]
    torch.testing.assert_close(batch["out"], expected, atol=atol, rtol=rtol)
    no_adapter = batch["token_slots"] < 0
    assert torch.equal(batch["out"][no_adapter], before[no_adapter]), "tokens without an adapter must stay untouched"


# (in_features, output_slices): a plain layer, q/k/v with GQA, gate/up; widths not multiples of the blocks. Small
# batches split in_features over programs: 300 splits four ways, the last split past the end.
LAYERS = [(48, (40,)), (64, (64, 32, 32)), (300, (80, 80))]


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layer", LAYERS, ids=["plain", "qkv", "gate_up"])
@pytest.mark.parametrize("num_tokens", [1, 7, 70])  # 70: more than one token block
def test_add_lora_small(num_tokens, layer, dtype):
    check_add_lora(num_tokens, *layer, 4, 8, dtype)


@pytest.mark.parametrize("dtype", CPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layer", LAYERS, ids=["plain", "qkv", "gate_up"])
@pytest.mark.parametrize("num_tokens", [1, 70])
def test_add_lora_dense(num_tokens, layer, dtype):
    check_add_lora(num_tokens, *layer, 4, 8, dtype, add_lora=lora.add_lora_dense)


def test_add_lora_takes_the_dense_path_for_large_batches(monkeypatch):
    taken = []
    monkeypatch.setattr(lora, "_add_lora_dense", lambda *args: taken.append("dense"))
    monkeypatch.setattr(lora, "_add_lora_per_token", lambda *args: taken.append("per token"))
    for num_tokens, max_loras, max_rank in [(600, 2, 8), (512, 2, 8), (600, 4, 8)]:  # 300 inputs: 18 ranks dense
        lora.add_lora(**make_lora_batch(num_tokens, 300, (80, 80), max_loras, max_rank, torch.float32))
    assert taken == ["dense", "per token", "per token"]
    monkeypatch.undo()
    check_add_lora(600, 300, (80, 80), 2, 8, torch.float32, grouped=True)  # the real dense path, chosen by add_lora


@pytest.mark.parametrize("max_loras,max_rank", [(1, 16), (3, 4), (6, 24)])
@pytest.mark.parametrize("grouped", [False, True], ids=["shuffled", "grouped"])
def test_add_lora_slots_and_ranks(grouped, max_loras, max_rank):
    check_add_lora(37, 64, (64, 32, 32), max_loras, max_rank, torch.float32, grouped=grouped, seed=max_rank)


def test_add_lora_without_adapters_changes_nothing():
    batch = make_lora_batch(9, 32, (48,), 2, 8, torch.float16)
    batch["token_slots"].fill_(-1)
    before = batch["out"].clone()
    lora.add_lora(**batch)
    assert torch.equal(batch["out"], before)


def test_add_lora_rejects_bad_input():
    batch = make_lora_batch(5, 32, (32, 16, 16), 2, 8, torch.float32)
    with pytest.raises(ValueError, match="shapes disagree"):
        lora.add_lora(**{**batch, "output_slices": (32, 32)})
    with pytest.raises(TypeError, match="share a dtype"):
        lora.add_lora(**{**batch, "lora_b": batch["lora_b"].half()})
    with pytest.raises(ValueError, match="token_slots"):
        lora.add_lora(**{**batch, "token_slots": batch["token_slots"][:3]})


# Llama-3-8B: q/k/v, o, gate/up and down projections.
GPU_LAYERS = [(4096, (4096, 1024, 1024)), (4096, (4096,)), (4096, (14336, 14336)), (14336, (4096,))]


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layer", GPU_LAYERS, ids=["qkv", "o", "gate_up", "down"])
@pytest.mark.parametrize("num_tokens", [1, 8, 64, 333, 2048])
@pytest.mark.parametrize("max_rank", [16, 64])
def test_add_lora_gpu_sweep(max_rank, num_tokens, layer, dtype):
    """2048 tokens take the dense path at rank 16 (8 x 16 ranks next to 4096 inputs), the per-token one at 64."""
    if dtype == torch.float32 and (max_rank != 16 or num_tokens > 333):
        pytest.skip("float32: one rank and the smaller batches, to keep the sweep short")
    check_add_lora(num_tokens, *layer, 8, max_rank, dtype, grouped=num_tokens > 64, seed=num_tokens)


@gpu
@pytest.mark.parametrize("dtype", GPU_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("layer", GPU_LAYERS, ids=["qkv", "o", "gate_up", "down"])
@pytest.mark.parametrize("num_tokens", [8, 333])
def test_add_lora_dense_gpu(num_tokens, layer, dtype):
    check_add_lora(num_tokens, *layer, 8, 16, dtype, grouped=True, seed=num_tokens, add_lora=lora.add_lora_dense)
