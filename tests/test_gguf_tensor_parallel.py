"""GGUF files split for tensor parallelism: each rank keeps its share of the packed blocks (column-parallel linears
their rows, row-parallel ones whole blocks of their inputs) and the engine answers as on one rank; a split that
would cut a block is refused at load, naming the sizes."""

from __future__ import annotations

import pytest
import torch
from gguf import GGMLQuantizationType as QType

from engine import LLM, SamplingParams
from engine.models.config import ModelConfig
from engine.models.loader import load_model, weight_bytes
from engine.tools.tiny_model import build_tiny_model
from tests.test_gguf import packed_types, write_gguf

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Once upon a time"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)


@pytest.fixture(scope="module")
def wide_llama(tmp_path_factory):
    """Each rank's share of every row is a multiple of 256 values at tensor 2, as K-quant blocks need."""
    return str(build_tiny_model("llama", tmp_path_factory.mktemp("llama512"), hidden_size=512,
                                intermediate_size=512, head_dim=64, num_attention_heads=8, num_key_value_heads=2))


def _generate(path, tokenizer: str, **options) -> list:
    llm = LLM(str(path), tokenizer=tokenizer, dtype="float32", device="cpu", **options)
    try:
        return llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


@pytest.mark.parametrize("qtype", [QType.Q4_1, QType.Q4_K], ids=lambda qtype: qtype.name)
def test_tensor_parallel_ranks_answer_as_one(wide_llama, tmp_path, qtype):
    path = tmp_path / "model.gguf"
    # Q4_K_M's mix: v_proj and down_proj in Q6_K, so a merged qkv holds runs of two block types.
    write_gguf(wide_llama, path, "llama", qtype, {"v_proj": QType.Q6_K, "down_proj": QType.Q6_K})
    config = ModelConfig.from_pretrained(path, dtype="float32")
    whole = load_model(config, path, torch.device("cpu"))
    shard = load_model(config, path, torch.device("cpu"), tp_rank=1, tp_size=2)
    assert packed_types(shard) == packed_types(whole) == {int(qtype), int(QType.Q6_K)}  # blocks kept packed
    assert weight_bytes(shard) < 0.6 * weight_bytes(whole)  # and halved (the norms stay whole on every rank)
    expected, actual = _generate(path, wide_llama), _generate(path, wide_llama, tensor_parallel_size=2)
    for want, got in zip(expected, actual):
        assert got.outputs[0].token_ids == want.outputs[0].token_ids
        for a, b in zip(want.outputs[0].logprobs, got.outputs[0].logprobs):
            assert a.token_ids == b.token_ids
            # The sums split across ranks: float32 rounding apart.
            assert max(abs(x - y) for x, y in zip(a.logprobs, b.logprobs)) < 1e-4


def test_a_split_that_cuts_a_block_is_refused(tmp_path):
    folder = build_tiny_model("llama", tmp_path / "hf", hidden_size=256, intermediate_size=256, head_dim=64)
    path = tmp_path / "model.gguf"
    write_gguf(str(folder), path, "llama", QType.Q4_K)
    config = ModelConfig.from_pretrained(path, dtype="float32")
    with pytest.raises(ValueError, match="this rank's 128 inputs do not split the GGUF blocks of 256 values"):
        load_model(config, path, torch.device("cpu"), tp_rank=0, tp_size=2)
