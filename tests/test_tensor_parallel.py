"""Tensor parallelism on the CPU (gloo): worker processes hold their shards, the engine process drives them with the
contract's commands, and the answers are the single-rank engine's (which the equivalence tests hold to
transformers): greedy tokens identical, logprobs within float32 rounding."""

import os
import signal

import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import model_config, run_server, server_config  # noqa: E402

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


def test_a_dead_worker_fails_the_engine_instead_of_hanging(tiny_model):
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", tensor_parallel_size=2)
    try:
        llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
        worker = llm.core.runner._workers[0]
        os.kill(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(code -9\)"):
            llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()


def test_served_with_tensor_parallelism_through_the_api(tiny_model, tmp_path):
    model_dir = tiny_model("llama")
    expected = run(model_dir, 1)[0]
    config = server_config([model_config("llama", model_dir, parallelism={"tensor": 2})])
    with run_server(config, tmp_path) as server:
        completion = server.client().completions.create(model="llama", prompt=PROMPTS, max_tokens=10, temperature=0,
                                                        extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(completion.choices, key=lambda c: c.index)] == [
        o.outputs[0].text for o in expected]
