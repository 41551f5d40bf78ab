"""Structured outputs with tensor and pipeline parallelism: the step's grammar bitmask crosses to every rank as plain
data, so each rank masks the same gathered logits and samples the same tokens, and the last stage (pipeline) masks
with the bitmask of its own step while later steps are in flight: outputs equal the single-rank engine's and follow
their schema."""

import json

import jsonschema
import pytest

from engine import LLM, SamplingParams
from engine.structured_output.params import StructuredOutputsParams
from tests.test_structured_engine import PROMPTS, SCHEMA

PARAMS = [SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=80,
                         structured_outputs=StructuredOutputsParams(json=SCHEMA)),
          SamplingParams(temperature=0.0, max_tokens=20,
                         structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}-(yes|no)")),
          SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)]  # a row with no grammar beside them


def _run(model_dir: str, **options) -> list[list[str]]:
    llm = LLM(model_dir, device="cpu", dtype="float32", num_kv_blocks=200, **options)
    try:
        outputs = llm.generate(PROMPTS * len(PARAMS), [p for p in PARAMS for _ in PROMPTS], use_tqdm=False)
        return [[c.text for c in o.outputs] for o in outputs]
    finally:
        llm.shutdown()


@pytest.mark.parametrize("options", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_parallel_ranks_follow_the_grammar_as_one(tiny_model, options):
    model_dir = tiny_model("llama", max_position_embeddings=512, num_hidden_layers=3)
    expected = _run(model_dir)
    assert _run(model_dir, **options) == expected
    for texts in expected[:len(PROMPTS)]:  # the JSON ones
        for text in texts:
            jsonschema.validate(json.loads(text), SCHEMA)
