"""On a CPU with oneDNN bf16, the LM head runs from its weight reordered once (as the linears do): in place when it
has its own weight, beside the plain one when tied to the embedding (whose lookups need the plain layout); the
logits are those of torch's matmul on the plain weight, to the bit, and the engine counts the copy."""

import pytest
import torch
import torch.nn.functional as F

from engine import kernels
from engine.models.config import ModelConfig
from engine.models.loader import load_model

pytestmark = pytest.mark.skipif(kernels.prepack_linear(torch.zeros(2, 2, dtype=torch.bfloat16)) is None,
                                reason="no oneDNN bf16 here")


@pytest.mark.parametrize("tied", [True, False])
def test_the_head_runs_reordered_with_the_same_logits(tiny_model, tied):
    path = tiny_model("llama", tie_word_embeddings=tied)
    config = ModelConfig.from_pretrained(path, dtype="bfloat16")
    model = load_model(config, path, torch.device("cpu"))
    head, embedding = model.lm_head, model.model.embed_tokens
    if tied:
        assert head.weight is embedding.weight and not head.weight.is_mkldnn and head.packed.is_mkldnn
        assert any(buffer is head.packed for buffer in model.buffers())  # which `weight_bytes` counts
        dense = head.weight
    else:
        assert head.weight.is_mkldnn and head.packed is None
        dense = head.weight.to_dense()  # the values as loaded
    hidden = torch.randn(3, config.hidden_size, dtype=torch.bfloat16)
    assert torch.equal(model.compute_logits(hidden), F.linear(hidden, dense).float())
