"""A decoder embedding model (Qwen3-Embedding style) sharded over two tensor-parallel ranks and split into two
pipeline stages on the CPU (gloo): the same embeddings as one rank (float32, within rounding) and as transformers,
with chunked prefill (a prompt pooled over several steps, and over stages with several steps in flight); encoders
run whole on one rank and say so, at config check already."""

from __future__ import annotations

import pytest
import torch
from test_pooling_models import TEXTS, _assert_close, _embed, _llm, _reference

from appliance.config import ConfigError, load_config
from engine.config import ENCODER_ARCHITECTURES, EngineConfigError
from engine.models import registry


@pytest.fixture(scope="module")
def qwen3(tiny_model):
    return tiny_model("qwen3", num_hidden_layers=3)  # stages of 2 + 1 layers


@pytest.mark.parametrize("parallel", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
@pytest.mark.parametrize("pooling", ["last", "mean"])
def test_split_decoder_embedder_answers_as_one_rank_and_as_transformers(qwen3, parallel, pooling):
    options = dict(task="embed", pooling_type=pooling, max_num_batched_tokens=16)  # the longest text takes 3 steps
    single = _embed(_llm(qwen3, **options), TEXTS)
    llm = _llm(qwen3, **options, **parallel)
    try:
        split = _embed(llm, TEXTS)
        again = _embed(llm, TEXTS[::-1]).flip(0)  # with the prefix cache holding these prompts
    finally:
        llm.shutdown()
    torch.testing.assert_close(split, single, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(again, single, rtol=1e-5, atol=1e-5)
    _assert_close(split, _reference(qwen3, TEXTS, pooling))


@pytest.mark.parametrize("key", ["tensor_parallel_size", "pipeline_parallel_size"])
def test_an_encoder_runs_on_one_rank(tiny_model, key):
    with pytest.raises(EngineConfigError, match=f"{key}: must be 1 for an encoder model"):
        _llm(tiny_model("bert", pooling="mean"), task="embed", **{key: 2})


@pytest.mark.parametrize("parallelism, key", [("{tensor: 2}", "parallelism.tensor"),
                                              ("{pipeline: 2}", "parallelism.pipeline")])
def test_config_check_refuses_a_split_encoder_before_anything_starts(tiny_model, tmp_path, parallelism, key):
    path = tmp_path / "config.yaml"
    path.write_text(f"models:\n  - {{name: e, source: {tiny_model('bert', pooling='mean')}, task: embed, "
                    f"parallelism: {parallelism}}}\n")
    with pytest.raises(ConfigError, match=rf"models\[0\]\.{key}: must be 1 for an encoder model"):
        load_config(path)


def test_the_config_knows_the_registrys_encoders():
    assert ENCODER_ARCHITECTURES == set(registry._ENCODERS) | set(registry._CROSS_ENCODERS)
