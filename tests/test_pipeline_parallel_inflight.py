"""Pipeline stages with several batches in flight (vLLM's virtual engines): rank 0 launches step N+1 into the first
stage while the later stages still run step N. The answers are the single-rank engine's (greedy tokens identical,
logprobs within float32 rounding) through chunked prefill, preemption, n > 1 and aborts in flight, and the stages'
timelines show them running different steps at the same time."""

import subprocess
import sys
import time

import pytest
import torch

from test_tensor_parallel import assert_same

from engine import LLM, SamplingParams
from engine.distributed import stage_trace

# Prompts of 3 to 48 tokens; a budget of 32 tokens a step chunks the longer ones.
PROMPTS = [[(7 * i + j) % 200 + 10 for j in range(3 + 5 * i)] for i in range(10)]
GREEDY = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True, logprobs=2)
SEEDED = SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True)
OPTIONS = {"dtype": "float32", "device": "cpu", "block_size": 8, "max_model_len": 64, "max_num_batched_tokens": 32}


def generate(model_dir: str, prompts: list, **options) -> tuple[list, LLM]:
    llm = LLM(model_dir, **{**OPTIONS, **options})
    try:
        return [llm.generate(prompts, params, use_tqdm=False)
                for params in (GREEDY, SEEDED)], llm
    finally:
        llm.shutdown()


@pytest.mark.parametrize(("num_layers", "stages", "num_kv_blocks"), [
    (3, 2, 24),  # stages of 2 + 1 layers; 24 blocks cannot hold every request at once: preemption
    (5, 3, 64),  # 2 + 2 + 1 layers
])
def test_batches_in_flight_answer_as_one_rank(tiny_model, num_layers, stages, num_kv_blocks):
    model_dir = tiny_model("llama", num_hidden_layers=num_layers)
    expected, _ = generate(model_dir, PROMPTS, num_kv_blocks=num_kv_blocks)
    actual, llm = generate(model_dir, PROMPTS, num_kv_blocks=num_kv_blocks, pipeline_parallel_size=stages)
    assert_same(expected, actual)
    assert llm.core.max_in_flight_seen == stages
    if num_kv_blocks < 64:
        assert llm.core.stats().num_preemptions > 0


def test_one_batch_at_a_time_without_async_scheduling(tiny_model):
    model_dir = tiny_model("llama", num_hidden_layers=3)
    expected, _ = generate(model_dir, PROMPTS[:4])
    actual, llm = generate(model_dir, PROMPTS[:4], pipeline_parallel_size=2, async_scheduling=False)
    assert_same(expected, actual)
    assert llm.core.max_in_flight_seen == 1


def _run(llm: LLM, abort_after_steps: int | None = None) -> tuple[dict[str, list[int]], str | None]:
    """Every request's tokens, and the one aborted while its step was in flight (if asked)."""
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:6]):
        llm.core.add_request(str(i), prompt, params)
    tokens: dict[str, list[int]] = {}
    aborted = None
    while llm.core.has_unfinished_requests():
        in_flight = [req_id for step, _ in llm.core._in_flight for req_id in step.req_ids()]
        if aborted is None and abort_after_steps is not None and llm.core.num_steps >= abort_after_steps and in_flight:
            aborted = in_flight[0]
            assert llm.core.abort_requests([aborted])[0].finish_reason == "abort"
        for output in llm.core.step():
            tokens.setdefault(output.request_id, []).extend(output.new_token_ids)
    stats = llm.core.stats()
    assert stats.num_running == stats.num_waiting == 0
    assert stats.num_free_blocks == stats.num_kv_blocks
    return tokens, aborted


def test_a_request_aborted_in_flight_ends_and_the_others_go_on(tiny_model):
    model_dir = tiny_model("llama", num_hidden_layers=3)
    expected, _ = _run(LLM(model_dir, **OPTIONS, num_kv_blocks=64))
    llm = LLM(model_dir, **OPTIONS, num_kv_blocks=64, pipeline_parallel_size=2)
    try:
        actual, aborted = _run(llm, abort_after_steps=6)
    finally:
        llm.shutdown()
    assert aborted is not None
    assert {request_id: expected[request_id] for request_id in actual if request_id != aborted} == {
        request_id: token_ids for request_id, token_ids in actual.items() if request_id != aborted}
    assert len(actual) == len(expected)
    assert actual[aborted] == expected[aborted][:len(actual[aborted])] and len(actual[aborted]) < 12


def test_stage_timelines_show_two_steps_at_once(tiny_model, tmp_path, monkeypatch):
    model_dir = tiny_model("llama", num_hidden_layers=3)
    overlaps = {}
    for async_scheduling in (None, False):
        prefix = str(tmp_path / f"trace-{async_scheduling}")
        monkeypatch.setenv(stage_trace.ENV, prefix)
        generate(model_dir, PROMPTS, pipeline_parallel_size=2, async_scheduling=async_scheduling)
        first, last = (stage_trace.read(f"{prefix}.rank{rank}.json") for rank in (0, 1))
        assert first.keys() == last.keys() and len(first) > 20
        overlaps[async_scheduling] = stage_trace.overlaps(first, last)
    assert overlaps[None] > 0  # the first stage ran a step while the last one still ran an earlier one
    assert overlaps[False] == 0


def test_an_engine_stopped_with_batches_in_flight_stops_its_workers_cleanly(tiny_model):
    llm = LLM(tiny_model("llama", num_hidden_layers=3), **OPTIONS, num_kv_blocks=64, pipeline_parallel_size=2)
    params = SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True)
    for i, prompt in enumerate(PROMPTS[:4]):
        llm.core.add_request(str(i), prompt, params)
    while not llm.core._in_flight:  # after a step returns, up to P - 1 steps are in flight
        llm.core.step()
    workers = llm.core.runner._workers
    start = time.monotonic()
    llm.shutdown()
    assert time.monotonic() - start < 10
    assert [worker.returncode for worker in workers] == [0]


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_cuda_stages_keep_batches_in_flight_over_nccl(tiny_model, tmp_path, monkeypatch, tensor_parallel_size):
    """The same on GPUs: activations posted over NCCL (its own stream), answers back over gloo."""
    if torch.cuda.device_count() < 2 * tensor_parallel_size:
        pytest.skip(f"needs {2 * tensor_parallel_size} CUDA devices")
    model_dir = tiny_model("llama", num_hidden_layers=3)
    options = {"device": "cuda", "num_kv_blocks": 64}
    expected, _ = generate(model_dir, PROMPTS, **options)
    monkeypatch.setenv(stage_trace.ENV, str(tmp_path / "trace"))
    actual, llm = generate(model_dir, PROMPTS, **options, pipeline_parallel_size=2,
                           tensor_parallel_size=tensor_parallel_size)
    assert_same(expected, actual)
    assert llm.core.max_in_flight_seen == 2
    first, last = (stage_trace.read(f"{tmp_path}/trace.rank{rank}.json") for rank in (0, 2 * tensor_parallel_size - 1))
    assert stage_trace.overlaps(first, last) > 0


# Rank 0 idles three times the collective timeout before its command; rank 1 must still be waiting for it.
_IDLE_RANK = """
import sys, time, torch
from engine.distributed import parallel_state
rank, address = int(sys.argv[1]), sys.argv[2]
parallel_state.init_parallel(rank, 1, 2, address, torch.device("cpu"), timeout_s=1.0)
if rank == 0:
    time.sleep(3.0)
    parallel_state.send_to_workers(b"step")
    print(parallel_state.recv_bytes(1).decode())
else:
    command = parallel_state.receive_command()
    parallel_state.send_bytes(command + b" taken", 0)
    time.sleep(0.5)
parallel_state.destroy()
"""


def test_a_worker_waits_for_its_next_command_longer_than_the_collective_timeout():
    """An idle engine sends its workers nothing; their wait for the next command must not time out (it did after
    the 60 s collective timeout, failing an idle served model)."""
    from engine.distributed.parallel_state import free_tcp_address

    address = free_tcp_address()
    ranks = [subprocess.Popen([sys.executable, "-c", _IDLE_RANK, str(rank), address], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for rank in (0, 1)]
    outputs = [rank.communicate(timeout=60) for rank in ranks]
    assert [rank.returncode for rank in ranks] == [0, 0], outputs
    assert outputs[0][0].strip() == "step taken"
