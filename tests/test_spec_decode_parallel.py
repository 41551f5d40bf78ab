"""Speculative decoding with tensor parallelism on the CPU (gloo, 2 ranks): n-gram drafts and a draft model (which
every rank runs whole) give the single-rank engine's outputs: greedy tokens identical to decoding without
speculation, and seeded samples identical to the single rank's with the same speculation."""

import pytest

from engine import LLM
from tests.test_spec_decode import OPTIONS, PROMPTS
from tests.test_spec_decode_draft import draft_of
from tests.test_tensor_parallel import GREEDY, SEEDED, assert_same


def generate(model_dir: str, tensor_parallel_size: int, speculative_config: dict | None = None, **options):
    """The outputs of GREEDY and SEEDED, and the engine's speculative-decoding counters."""
    llm = LLM(model_dir, tensor_parallel_size=tensor_parallel_size, speculative_config=speculative_config,
              **OPTIONS, **options)
    try:
        outputs = [llm.generate(PROMPTS, params, use_tqdm=False) for params in (GREEDY, SEEDED)]
        return outputs, llm.core.stats().spec_decoding
    finally:
        llm.shutdown()


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_two_ranks_speculate_as_one(tiny_model, method):
    model_dir = tiny_model("llama", max_position_embeddings=256)
    spec = ({"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
            if method == "ngram" else {"model": draft_of(tiny_model, "llama"), "num_speculative_tokens": 3})
    plain, _ = generate(model_dir, 1)
    single, _ = generate(model_dir, 1, spec)
    two_ranks, stats = generate(model_dir, 2, spec)
    assert_same(plain[:1], two_ranks[:1])
    assert_same(single, two_ranks)
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
