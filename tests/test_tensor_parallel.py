"""Tensor parallelism on the CPU (gloo): worker processes hold their shards, the engine process drives them with the
contract's commands, and the answers are the single-rank engine's (which the equivalence tests hold to
transformers): greedy tokens identical, logprobs within float32 rounding."""

import gc
import json
import os
import signal
import sys
import time

import psutil
import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import model_config, run_server, server_config, wait_for_model_error  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.config import EngineConfigError  # noqa: E402
from engine.distributed.tp_runner import WorkerDiedError  # noqa: E402

pytest_plugins = ["helpers_server"]

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Once upon a time", "1 2 3 4 5 6 7 8 9 10 11 12 13"]
GREEDY = SamplingParams(temperature=0.0, max_tokens=10, ignore_eos=True, logprobs=2, prompt_logprobs=1)
SEEDED = SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=7, max_tokens=8, ignore_eos=True)
# qwen2 with one KV head (MQA): each rank keeps a replica of it.
FAMILIES = {"llama": {}, "qwen2": {"num_key_value_heads": 1}, "gemma2": {}}


def run(model_dir: str, tensor_parallel_size: int, **options) -> list:
    llm = LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=tensor_parallel_size, **options)
    try:
        return [llm.generate(PROMPTS, params, use_tqdm=False) for params in (GREEDY, SEEDED)]
    finally:
        llm.shutdown()


def assert_same(expected: list, actual: list) -> None:
    for outputs_a, outputs_b in zip(expected, actual):
        for a, b in zip(outputs_a, outputs_b):
            assert [c.token_ids for c in a.outputs] == [c.token_ids for c in b.outputs]
            for ca, cb in zip(a.outputs, b.outputs):
                for ea, eb in zip(ca.logprobs or [], cb.logprobs or []):
                    assert ea.token_ids == eb.token_ids
                    assert max(abs(x - y) for x, y in zip(ea.logprobs, eb.logprobs)) < 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_two_ranks_answer_as_one(tiny_model, family):
    model_dir = tiny_model(family, **FAMILIES[family])
    assert_same(run(model_dir, 1), run(model_dir, 2))


def test_a_vocabulary_two_ranks_do_not_divide_is_served_not_refused(tiny_model):
    """515 rows (GPT-2's 50257 is odd too): the last rank's shard of the embedding and the tied head is padded with
    zero rows, as vLLM pads it, and the padded logits never reach the sampler."""
    model_dir = tiny_model("llama", vocab_size=515, tie_word_embeddings=True)
    assert_same(run(model_dir, 1), run(model_dir, 2))


def test_two_ranks_with_async_scheduling_prefix_caching_and_preemption(tiny_model):
    model_dir = tiny_model("llama")
    options = {"async_scheduling": True, "num_kv_blocks": 10, "block_size": 8, "max_model_len": 48}
    single = LLM(model_dir, dtype="float32", device="cpu", **options)
    expected = [single.generate(PROMPTS, params, use_tqdm=False) for params in (GREEDY, SEEDED)]
    assert single.core.stats().num_preemptions > 0  # six seeded samples do not fit in 10 blocks at once
    assert_same(expected, run(model_dir, 2, **options))


def test_a_split_the_model_cannot_take_is_refused(tiny_model):
    with pytest.raises(EngineConfigError, match="tensor_parallel_size: 3 does not divide the model's 4 attention"):
        LLM(tiny_model("llama"), dtype="float32", device="cpu", tensor_parallel_size=3)


def test_a_second_parallel_engine_in_the_process_is_refused_and_the_first_goes_on(tiny_model):
    """Its failed start had destroyed the running engine's process group (the process's default one)."""
    model_dir = tiny_model("llama")
    first = LLM(model_dir, dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        expected = first.generate(PROMPTS, GREEDY, use_tqdm=False)
        with pytest.raises(RuntimeError, match="one tensor- or pipeline-parallel engine at a time"):
            LLM(model_dir, dtype="float32", device="cpu", pipeline_parallel_size=2)
        gc.collect()  # the refused engine's clean-up runs
        assert_same([expected], [first.generate(PROMPTS, GREEDY, use_tqdm=False)])
    finally:
        first.shutdown()


@pytest.mark.parametrize(("fault", "named"), [(signal.SIGKILL, r"rank 1 \(code -9\)"),
                                               (signal.SIGSTOP, r"rank 1 \(code -9, stopped: killed as hung\)")])
def test_a_dead_or_hung_worker_fails_the_engine_within_seconds(tiny_model, fault, named):
    """A frozen worker holds its connections open: without the watchdog rank 0 waited a minute (the collective
    timeout), then failed only the step's requests and went on with a process group out of step."""
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
        worker = llm.core.runner._workers[0]
        os.kill(worker.pid, fault)
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match=named):
            llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
        assert time.monotonic() - started < 10
    finally:
        llm.shutdown()


@pytest.mark.parametrize("options", [{"tensor_parallel_size": 2}, {"pipeline_parallel_size": 2}])
def test_a_worker_that_dies_before_the_rendezvous_fails_the_start_within_seconds(tiny_model, tmp_path, monkeypatch,
                                                                                 options):
    """Rank 0 waited at the rendezvous for the whole collective timeout (a minute)."""
    model_dir = tiny_model("llama")
    crashing = tmp_path / "crashing-python"
    crashing.write_text("#!/bin/sh\necho 'worker: cannot start' >&2\nexit 7\n")
    crashing.chmod(0o755)
    monkeypatch.setattr(sys, "executable", str(crashing))  # what the engine starts its workers with
    started = time.monotonic()
    with pytest.raises(WorkerDiedError, match=r"rank 1 \(code 7\)"):
        LLM(model_dir, dtype="float32", device="cpu", **options)
    assert time.monotonic() - started < 10


def test_a_step_that_fails_on_rank_0_ends_the_engine(tiny_model, monkeypatch):
    """The worker went on with the step's collectives: rank 0 cannot fail only the batch and go on out of step."""
    def fail(scheduler_output):
        raise RuntimeError("boom")

    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        monkeypatch.setattr(llm.core.runner.local, "execute", fail)
        with pytest.raises(WorkerDiedError, match="out of step: RuntimeError: boom"):
            llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def test_served_with_tensor_parallelism_through_the_api(tiny_model, tmp_path):
    """Served, and a worker frozen mid-stream: the stream ends with an error within seconds, both ranks restart and
    answer as before; another model serves throughout."""
    model_dir = tiny_model("llama")
    expected = [o.outputs[0].text for o in run(model_dir, 1)[0]]
    config = server_config([model_config("llama", model_dir, parallelism={"tensor": 2}),
                            model_config("bystander", tiny_model("qwen3"))])

    def complete() -> list[str]:
        completion = server.client().completions.create(model="llama", prompt=PROMPTS, max_tokens=10, temperature=0,
                                                        extra_body={"ignore_eos": True})
        return [c.text for c in sorted(completion.choices, key=lambda c: c.index)]

    with run_server(config, tmp_path) as server, server.http() as http:
        assert complete() == expected
        engine = server.admin_models()["llama"]["replicas"][0]["pid"]
        body = {"model": "llama", "prompt": PROMPTS[1], "max_tokens": 400, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            lines = response.iter_lines()
            next(lines)
            os.kill(psutil.Process(engine).children()[0].pid, signal.SIGSTOP)
            frozen_at = time.monotonic()
            events = [line.removeprefix("data: ") for line in lines if line]
        assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), events[-3:]
        assert time.monotonic() - frozen_at < 10
        wait_for_model_error(server, "llama", "rank 1 (code -9, stopped: killed as hung)")  # why, for the operator
        assert server.admin_models()["llama"]["status"] != "ready"  # restarting its ranks, and meanwhile:
        other = server.client().completions.create(model="bystander", prompt="Hi", max_tokens=4,
                                                   extra_body={"ignore_eos": True})
        assert other.usage.completion_tokens == 4
        deadline = time.monotonic() + 60
        while (model := server.admin_models()["llama"])["status"] != "ready" or model["replicas"][0]["pid"] == engine:
            assert time.monotonic() < deadline, "the model did not come back"
            time.sleep(0.2)
        assert complete() == expected
