"""Speculative decoding with a draft model: greedy outputs identical to decoding without it (tokens, logprobs,
finish reasons) with chunked prefill, prefix caching, penalties, n > 1, stops and preemption; the target as its own
draft accepts every greedy draft; rejection sampling with the draft's q keeps the target distribution (on the
sampler, then end to end); refusals of a bad draft naming the key."""

import json
import shutil

import pytest
import torch

from engine import LLM, SamplingParams
from engine.config import EngineConfig, EngineConfigError
from engine.contract import ModelRunnerOutput
from engine.input_batch import CachedRequestState, ScheduledRow
from engine.sampler import Sampler, SamplingMetadata
from engine.spec_decode.verify import split_verified
from tests.test_spec_decode import OPTIONS, PARAMS, PROMPTS, flat, logprob_values
from tests.test_spec_decode_sampling import (MIN_P_VALUE, VOCAB, chi_square_p_value, first_and_second_tokens,
                                             target)


def draft_of(tiny_model, family: str, **overrides) -> str:
    """A smaller model of the family on the same tokenizer: fewer layers (the fixture builds every model from one
    seed, so the missing layers are what makes its drafts differ from the target's)."""
    layers = 2 if family == "gemma2" else 1
    return tiny_model(family, num_hidden_layers=layers, max_position_embeddings=256, **overrides)


def spec(draft: str, k: int = 3) -> dict:
    return {"model": draft, "num_speculative_tokens": k}


@pytest.mark.parametrize("family", ["llama", "qwen3", "gemma2"])
def test_greedy_outputs_identical_with_a_draft_model(tiny_model, family):
    model_dir = tiny_model(family, max_position_embeddings=256)
    reference = LLM(model_dir, **OPTIONS).generate(PROMPTS, PARAMS, use_tqdm=False)
    llm = LLM(model_dir, speculative_config=spec(draft_of(tiny_model, family)), **OPTIONS)
    outputs = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
    assert flat(outputs) == flat(reference)
    torch.testing.assert_close(logprob_values(outputs), logprob_values(reference), rtol=0, atol=1e-4)
    stats = llm.core.stats().spec_decoding
    assert stats.num_drafts > 0 and stats.num_draft_tokens <= 3 * stats.num_drafts
    assert sum(stats.num_accepted_tokens_per_pos) == stats.num_accepted_tokens
    if family == "llama":
        # Again: the prompts' blocks (the draft's K/V in them too) come from the prefix cache.
        again = llm.generate(PROMPTS, PARAMS, use_tqdm=False)
        assert flat(again) == flat(reference)
        assert any(o.num_cached_tokens > 0 for o in again)


def test_the_target_as_its_own_draft_accepts_every_greedy_draft(tiny_model):
    model_dir = tiny_model("llama", max_position_embeddings=256)
    # No penalties or min_tokens: they apply to the target alone.
    params = [PARAMS[0], SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True),
              SamplingParams(n=2, temperature=0.0, max_tokens=16, ignore_eos=True)]
    reference = LLM(model_dir, **OPTIONS).generate(PROMPTS, params, use_tqdm=False)
    llm = LLM(model_dir, speculative_config=spec(model_dir), **OPTIONS)
    assert flat(llm.generate(PROMPTS, params, use_tqdm=False)) == flat(reference)
    stats = llm.core.stats().spec_decoding
    assert stats.num_draft_tokens > 20 and stats.num_accepted_tokens == stats.num_draft_tokens


def test_stops_and_preemption_with_a_draft_model(tiny_model):
    """A cramped KV cache preempts requests that verified drafts (both caches' blocks are freed and recomputed),
    and stop ids end an accepted run where they occur: the same outputs as without speculation."""
    model_dir = tiny_model("qwen3", max_position_embeddings=256)
    cramped = {**OPTIONS, "num_kv_blocks": 10, "block_size": 16, "max_model_len": 128, "max_num_batched_tokens": 96}
    prompts = [p + [5] * i for i, p in enumerate([*PROMPTS, PROMPTS[0]])]
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1)
    reference = LLM(model_dir, **cramped).generate(prompts, params, use_tqdm=False)
    stop_id = reference[1].outputs[0].token_ids[20]
    stopping = [params, SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, stop_token_ids=[stop_id]),
                params, params]
    reference = LLM(model_dir, **cramped).generate(prompts, stopping, use_tqdm=False)
    llm = LLM(model_dir, speculative_config=spec(model_dir), **cramped)
    assert flat(llm.generate(prompts, stopping, use_tqdm=False)) == flat(reference)
    assert reference[1].outputs[0].finish_reason == "stop"
    stats = llm.core.stats()
    assert stats.num_preemptions > 0 and stats.spec_decoding.num_accepted_tokens > 0
    assert stats.num_free_blocks == 10  # every block came back


# Sampler level, as tests/test_spec_decode_sampling.py but with a draft distribution q that is not one-hot.
N = 200_000


def test_rejection_sampling_with_draft_probs_keeps_the_target_distribution():
    """200,000 requests each draw a draft from q (temperature 1.3 on noisy logits), then verify it and a bonus
    position against p (temperature 0.8, top-k 6, 8 tokens). The first emitted token must follow p1, the second
    (emitted only when the draft was accepted) p2: chi-square, p-value bound 1e-4 (fixed seed). The acceptance
    rate must be sum_t min(p1, q)(t), within 5 standard deviations. Wrong rules fail by far: accepting with
    p(d) alone or resampling from p moves the frequencies by percents (about 0.1 % is one deviation here)."""
    torch.manual_seed(4321)
    params = SamplingParams(temperature=0.8, top_k=6, max_tokens=10)
    state = CachedRequestState("r", [1, 2, 3], 3, params, frozenset(), [0], None, None)
    rows = [ScheduledRow(state, 2, 1)] * (2 * N)
    logits1, logits2 = torch.randn(VOCAB) * 2, torch.randn(VOCAB) * 2
    p1, p2 = target(logits1, 0.8, 6), target(logits2, 0.8, 6)
    q = (logits1 / 1.3 + torch.randn(VOCAB)).softmax(-1)  # near p, with mass where top-k leaves p none
    drafts = torch.multinomial(q, N, replacement=True)
    logits = torch.stack([logits1, logits2]).repeat(N, 1)
    draft_ids = torch.stack([drafts, torch.full((N,), -1)], dim=1).flatten()
    draft_probs = torch.stack([q, torch.zeros(VOCAB)]).repeat(N, 1)
    sampled = Sampler()(logits, SamplingMetadata.from_rows(rows, torch.device("cpu")), draft_ids, draft_probs)
    output = ModelRunnerOutput([str(i // 2) for i in range(2 * N)], sampled.sampled_token_ids.tolist())
    split_verified(output, sampled.accepted.tolist())

    firsts, seconds = first_and_second_tokens(output)
    acceptance = torch.minimum(p1, q).sum().item()
    assert 0.1 < acceptance < 0.9  # both paths are taken often
    assert abs(len(seconds) / N - acceptance) < 5 * (0.25 / N) ** 0.5
    assert chi_square_p_value(torch.bincount(torch.tensor(firsts), minlength=VOCAB), p1) > MIN_P_VALUE
    assert chi_square_p_value(torch.bincount(torch.tensor(seconds), minlength=VOCAB), p2) > MIN_P_VALUE


def test_sampled_outputs_keep_the_target_distribution_with_a_draft_model(tiny_model):
    """End to end on a 16-token vocabulary with a one-layer draft: 800 samples of 3 tokens at temperature 1; the
    second token (drafted and verified) follows its exact marginal sum_t1 p(t1) p(t2 | t1), computed with
    transformers on the target's weights (chi-square, p-value bound 1e-4, fixed engine seed)."""
    from transformers import AutoModelForCausalLM

    vocab = dict(vocab_size=16, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64)
    model_dir, draft = tiny_model("llama", **vocab), tiny_model("llama", num_hidden_layers=1, **vocab)
    prompt = list(range(16)) * 2
    llm = LLM(model_dir, dtype="float32", device="cpu", seed=7, speculative_config=spec(draft, k=2))
    outputs = llm.generate([prompt] * 800, SamplingParams(temperature=1.0, max_tokens=3, ignore_eos=True),
                           use_tqdm=False)
    seconds = torch.tensor([o.outputs[0].token_ids[1] for o in outputs])
    stats = llm.core.stats().spec_decoding
    assert stats.num_drafts >= 800 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        p1 = model(torch.tensor([prompt])).logits[0, -1].softmax(-1)
        p2_given_1 = model(torch.tensor([prompt + [t] for t in range(16)])).logits[:, -1].softmax(-1)
    assert chi_square_p_value(torch.bincount(seconds, minlength=16), p1 @ p2_given_1) > MIN_P_VALUE


def test_bad_draft_configs_name_the_key(tiny_model, tmp_path):
    model_dir = tiny_model("llama", max_position_embeddings=256)
    other_tokenizer = tmp_path / "other"
    shutil.copytree(draft_of(tiny_model, "llama"), other_tokenizer)
    tokenizer = json.loads((other_tokenizer / "tokenizer.json").read_text())
    vocab = tokenizer["model"]["vocab"]
    first, second = list(vocab)[10:12]
    vocab[first], vocab[second] = vocab[second], vocab[first]  # two ids swapped: the same size, other text
    (other_tokenizer / "tokenizer.json").write_text(json.dumps(tokenizer))
    cases = [
        ({"model": tiny_model("llama", vocab_size=700, max_position_embeddings=256), "num_speculative_tokens": 2},
         "speculative_config.model", "vocab_size"),
        ({"model": str(other_tokenizer), "num_speculative_tokens": 2}, "speculative_config.model", "tokenizer"),
        ({"model": str(tmp_path / "missing"), "num_speculative_tokens": 2}, "speculative_config.model", "no model"),
        ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model", "required"),
        ({"model": model_dir, "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens", ">= 1"),
        ({"model": model_dir, "num_speculative_tokens": 2, "draft_tensor_parallel_size": 2},
         "speculative_config.draft_tensor_parallel_size", "only 1"),
    ]
    for options, field, words in cases:
        with pytest.raises(EngineConfigError, match=words) as e:
            EngineConfig(model=model_dir, speculative_config=options)
        assert e.value.field == field, options
    config = EngineConfig(model=model_dir, speculative_config={"model": model_dir, "num_speculative_tokens": 2,
                                                               "draft_tensor_parallel_size": 1})
    assert config.speculative_config.method == "draft_model"  # vLLM's inference from `model`
    # Stages take a draft model too (tests/test_spec_decode_pipeline.py).
    assert EngineConfig(model=model_dir, pipeline_parallel_size=2, speculative_config=spec(model_dir))


def test_break_even_acceptance():
    from bench.latency import break_even_acceptance

    golden = (5 ** 0.5 - 1) / 2  # 1 + a + a^2 = 2
    assert abs(break_even_acceptance(2.0, 2) - golden) < 1e-9
    assert break_even_acceptance(1.0, 4) == 0.0 and break_even_acceptance(3.0, 2) is None


def test_bench_draft_model_smoke(tmp_path):
    from tests.test_bench_smoke import run_bench

    result = run_bench("latency.py", tmp_path, "--iters", "1", "--input-len", "16", "--output-len", "6",
                       "--speculative", "draft:tiny-llama:2")
    spec = result["speculative"]
    assert spec["verified_step_ms"] > 0 and spec["decode_step_ms"] > 0
    assert abs(spec["cost_ratio"] - spec["verified_step_ms"] / spec["decode_step_ms"]) < 1e-9
    even = spec["break_even_acceptance"]
    assert (even is None) == (spec["cost_ratio"] >= 3) and (even is None or 0 <= even < 1)


def test_yaml_speculative_draft_model(tiny_model, tmp_path):
    """The YAML key `speculative` takes the draft keys; a bad draft is refused naming its key under the model."""
    from tests.test_config import error, model, parse

    draft = draft_of(tiny_model, "llama")
    spec_yaml = parse(model(f"speculative: {{model: {draft}, num_speculative_tokens: 2}}")).models[0]
    speculative = spec_yaml.to_engine_config("/m").speculative_config
    assert (speculative.method, speculative.model, speculative.num_speculative_tokens) == ("draft_model", draft, 2)
    missing = tmp_path / "missing"
    assert "models[0].speculative.model: no model folder" in error(
        model(f"speculative: {{model: {missing}, num_speculative_tokens: 2}}"))
    assert "models[0].speculative.draft_tensor_parallel_size" in error(
        model(f"speculative: {{model: {draft}, num_speculative_tokens: 2, draft_tensor_parallel_size: 2}}"))
