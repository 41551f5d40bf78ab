"""Structured outputs in the engine (offline `LLM`, no HTTP): every JSON output validates against its schema even on
random tiny weights; regex, choice and EBNF outputs match; n > 1 and async scheduling keep one matcher per sample;
requests without a grammar come out token-identical beside structured ones; the bitmask crosses as plain data."""

import json
import re

import jsonschema
import msgspec
import pytest

from engine import LLM, SamplingParams
from engine.contract import SchedulerOutput
from engine.sampling_params import InvalidParameterError
from engine.structured_output.params import StructuredOutputsParams

PROMPTS = ["The quick brown fox", "Once upon a time"]
# Bounded strings and enums: a random model picks a closing quote once in hundreds of tokens. (A pattern, not
# maxLength: xgrammar 0.2.9's maxLength strings admit raw control characters, which JSON forbids.)
SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "pattern": "^[a-z]{1,6}$"},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "colour": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 3},
    },
    "required": ["name", "age", "colour", "tags"],
    "additionalProperties": False,
}


@pytest.fixture(scope="module")
def llm(tiny_model):
    return LLM(tiny_model("llama", max_position_embeddings=512), device="cpu", dtype="float32", num_kv_blocks=200)


@pytest.fixture(scope="module")
def async_llm(tiny_model):
    return LLM(tiny_model("llama", max_position_embeddings=512), device="cpu", dtype="float32", num_kv_blocks=200,
               async_scheduling=True)


def structured(**kind) -> StructuredOutputsParams:
    return StructuredOutputsParams(**kind)


def texts(llm, params, prompts=PROMPTS):
    return [(c.text, c.finish_reason) for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]


@pytest.mark.parametrize("scheduling", ["sync", "async"])
def test_json_schema_outputs_validate_for_every_sample(llm, async_llm, scheduling):
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=80, structured_outputs=structured(json=SCHEMA))
    results = texts(llm if scheduling == "sync" else async_llm, params)
    assert len(results) == 2 * len(PROMPTS)
    for text, reason in results:
        assert reason == "stop", text
        jsonschema.validate(json.loads(text), SCHEMA)
        assert "\n" not in text and "  " not in text  # compact: no free whitespace


def test_json_object_is_an_object(llm):
    params = SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=structured(json_object=True))
    for text, reason in texts(llm, params):
        if reason == "stop":  # a random model may not close its strings within max_tokens
            assert isinstance(json.loads(text), dict)
        assert text.startswith("{")


def test_regex_choice_and_grammar(llm):
    regex = texts(llm, SamplingParams(temperature=1.0, seed=3, max_tokens=20,
                                      structured_outputs=structured(regex=r"[0-9]{3}-(yes|no)")))
    assert all(re.fullmatch(r"[0-9]{3}-(yes|no)", t) and r == "stop" for t, r in regex), regex
    choices = ["red", 'say "hi"', "x\ny"]
    picked = texts(llm, SamplingParams(n=3, temperature=1.0, seed=1, max_tokens=20,
                                       structured_outputs=structured(choice=choices)))
    assert all(t in choices and r == "stop" for t, r in picked), picked
    grammar = 'root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]'
    sums = texts(llm, SamplingParams(temperature=1.0, seed=5, max_tokens=30,
                                     structured_outputs=structured(grammar=grammar)))
    for text, reason in sums:
        assert re.fullmatch(r"\(\d(\+\d)*\)", text if reason == "stop" else text + ")"), text


@pytest.mark.parametrize("scheduling", ["sync", "async"])
def test_unstructured_requests_are_token_identical_beside_structured_ones(llm, async_llm, scheduling):
    llm = llm if scheduling == "sync" else async_llm
    plain = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, plain, use_tqdm=False)]
    mixed_params = [plain, SamplingParams(temperature=0.0, max_tokens=30, structured_outputs=structured(json=SCHEMA)),
                    plain, SamplingParams(temperature=0.0, max_tokens=10, structured_outputs=structured(regex="a+"))]
    mixed = llm.generate([PROMPTS[0], PROMPTS[1], PROMPTS[1], PROMPTS[0]], mixed_params, use_tqdm=False)
    assert [mixed[0].outputs[0].token_ids, mixed[2].outputs[0].token_ids] == alone
    assert mixed[3].outputs[0].text.strip("a") == ""


def test_async_scheduling_fills_the_bitmask_late_with_the_same_outputs(llm, async_llm, monkeypatch):
    """Scheduled ahead, a structured step gets its bitmask after its forward is queued; greedy outputs (which a
    bitmask computed one token early would change) equal the synchronous engine's, beside free requests."""
    core = async_llm.core
    assert core.scheduler.defer_grammar_bitmask and not llm.core.scheduler.defer_grammar_bitmask
    late = []
    fill = core._sample_under_grammar
    monkeypatch.setattr(core, "_sample_under_grammar", lambda out: late.append(core._in_flight[0][0].step_id) or fill(out))
    params = [SamplingParams(temperature=0.0, max_tokens=60, structured_outputs=structured(json=SCHEMA)),
              SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True),
              SamplingParams(temperature=0.0, max_tokens=8, structured_outputs=structured(regex="[a-z]{2,12}"))]
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[1]]
    want = [(c.token_ids, c.finish_reason) for o in llm.generate(prompts, params, use_tqdm=False) for c in o.outputs]
    got = [(c.token_ids, c.finish_reason) for o in async_llm.generate(prompts, params, use_tqdm=False)
           for c in o.outputs]
    assert got == want
    assert len(late) > 10


def test_a_bad_grammar_ends_its_request_with_an_error_and_nothing_else(llm):
    outputs = llm.generate(PROMPTS[:2], [SamplingParams(max_tokens=5, structured_outputs=structured(regex="a(b")),
                                         SamplingParams(max_tokens=5, temperature=0.0)], use_tqdm=False)
    assert outputs[0].outputs[0].finish_reason == "error"
    assert outputs[1].outputs[0].finish_reason == "length"


def test_params_checks():
    with pytest.raises(InvalidParameterError, match="exactly one") as e:
        StructuredOutputsParams(regex="a", choice=["b"])
    assert e.value.param == "structured_outputs"
    with pytest.raises(InvalidParameterError) as e:
        StructuredOutputsParams(choice=[])
    with pytest.raises(InvalidParameterError) as e:
        StructuredOutputsParams(choice="abc")
    assert e.value.param == "structured_outputs.choice"
    assert StructuredOutputsParams(json={"b": 1, "a": 2}).key == StructuredOutputsParams(json='{"a":2,"b":1}').key


def test_the_bitmask_crosses_as_plain_data():
    out = SchedulerOutput(step_id=3, structured_req_ids=["a", "b"], grammar_bitmask=b"\x01\x00\x00\x00" * 4)
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(out), type=SchedulerOutput) == out
    params = SamplingParams(structured_outputs=structured(json=SCHEMA))
    assert msgspec.msgpack.decode(msgspec.msgpack.encode(params), type=SamplingParams) == params


@pytest.mark.gpu
@pytest.mark.skipif(not __import__("torch").cuda.is_available(), reason="needs a CUDA device")
def test_json_schema_on_cuda_with_graphs_and_async_scheduling(tiny_model):
    """The bitmask applied on the device, beside decode steps that replay CUDA graphs."""
    llm = LLM(tiny_model("llama", max_position_embeddings=512), device="cuda", dtype="float32", num_kv_blocks=200,
              async_scheduling=True)
    params = SamplingParams(n=2, temperature=1.0, seed=7, max_tokens=80, structured_outputs=structured(json=SCHEMA))
    plain = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    expected = texts(llm, plain)
    outputs = llm.generate([*PROMPTS, *PROMPTS], [params, params, plain, plain], use_tqdm=False)
    for output in outputs[:2]:
        for completion in output.outputs:
            assert completion.finish_reason == "stop", completion.text
            jsonschema.validate(json.loads(completion.text), SCHEMA)
    assert [(o.outputs[0].text, o.outputs[0].finish_reason) for o in outputs[2:]] == expected
