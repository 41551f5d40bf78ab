"""Async scheduling (step N+1 scheduled while step N runs) gives exactly what the synchronous loop gives.

On the CPU the device work is not actually overlapped, but every mechanism is the same as on the GPU: pending
tokens, their ids fed to the next step from the device tensor, requests preempted or finished while a step is in
flight, and the synchronous fallback for penalties.
"""

import pytest

from engine import LLM, SamplingParams
from engine.scheduler import Scheduler

PROMPT = "The quick brown fox jumps over the lazy dog"
# Cramped on purpose: four ~75-token prompts decoding 40 tokens each need more than 16 blocks of 16, so running
# decodes are preempted, including ones whose last token is still pending.
CRAMPED = {"num_kv_blocks": 16, "block_size": 16, "max_model_len": 128}

PARAMS = {
    "greedy_logprobs": SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=3, prompt_logprobs=2),
    "seeded_top_p": SamplingParams(temperature=1.0, top_p=0.8, top_k=40, seed=11, max_tokens=40, ignore_eos=True),
    "penalties": SamplingParams(temperature=0.0, frequency_penalty=1.5, presence_penalty=0.5,
                                repetition_penalty=1.3, max_tokens=40, ignore_eos=True),
    # Token 7 wins whenever it is allowed, so the output is exactly min_tokens tokens and then the stop.
    "min_tokens_stop": SamplingParams(temperature=1.0, seed=3, min_tokens=6, max_tokens=40, stop_token_ids=[7],
                                      logit_bias={7: 100.0}),
    "n3_seeded": SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=30, ignore_eos=True),
}


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", max_position_embeddings=256)


def generate(model_dir, async_scheduling: bool, params: SamplingParams, **options):
    llm = LLM(model_dir, dtype="float32", device="cpu", async_scheduling=async_scheduling, **options)
    prompts = [PROMPT * 3, PROMPT * 3 + " and", PROMPT * 2 + " again, then", PROMPT * 3 + " once more"]
    outputs = llm.generate(prompts, params, use_tqdm=False)
    stats = llm.core.stats()
    assert stats.num_free_blocks == stats.num_kv_blocks and not llm.core.has_unfinished_requests()
    return llm, outputs


def flat(outputs):
    """Everything exact (tokens, text, finish reasons, logprob ranks and ids) and the logprob values apart."""
    exact, values = [], []
    for output in outputs:
        entries = [e for e in output.prompt_logprobs or [] if e is not None]
        for completion in output.outputs:
            exact.append((completion.token_ids, completion.text, completion.finish_reason))
            entries += completion.logprobs or []
        exact.append([(e.token_ids, e.rank) for e in entries])
        values += [v for e in entries for v in e.logprobs]
    return exact, values


@pytest.mark.parametrize("name", PARAMS)
def test_same_outputs_as_synchronous_with_preemption(model_dir, name, monkeypatch):
    pending_at_preemption = []
    preempt = Scheduler._preempt

    def recording_preempt(self, request):
        pending_at_preemption.append(request.num_pending_outputs)
        preempt(self, request)

    monkeypatch.setattr(Scheduler, "_preempt", recording_preempt)
    _, expected = generate(model_dir, False, PARAMS[name], **CRAMPED)
    assert not any(pending_at_preemption)  # the synchronous loop never has tokens in flight
    llm, got = generate(model_dir, True, PARAMS[name], **CRAMPED)
    (got_exact, got_values), (expected_exact, expected_values) = flat(got), flat(expected)
    assert got_exact == expected_exact
    # Batches are composed differently, so float sums come in another order.
    assert got_values == pytest.approx(expected_values, abs=1e-4)
    if name == "min_tokens_stop":  # short outputs: no preemption here
        assert all(len(o.outputs[0].token_ids) == 7 and o.outputs[0].finish_reason == "stop" for o in got)
    else:
        assert llm.core.stats().num_preemptions > 0
    if name == "greedy_logprobs":
        assert any(pending_at_preemption)  # a decode lost its blocks while its next token was on the device


def test_stops_by_length_compute_no_extra_token(model_dir):
    """max_tokens is known ahead, so a request never computes a token after its last one; an EOS-like stop costs
    one dropped token at most."""
    params = SamplingParams(temperature=0.0, max_tokens=7, ignore_eos=True)
    llm = LLM(model_dir, dtype="float32", device="cpu", async_scheduling=True, enable_prefix_caching=False)
    prompt_ids = llm.tokenizer.encode(PROMPT)
    core = llm.core
    core.add_request("a", prompt_ids, params)
    computed = []
    while core.has_unfinished_requests():
        outputs = core.step()
        computed.append(core.scheduler.last_step_num_tokens)
        assert all(len(o.new_token_ids) <= 1 for o in outputs)
    # The prompt, then one token per output except the last, which is sampled but never fed back.
    assert sum(computed) == len(prompt_ids) + params.max_tokens - 1


def test_outputs_arrive_one_step_later(model_dir):
    llm = LLM(model_dir, dtype="float32", device="cpu", async_scheduling=True)
    core = llm.core
    core.add_request("a", [5, 6, 7], SamplingParams(max_tokens=3, ignore_eos=True))
    assert core.step() == []  # the prompt's step was launched; its token comes with the next call
    tokens = []
    while core.has_unfinished_requests():
        for output in core.step():
            tokens += output.new_token_ids
            finish_reason = output.finish_reason
    assert len(tokens) == 3 and finish_reason == "length"


def test_abort_while_a_step_is_in_flight(model_dir):
    llm = LLM(model_dir, dtype="float32", device="cpu", async_scheduling=True)
    core = llm.core
    core.add_request("a", [5, 6, 7, 8], SamplingParams(max_tokens=50, ignore_eos=True))
    core.add_request("b", [5, 6, 7, 8], SamplingParams(max_tokens=4, ignore_eos=True))
    core.step()
    core.step()
    aborted = core.abort_requests(["a"])
    assert [o.finish_reason for o in aborted] == ["abort"]
    later = []
    while core.has_unfinished_requests():
        later += core.step()
    assert {o.request_id for o in later} == {"b"}  # nothing more for the aborted request
    assert sum(len(o.new_token_ids) for o in later) + 1 == 4  # b's first token came with the second step
    assert core.kv_manager.pool.num_used_blocks == 0
    core.kv_manager.pool.check_integrity()
