"""The offline engine end to end: sampling through the engine, n > 1 sharing, stops, validation, chat, KV use."""

import random
import time

import pytest

from engine.config import EngineConfigError
from engine import LLM, InvalidParameterError, SamplingParams

PROMPTS = ["Hello there", "The quick brown fox jumps over the lazy dog", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", max_position_embeddings=256)


@pytest.fixture(scope="module")
def llm(model_dir):
    return LLM(model_dir, dtype="float32", device="cpu")


def test_seeded_sampling_ignores_batch_companions(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=1234, max_tokens=12, ignore_eos=True)
    alone = llm.generate(PROMPTS[1], params, use_tqdm=False)[0].outputs[0].token_ids
    companions = [
        SamplingParams(temperature=0.8, seed=7, max_tokens=5, ignore_eos=True),
        SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True),  # unseeded: draws from the global RNG
    ]
    batched = llm.generate([PROMPTS[0], PROMPTS[2], PROMPTS[1]], [*companions, params], use_tqdm=False)
    assert batched[2].outputs[0].token_ids == alone
    other_order = llm.generate([PROMPTS[1], PROMPTS[0]], [params, companions[1]], use_tqdm=False)
    assert other_order[0].outputs[0].token_ids == alone


def test_seeded_sampling_survives_preemption(model_dir):
    params = SamplingParams(temperature=1.0, seed=99, max_tokens=40, ignore_eos=True)
    prompts = [PROMPTS[1] * 3] * 4
    roomy = LLM(model_dir, dtype="float32", device="cpu")
    cramped = LLM(model_dir, dtype="float32", device="cpu", num_kv_blocks=16, block_size=16)
    expected = [o.outputs[0].token_ids for o in roomy.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in cramped.generate(prompts, params, use_tqdm=False)]
    assert cramped.core.stats().num_preemptions > 0
    assert got == expected


def test_n_samples_share_prompt_blocks(model_dir):
    llm = LLM(model_dir, dtype="float32", device="cpu", block_size=16, enable_prefix_caching=False)
    prompt_ids = llm.tokenizer.encode(PROMPTS[1] * 6)
    num_prompt = len(prompt_ids)
    assert num_prompt > 64
    core = llm.core
    core.add_request("r", prompt_ids, SamplingParams(n=4, temperature=1.0, seed=0, max_tokens=5, ignore_eos=True))
    core.step()  # the first sample computes the prompt; its siblings then take its full prompt blocks
    core.step()  # the siblings compute only the prompt's tail
    running = core.scheduler.running
    assert len(running) == 4
    shared = (num_prompt - 1) // 16
    blocks_each = [-(-r.num_computed_tokens // 16) for r in running]
    used = core.kv_manager.pool.num_used_blocks
    assert used == shared + sum(b - shared for b in blocks_each)
    assert used < sum(blocks_each) - 2 * shared
    while core.has_unfinished_requests():
        core.step()
    assert core.kv_manager.pool.num_used_blocks == 0


def test_n_samples_are_distinct_and_reproducible(llm):
    params = SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=8, ignore_eos=True, logprobs=1)
    first = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    second = llm.generate(PROMPTS[0], params, use_tqdm=False)[0]
    assert [o.index for o in first.outputs] == [0, 1, 2]
    assert [o.token_ids for o in first.outputs] == [o.token_ids for o in second.outputs]
    assert len({tuple(o.token_ids) for o in first.outputs}) > 1
    assert all(len(o.logprobs) == 8 and len(o.logprobs[0].token_ids) == 2 for o in first.outputs)


def test_text_matches_full_decode(llm):
    outputs = llm.generate(PROMPTS, SamplingParams(temperature=1.0, seed=3, max_tokens=16, ignore_eos=True),
                           use_tqdm=False)
    for output in outputs:
        completion = output.outputs[0]
        assert completion.text == llm.tokenizer.decode(completion.token_ids, skip_special_tokens=True)


def test_stop_string_across_tokens_is_cut(llm):
    greedy = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    full = llm.generate(PROMPTS[2], greedy, use_tqdm=False)[0].outputs[0]
    # A stop string made of the tail of one token and the head of the next.
    pieces = [llm.tokenizer.decode(full.token_ids[:i], skip_special_tokens=True) for i in range(len(full.token_ids))]
    boundary = next(i for i in range(3, len(pieces)) if len(pieces[i]) - len(pieces[i - 1]) >= 2
                    and len(pieces[i + 1]) - len(pieces[i]) >= 2)
    stop = full.text[len(pieces[boundary]) - 1:len(pieces[boundary]) + 1]
    expected = full.text[:full.text.index(stop)]
    stopped = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop]),
                           use_tqdm=False)[0].outputs[0]
    assert stopped.text == expected
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop
    kept = llm.generate(PROMPTS[2], SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True, stop=[stop],
                                                   include_stop_str_in_output=True), use_tqdm=False)[0].outputs[0]
    assert kept.text == expected + stop
    assert llm.core.kv_manager.pool.num_used_blocks == 0


def test_stop_token_ids_and_eos(llm):
    greedy = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True),
                          use_tqdm=False)[0].outputs[0]
    stop_id = greedy.token_ids[3]
    stopped = llm.generate(PROMPTS[0], SamplingParams(temperature=0.0, max_tokens=10, stop_token_ids=[stop_id]),
                           use_tqdm=False)[0].outputs[0]
    first = greedy.token_ids.index(stop_id)
    assert stopped.token_ids == greedy.token_ids[:first + 1]
    assert stopped.finish_reason == "stop" and stopped.stop_reason == stop_id
    # Forcing EOS through logit bias ends the request unless ignore_eos.
    eos = sorted(llm.core.eos_token_ids)[0]
    biased = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={eos: 100.0})
    out = llm.generate(PROMPTS[0], biased, use_tqdm=False)[0].outputs[0]
    assert out.token_ids == [eos] and out.finish_reason == "stop"
    with_min = SamplingParams(temperature=0.0, max_tokens=10, logit_bias={eos: 100.0}, min_tokens=4)
    out = llm.generate(PROMPTS[0], with_min, use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 5 and out.token_ids[-1] == eos and eos not in out.token_ids[:4]


def test_context_length_ends_generation(model_dir):
    llm = LLM(model_dir, dtype="float32", device="cpu", max_model_len=32)
    prompt_ids = list(range(10, 40))
    out = llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=100, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0]
    assert len(out.token_ids) == 2 and out.finish_reason == "length"


@pytest.mark.parametrize(("kwargs", "param"), [
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"top_p": 0.0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"temperature": -0.1}, "temperature"),
    ({"top_k": -5}, "top_k"),
    ({"min_p": 2.0}, "min_p"),
    ({"n": 0}, "n"),
    ({"logprobs": 50}, "logprobs"),
    ({"presence_penalty": 3.0}, "presence_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"),
    ({"stop": [""]}, "stop[0]"),
    ({"min_tokens": 20, "max_tokens": 10}, "min_tokens"),
])
def test_bad_parameters_name_the_parameter(kwargs, param):
    with pytest.raises(InvalidParameterError) as excinfo:
        SamplingParams(**kwargs)
    assert excinfo.value.param == param
    assert param in str(excinfo.value)


def test_model_dependent_validation(llm):
    vocab = llm.core.vocab_size
    cases = [
        ([1, 2, 3], SamplingParams(stop_token_ids=[vocab + 5]), "stop_token_ids[0]"),
        ([1, 2, 3], SamplingParams(logit_bias={vocab: 1.0}), "logit_bias"),
        ([1, vocab], SamplingParams(), "prompt"),
        (list(range(256)), SamplingParams(), "prompt"),  # no room left in the 256-token context
        ([], SamplingParams(), "prompt"),
    ]
    for prompt_ids, params, param in cases:
        with pytest.raises(InvalidParameterError) as excinfo:
            llm.generate([prompt_ids], params, use_tqdm=False)
        assert excinfo.value.param == param
    assert not llm.core.has_unfinished_requests()
    # A bad prompt after good ones: nothing is queued.
    with pytest.raises(InvalidParameterError):
        llm.generate([[1, 2], [3, 4], [1, vocab]], SamplingParams(), use_tqdm=False)
    assert not llm.core.has_unfinished_requests()


def test_chat_uses_the_template(llm):
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    out = llm.chat(messages, SamplingParams(temperature=0.0, max_tokens=5, ignore_eos=True), use_tqdm=False)[0]
    assert out.prompt == "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    assert out.prompt_token_ids == llm.tokenizer.encode(out.prompt, add_special_tokens=False)
    assert len(out.outputs[0].token_ids) == 5


def test_abort_frees_everything(llm):
    core = llm.core
    core.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=50, ignore_eos=True))
    core.add_request("b", [5, 6, 7, 8], SamplingParams(n=2, max_tokens=50, ignore_eos=True))
    core.step()
    outputs = core.abort_requests(["a", "b"])
    assert sorted(o.request_id for o in outputs) == ["a", "b/0", "b/1"]
    assert all(o.finish_reason == "abort" for o in outputs)
    assert not core.has_unfinished_requests()
    assert core.kv_manager.pool.num_used_blocks == 0
    core.kv_manager.pool.check_integrity()


def test_failed_step_finishes_its_requests_with_error(model_dir, monkeypatch):
    llm = LLM(model_dir, dtype="float32", device="cpu")

    def broken(_):
        raise RuntimeError("simulated kernel failure")

    monkeypatch.setattr(llm.core.runner, "execute", broken)
    llm.core.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4))
    outputs = llm.core.step()
    assert [o.finish_reason for o in outputs] == ["error"]
    assert not llm.core.has_unfinished_requests() and llm.core.kv_manager.pool.num_used_blocks == 0


def test_device_fault_ends_the_engine(model_dir, monkeypatch):
    """A CUDA fault poisons the context, so it propagates (the engine process dies and is restarted) instead of
    failing one batch after another."""
    import torch

    llm = LLM(model_dir, dtype="float32", device="cpu")

    def faulting(_):
        raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")

    monkeypatch.setattr(llm.core.runner, "execute", faulting)
    llm.core.add_request("a", [1, 2, 3], SamplingParams(max_tokens=4))
    with pytest.raises(torch.AcceleratorError):
        llm.core.step()


def test_kv_slots_hold_real_tokens_under_load(tiny_model):
    """64 concurrent requests of random lengths: the share of allocated KV slots that hold real tokens."""
    # Prompts fill whole steps beside decodes, so that all 64 run at once before the first ones finish.
    llm = LLM(tiny_model("llama", max_position_embeddings=2048), dtype="float32", device="cpu", block_size=16,
              max_num_seqs=64, enable_prefix_caching=False, max_prefill_tokens_while_decoding=None)
    rng = random.Random(0)
    core = llm.core
    for i in range(64):
        prompt = [rng.randrange(1, 400) for _ in range(rng.randint(64, 640))]
        core.add_request(str(i), prompt, SamplingParams(max_tokens=rng.randint(4, 12), ignore_eos=True))
    ratios = []
    while core.has_unfinished_requests():
        core.step()
        running = core.scheduler.running
        if len(running) == 64:
            slots = core.kv_manager.pool.num_used_blocks * 16
            ratios.append(sum(r.num_computed_tokens for r in running) / slots)
    utilization = min(ratios)
    print(f"\nKV slots holding real tokens, 64 concurrent requests: min {utilization:.1%} over {len(ratios)} steps")
    assert ratios and utilization >= 0.96


def test_step_outputs_mark_statuses(llm):
    core = llm.core
    core.add_request("s", [9, 8, 7], SamplingParams(max_tokens=2, ignore_eos=True))
    first = core.step()
    assert first[0].finish_reason is None and len(first[0].new_token_ids) == 1
    second = core.step()
    assert second[0].finish_reason == "length" and second[0].new_token_ids


@pytest.mark.parametrize(("max_num_seqs", "expected"), [
    (1, [1]),
    (100, [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64, 80, 96, 100]),
    (256, [1, 2, 4, *range(8, 64, 8), *range(64, 257, 16)]),
    (1024, [1, 2, 4, *range(8, 64, 8), *range(64, 256, 16), *range(256, 513, 32)]),
])
def test_cuda_graph_buckets_cover_every_decode_batch(model_dir, max_num_seqs, expected):
    """Ascending, from 1 to the largest decode batch (at most 512; larger ones run eagerly), so that every batch
    size up to it pads to a captured bucket."""
    llm = LLM(model_dir, dtype="float32", device="cpu", max_num_seqs=max_num_seqs, num_kv_blocks=64)
    assert llm.core.runner.graph_batch_sizes() == expected


def test_stats_count_step_time_and_the_wait_for_the_device(model_dir, monkeypatch):
    """The engine's step seconds and, within them, the seconds spent waiting for the device's results (here a device
    that takes 20 ms to deliver each step)."""
    llm = LLM(model_dir, dtype="float32", device="cpu")
    execute = llm.core.runner.execute

    def slow_execute(scheduler_output):
        pending = execute(scheduler_output)
        get = pending.get

        def slow_get():
            time.sleep(0.02)
            return get()
        pending.get = slow_get
        return pending

    monkeypatch.setattr(llm.core.runner, "execute", slow_execute)
    llm.generate(PROMPTS[0], SamplingParams(max_tokens=5, ignore_eos=True), use_tqdm=False)
    stats = llm.core.stats()
    assert llm.core.num_steps >= 5
    assert 0.02 * llm.core.num_steps <= stats.device_wait_seconds < stats.step_seconds


def test_a_budget_below_the_models_own_context_is_refused_without_chunked_prefill(model_dir):
    """max_model_len left unset: the check runs again once the engine knows the model's context length."""
    with pytest.raises(EngineConfigError, match="max_num_batched_tokens: must be >= max_model_len"):
        LLM(model_dir, dtype="float32", device="cpu", enable_chunked_prefill=False, max_num_batched_tokens=16)
