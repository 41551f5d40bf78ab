"""Speculative decoding (n-gram) through the engine: greedy outputs identical to decoding without it (tokens,
logprobs, finish reasons) with chunked prefill, prefix caching, penalties, n > 1, async scheduling, stops and
preemption; sampled outputs keep their distribution; metrics; refusals."""

import re
import time

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig, EngineConfigError
from engine.sampling_params import InvalidParameterError, StructuredOutputsParams
from tests.test_spec_decode_sampling import MIN_P_VALUE, chi_square_p_value

SPEC = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}
# Copy-heavy prompts (token ids), so that the n-gram proposer finds matches; the tiny random models also fall into
# loops, where drafts are accepted.
PROMPTS = [list(range(10, 30)) * 3 + list(range(10, 15)), [100, 101, 102, 103] * 8, [7, 8, 9] * 5 + [40]]
# 24 tokens a step: the 65-token prompt is chunked, and drafts are cut to what the step's budget leaves.
OPTIONS = dict(dtype="float32", device="cpu", max_model_len=256, max_num_batched_tokens=24)
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=23, ignore_eos=True, logprobs=2),
    SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, repetition_penalty=1.2, frequency_penalty=0.3,
                   presence_penalty=0.2),
    SamplingParams(n=2, temperature=0.0, max_tokens=16, ignore_eos=True, min_tokens=5),
]


def flat(outputs):
    result = []
    for output in outputs:
        for c in output.outputs:
            result.append((c.token_ids, c.finish_reason, c.stop_reason, c.text,
                           [(e.token_ids, e.rank) for e in c.logprobs or []]))
    return result


def logprob_values(outputs):
    return torch.tensor([v for o in outputs for c in o.outputs for e in c.logprobs or [] for v in e.logprobs])


def run_both(model_dir, prompts, params, **options):
    options = {**OPTIONS, **options}
    reference = LLM(model_dir, **options).generate(prompts, params, use_tqdm=False)
    llm = LLM(model_dir, speculative_config=SPEC, **options)
    return reference, llm.generate(prompts, params, use_tqdm=False), llm


@pytest.mark.parametrize("family,async_scheduling", [("llama", True), ("qwen3", False), ("gemma2", False)])
def test_greedy_outputs_identical_with_speculation(tiny_model, family, async_scheduling):
    model_dir = tiny_model(family, max_position_embeddings=256)
    prompts = PROMPTS
    reference, spec, llm = run_both(model_dir, prompts, PARAMS, async_scheduling=async_scheduling)
    assert flat(spec) == flat(reference)
    torch.testing.assert_close(logprob_values(spec), logprob_values(reference), rtol=0, atol=1e-4)
    assert [len(c.token_ids) for c in spec[0].outputs] == [23]
    stats = llm.core.stats().spec_decoding
    assert stats.num_drafts > 0 and stats.num_accepted_tokens > 0
    assert sum(stats.num_accepted_tokens_per_pos) == stats.num_accepted_tokens
    if family == "llama":
        # The same prompts again: their blocks come from the prefix cache, and the outputs stay the same.
        again = llm.generate(prompts, PARAMS, use_tqdm=False)
        assert flat(again) == flat(reference)
        assert any(o.num_cached_tokens > 0 for o in again)


def test_stops_end_an_accepted_run_at_the_first_stop(tiny_model):
    model_dir = tiny_model("gemma2", max_position_embeddings=256)  # it loops at once: long accepted runs
    free = LLM(model_dir, **OPTIONS).generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=40,
                                                                      ignore_eos=True), use_tqdm=False)
    tokens = [o.outputs[0].token_ids for o in free]
    text = max((o.outputs[0].text for o in free), key=len)
    params = [SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[tokens[0][12]]),
              SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop=[text[len(text) // 2:][:2]]),
              SamplingParams(temperature=0.0, max_tokens=11, ignore_eos=True, logprobs=0)]
    prompts = [PROMPTS[0], free[[o.outputs[0].text for o in free].index(text)].prompt_token_ids, PROMPTS[2]]
    reference, spec, llm = run_both(model_dir, prompts, params)
    assert flat(spec) == flat(reference)
    assert [o.outputs[0].finish_reason for o in spec] == ["stop", "stop", "length"]
    assert len(spec[2].outputs[0].token_ids) == 11
    assert llm.core.stats().spec_decoding.num_accepted_tokens > 0


def test_rollback_under_preemption(tiny_model):
    """A cramped KV cache preempts requests that verified drafts; they resume, recompute, and end as without
    speculation."""
    model_dir = tiny_model("qwen3", max_position_embeddings=256)
    cramped = dict(num_kv_blocks=10, block_size=16, max_model_len=128, max_num_batched_tokens=96)
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1)
    prompts = [p + [5] * i for i, p in enumerate([*PROMPTS, PROMPTS[0]])]
    reference, spec, llm = run_both(model_dir, prompts, params, **cramped)
    assert flat(spec) == flat(reference)
    stats = llm.core.stats()
    assert stats.num_preemptions > 0 and stats.spec_decoding.num_accepted_tokens > 0
    assert stats.num_free_blocks == 10  # every block came back


def test_sampled_outputs_keep_the_target_distribution(tiny_model):
    """End to end on a 16-token vocabulary: a prompt holding every token, so that drafts are proposed at every
    step. 800 samples of 3 tokens; the second token (verified, with drafts) follows its exact marginal
    sum_t1 p(t1) p(t2 | t1), computed with transformers on the same weights (chi-square, p-value bound 1e-4)."""
    from transformers import AutoModelForCausalLM

    model_dir = tiny_model("llama", vocab_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                           max_position_embeddings=64)
    prompt = list(range(16)) * 2
    llm = LLM(model_dir, dtype="float32", device="cpu", seed=7,
              speculative_config={"num_speculative_tokens": 2, "prompt_lookup_min": 1, "prompt_lookup_max": 2})
    outputs = llm.generate([prompt] * 800, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True),
                           use_tqdm=False)
    seconds = torch.tensor([o.outputs[0].token_ids[1] for o in outputs])
    stats = llm.core.stats().spec_decoding
    assert stats.num_drafts >= 800 and stats.num_accepted_tokens > 0

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        continued = torch.tensor([prompt + [t] for t in range(16)])
        p2_given_1 = model(continued).logits[:, -1].softmax(-1)
    p2 = p1 @ p2_given_1
    assert chi_square_p_value(torch.bincount(seconds, minlength=16), p2) > MIN_P_VALUE


def test_metrics_offline(tiny_model):
    model_dir = tiny_model("gemma2", max_position_embeddings=256)
    llm = LLM(model_dir, speculative_config=SPEC, **OPTIONS)
    llm.generate(PROMPTS, SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)
    metrics = {m.name: m for m in llm.get_metrics()}
    drafts = metrics["vllm:spec_decode_num_drafts"].value
    assert drafts > 0 and metrics["vllm:spec_decode_num_draft_tokens"].value <= 3 * drafts
    accepted = metrics["vllm:spec_decode_num_accepted_tokens"].value
    per_pos = metrics["vllm:spec_decode_num_accepted_tokens_per_pos"].values
    assert accepted > 0 and len(per_pos) == 3 and sum(per_pos) == accepted
    assert per_pos == sorted(per_pos, reverse=True)  # a draft is accepted only after those before it
    assert "vllm:spec_decode_num_drafts" not in {m.name for m in LLM(model_dir, **OPTIONS).get_metrics()}


def test_structured_outputs_are_refused_at_request_time(tiny_model):
    llm = LLM(tiny_model("llama", max_position_embeddings=256), speculative_config=SPEC, **OPTIONS)
    with pytest.raises(InvalidParameterError) as e:
        llm.generate("hi", SamplingParams(structured_outputs=StructuredOutputsParams(regex="a+")), use_tqdm=False)
    assert e.value.param == "structured_outputs"
    assert not llm.core.has_unfinished_requests()


@pytest.mark.parametrize("options,field", [
    ({"num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({}, "speculative_config.num_speculative_tokens"),
    ({"num_speculative_tokens": 2, "method": "eagle"}, "speculative_config.method"),
    ({"num_speculative_tokens": 2, "prompt_lookup_min": 4, "prompt_lookup_max": 2},
     "speculative_config.prompt_lookup_min"),
    ({"num_speculative_tokens": 2, "lookahead": 3}, "speculative_config"),
])
def test_bad_speculative_config_names_the_key(options, field):
    with pytest.raises(EngineConfigError) as e:
        EngineConfig(model="m", speculative_config=options)
    assert e.value.field == field


def test_speculative_config_defaults_follow_vllm():
    config = EngineConfig(model="m", speculative_config={"num_speculative_tokens": 2, "prompt_lookup_max": 4})
    assert (config.speculative_config.prompt_lookup_min, config.speculative_config.prompt_lookup_max) == (4, 4)
    config = EngineConfig(model="m", speculative_config={"num_speculative_tokens": 2})
    assert (config.speculative_config.prompt_lookup_min, config.speculative_config.prompt_lookup_max) == (5, 5)
    with pytest.raises(EngineConfigError, match="generation only"):
        EngineConfig(model="m", task="embed", speculative_config={"num_speculative_tokens": 2})


def accepted_on(metrics_text: str) -> float:
    found = re.search(r'^vllm:spec_decode_num_accepted_tokens_total\{model_name="spec"\} (\S+)$', metrics_text, re.M)
    return float(found.group(1)) if found else 0.0


def test_served_with_speculation(tiny_model):
    """The YAML key `speculative`, the same greedy text as offline without it, vLLM's counters on /metrics, and a
    structured-output request refused with a 400 naming its parameter."""
    import openai

    from tests.helpers_server import model_config, run_inprocess, server_config

    model_dir = tiny_model("gemma2", max_position_embeddings=256)
    expected = LLM(model_dir, **OPTIONS).generate([PROMPTS[2]], SamplingParams(
        temperature=0.0, max_tokens=20, ignore_eos=True), use_tqdm=False)[0].outputs[0].text
    config = server_config([model_config("spec", model_dir, speculative=SPEC)])
    with run_inprocess(config) as server:
        client = server.client()
        completion = client.completions.create(model="spec", prompt=PROMPTS[2], max_tokens=20, temperature=0.0,
                                               extra_body={"ignore_eos": True})
        assert completion.choices[0].text == expected
        with pytest.raises(openai.BadRequestError) as e:
            client.chat.completions.create(model="spec", messages=[{"role": "user", "content": "hi"}],
                                           response_format={"type": "json_object"}, max_tokens=5)
        assert "speculative decoding" in e.value.message
        with server.http() as http:
            # The engine attaches its stats to a step's outputs a few times a second: wait for a later report.
            deadline = time.monotonic() + 10
            while accepted_on(text := http.get("/metrics").text) == 0:
                assert time.monotonic() < deadline, "no accepted drafts counted on /metrics"
                time.sleep(0.2)
    assert 'vllm:spec_decode_num_accepted_tokens_per_pos_total{model_name="spec",position="0"}' in text
    assert 'vllm:spec_decode_num_drafts_total{model_name="spec"}' in text


def test_lora_adapters_with_speculation(tiny_model, tmp_path):
    """Verification runs each request's adapter on all its positions: greedy outputs match those without
    speculation, for a batch mixing an adapter and the base model."""
    from tests.test_lora import make_adapter

    model_dir = tiny_model("gemma2", max_position_embeddings=256)
    adapter = make_adapter(model_dir, tmp_path / "a", r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"])
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
    results = []
    for speculative in (None, SPEC):
        llm = LLM(model_dir, enable_lora=True, max_lora_rank=8, speculative_config=speculative, **OPTIONS)
        llm.add_lora("a", adapter)
        results.append(flat(llm.generate(PROMPTS[1:], params, use_tqdm=False, lora_name=["a", None])))
    assert results[0] == results[1]
    assert llm.core.stats().spec_decoding.num_accepted_tokens > 0


def test_tokens_past_a_stop_string_in_one_output_are_dropped(tiny_model):
    """Verification emits several tokens at once; those after the one that completes a stop string are not part of
    the output (nor their logprobs), as if they had come one by one."""
    from engine.contract import EngineCoreOutput, TokenLogprobs
    from engine.output_processor import OutputProcessor
    from engine.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tiny_model("llama", max_position_embeddings=256))
    tokens = tokenizer.encode(" the quick brown fox jumps", add_special_tokens=False)
    texts = [tokenizer.decode(tokens[:i + 1]) for i in range(len(tokens))]
    stop_at = next(i for i, text in enumerate(texts) if "brown" in text)
    assert stop_at < len(tokens) - 1
    processor = OutputProcessor(tokenizer)
    processor.add_request("r", None, [1, 2], SamplingParams(stop=["brown"], logprobs=0))
    logprobs = [TokenLogprobs([t], [-0.5], 1) for t in tokens]
    (output,), to_stop = processor.process([EngineCoreOutput("r", "r", 0, tokens, logprobs)])
    completion = output.outputs[0]
    assert completion.token_ids == tokens[:stop_at + 1] and len(completion.logprobs) == stop_at + 1
    assert completion.finish_reason == "stop" and completion.text == texts[stop_at].split("brown")[0]
    assert to_stop == ["r"]
