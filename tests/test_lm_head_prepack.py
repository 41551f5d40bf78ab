"""On a CPU, the LM head runs from its weight reordered once (as the linears do: the C kernel's panels, or oneDNN's
layout where that kernel does not take bf16): in place when it has its own weight, beside the plain one when tied to
the embedding (whose lookups need the plain layout); the logits are those of a matmul on the plain weight (oneDNN's:
torch's to the bit; the panels: the float32 sums rounded once, within one bf16 ulp of them), and the engine counts
the copy."""

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.kernels import cpu, cpu_native
from engine.models.config import ModelConfig
from engine.models.loader import load_model

pytestmark = pytest.mark.skipif(kernels.prepack_linear(torch.zeros(16, 2, dtype=torch.bfloat16)) is None,
                                reason="no reordered bf16 layout here (no AVX512_BF16, no oneDNN bf16)")


def reordered(weight: torch.Tensor) -> bool:
    return weight.is_mkldnn or cpu_native.is_packed(weight)


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_runs_reordered_with_the_same_logits(tiny_model, tied):
    path = tiny_model("llama", tie_word_embeddings=tied)
    config = ModelConfig.from_pretrained(path, dtype="bfloat16")
    model = load_model(config, path, torch.device("cpu"))
    head, embedding = model.lm_head, model.model.embed_tokens
    if tied:
        assert head.weight is embedding.weight and not reordered(head.weight) and reordered(head.packed)
        assert any(buffer is head.packed for buffer in model.buffers())  # which `weight_bytes` counts
        used = head.packed
    else:
        assert reordered(head.weight) and head.packed is None
        used = head.weight
    dense = cpu.unpacked(used)  # the values as loaded
    hidden = torch.randn(3, config.hidden_size, dtype=torch.bfloat16)
    logits = model.compute_logits(hidden)
    if used.is_mkldnn:
        assert torch.equal(logits, F.linear(hidden, dense).float())
    else:
        exact = F.linear(hidden.float(), dense.float())
        assert ((logits - exact).abs() <= exact.abs() * 2.0**-8 + 1e-6).all()
        assert not torch.allclose(logits, F.linear(hidden.float(), dense.float() * 1.01), rtol=2.0**-8, atol=1e-6)
