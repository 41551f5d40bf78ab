"""A draft model with pipeline stages on the CPU (gloo): the first stage drafts and sends the drafts to the last
stage, which verifies them (engine.spec_decode.stage_drafts). Greedy tokens are the single-stage engine's with the
same draft, and decoding's without one; sampled requests keep speculating and are reproducible under a seed."""

import pytest

from tests.test_spec_decode_draft import draft_of, spec
from tests.test_spec_decode_parallel import generate
from tests.test_tensor_parallel import SEEDED, assert_same


@pytest.mark.parametrize("family", ["llama", "gemma2"])
def test_stages_with_a_draft_model_answer_as_one(tiny_model, family):
    model_dir = tiny_model(family, num_hidden_layers=3, max_position_embeddings=256)
    speculative = spec(draft_of(tiny_model, family))
    plain, _ = generate(model_dir, 1)
    single, _ = generate(model_dir, 1, speculative)
    staged, stats = generate(model_dir, 1, speculative, pipeline_parallel_size=2)
    assert_same(plain[:1], staged[:1])
    assert_same(single[:1], staged[:1])
    assert stats.num_drafts > 0 and 0 < stats.num_accepted_tokens <= stats.num_draft_tokens
    again, _ = generate(model_dir, 1, speculative, pipeline_parallel_size=2)
    seeded = [[c.token_ids for c in out.outputs] for out in staged[1]]
    assert seeded == [[c.token_ids for c in out.outputs] for out in again[1]]
    assert all(len(c) == SEEDED.max_tokens for sample in seeded for c in sample)


def test_tensor_parallel_stages_with_a_draft_model(tiny_model):
    """tp=2 x pp=2 (four processes): each first-stage rank drafts and sends to its shard's last-stage rank."""
    model_dir = tiny_model("llama", num_hidden_layers=3, max_position_embeddings=256)
    speculative = spec(draft_of(tiny_model, "llama"))
    single, _ = generate(model_dir, 1, speculative)
    staged, stats = generate(model_dir, 2, speculative, pipeline_parallel_size=2)
    assert_same(single[:1], staged[:1])
    assert stats.num_drafts > 0
