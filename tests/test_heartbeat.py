"""Rank heartbeats (engine.distributed.heartbeat): a rank whose beat stops is lost within the timeout, a beating one
never is, a store that goes away loses rank 0; in a tensor-parallel engine a worker that falls silent without
exiting or closing a connection is killed and fails the engine within seconds (its collective timeout: minutes),
while an engine paused whole (every rank and watcher) goes on when resumed."""

import datetime
import os
import signal
import subprocess
import sys
import time

import pytest
import torch.distributed as dist

pytest.register_assert_rewrite("helpers_server")
from helpers_server import model_config, run_server, server_config, wait_for_model_error  # noqa: E402

from engine import LLM, SamplingParams  # noqa: E402
from engine.distributed import tp_runner  # noqa: E402
from engine.distributed.heartbeat import Heartbeat  # noqa: E402
from engine.distributed.tp_runner import WorkerDiedError  # noqa: E402

pytest_plugins = ["helpers_server"]

TIMEOUT_S = 1.0


def _store() -> tuple[dist.TCPStore, str]:
    master = dist.TCPStore("127.0.0.1", 0, None, is_master=True, wait_for_workers=False,
                           timeout=datetime.timedelta(seconds=5))
    return master, f"tcp://127.0.0.1:{master.port}"


def _wait_for(lost: list, count: int, limit_s: float) -> float:
    started = time.monotonic()
    while len(lost) < count and time.monotonic() - started < limit_s:
        time.sleep(0.02)
    return time.monotonic() - started


def test_a_rank_is_lost_once_its_beat_stops_and_not_before():
    master, address = _store()
    lost = []
    watcher = Heartbeat(address, 0, [1, 2], TIMEOUT_S, lambda rank, why: lost.append((rank, why)))
    beaters = [Heartbeat(address, rank, [0], TIMEOUT_S, lambda rank, why: lost.append(("beater", rank)))
               for rank in (1, 2)]
    try:
        time.sleep(4 * TIMEOUT_S)
        assert lost == []  # beating ranks, several timeouts long
        beaters[1].stop()
        silent_for = _wait_for(lost, 1, 5 * TIMEOUT_S)
        assert lost == [(2, f"no heartbeat for {TIMEOUT_S:g} s")]
        assert 0.5 * TIMEOUT_S < silent_for < TIMEOUT_S + 1.0
        time.sleep(2 * TIMEOUT_S)
        assert len(lost) == 1  # reported once; rank 1 still beats
    finally:
        for heartbeat in [watcher, *beaters]:
            heartbeat.stop()
        del master


def test_a_rank_watching_rank_0_loses_it_when_its_store_goes_away():
    master, address = _store()
    lost = []
    beater = Heartbeat(address, 1, [0], TIMEOUT_S, lambda rank, why: lost.append((rank, why)))
    keeper = Heartbeat(address, 0, [], TIMEOUT_S, lambda rank, why: None)  # rank 0 beats, watches no one here
    time.sleep(2 * TIMEOUT_S)
    assert lost == []
    del master  # rank 0's process ended: its store closes
    assert _wait_for(lost, 1, 5 * TIMEOUT_S) < TIMEOUT_S
    assert len(lost) == 1 and lost[0][0] == 0 and "stopped answering" in lost[0][1], lost
    for heartbeat in (beater, keeper):
        heartbeat.stop()


WATCHER = """
import sys, time
from engine.distributed.heartbeat import Heartbeat
Heartbeat(sys.argv[1], 0, [1], float(sys.argv[2]), lambda rank, why: print("lost", rank, flush=True))
print("watching", flush=True)
time.sleep(120)
"""


def test_a_watcher_paused_with_its_rank_does_not_lose_it_on_waking_first():
    """The watcher (its own process) and the rank it watches (beats from this test) pause together for two
    timeouts; the watcher wakes first and polls three times before the beats resume: in clock time that silence
    is 4.3 s, in its polls 0.3 s, well short of the timeout. Beats that stop for good are then lost within it."""
    timeout_s = 2.0
    master, address = _store()
    watcher = subprocess.Popen([sys.executable, "-c", WATCHER, address, str(timeout_s)], stdout=subprocess.PIPE,
                               text=True)
    try:
        assert watcher.stdout.readline().strip() == "watching"

        def beat(seconds: float) -> None:
            for _ in range(int(seconds / 0.05)):
                master.add("kvbox/beat/1", 1)
                time.sleep(0.05)

        beat(1.0)
        watcher.send_signal(signal.SIGSTOP)  # the beats stop with it
        time.sleep(2 * timeout_s)
        watcher.send_signal(signal.SIGCONT)
        time.sleep(0.3)
        beat(1.0)
        assert _read_line(watcher, 0) == ""  # not lost across the pause
        started = time.monotonic()
        line = _read_line(watcher, 3 * timeout_s)  # the beats have stopped for good
        assert line == "lost 1", line
        assert time.monotonic() - started < timeout_s + 1.0
    finally:
        watcher.kill()
        watcher.wait()


def _read_line(process: subprocess.Popen, timeout_s: float) -> str:
    """The next line `process` prints, or "" if none within `timeout_s`."""
    import selectors

    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        return process.stdout.readline().strip() if selector.select(timeout_s) else ""


class _NoWatchdog:
    """Leaves a stopped worker to the heartbeat (the stopped-rank watchdog would kill it first, in 3 s)."""

    killed: set[int] = set()

    def __init__(self, *args):
        pass

    def stop(self) -> None:
        pass


def test_a_silent_worker_is_killed_and_fails_the_engine_before_its_collective_timeout(tiny_model, monkeypatch):
    monkeypatch.setattr(tp_runner, "StoppedRankWatchdog", _NoWatchdog)
    greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", tensor_parallel_size=2, collective_timeout_s=120,
              rank_heartbeat_timeout_s=2)
    try:
        llm.generate("Once upon a time", greedy, use_tqdm=False)
        os.kill(llm.core.runner._workers[0].pid, signal.SIGSTOP)  # frozen: its connections stay open
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(code -9, no heartbeat for 2 s: killed as hung\)"):
            llm.generate("Once upon a time", greedy, use_tqdm=False)
        assert time.monotonic() - started < 10
    finally:
        llm.shutdown()


PAUSED_ENGINE = """
import os, signal, sys, time
from engine import LLM, SamplingParams
greedy = SamplingParams(temperature=0.0, max_tokens=4, ignore_eos=True)
llm = LLM(sys.argv[1], dtype="float32", device="cpu", tensor_parallel_size=2, rank_heartbeat_timeout_s=2)
first = llm.generate("Once upon a time", greedy, use_tqdm=False)[0].outputs[0].token_ids
print("ready", flush=True)
time.sleep(6)  # the test stops this whole process group meanwhile, then resumes it
again = llm.generate("Once upon a time", greedy, use_tqdm=False)[0].outputs[0].token_ids
llm.shutdown()
print("same" if again == first else f"differ {first} {again}", flush=True)
"""


def test_an_engine_paused_whole_and_resumed_loses_no_rank(tiny_model):
    """A stopped terminal job (every rank and its watchers stopped together, for several timeouts) goes on when
    resumed, even where a watcher resumes before the rank it watches: silence is counted in the watchers' own polls,
    which stop with them."""
    process = subprocess.Popen([sys.executable, "-c", PAUSED_ENGINE, tiny_model("llama")], stdout=subprocess.PIPE,
                               text=True, start_new_session=True)
    try:
        assert process.stdout.readline().strip() == "ready"
        os.killpg(process.pid, signal.SIGSTOP)
        time.sleep(4)  # two heartbeat timeouts
        # Rank 0 first: its watcher polls the worker, still stopped, before the worker beats again. Counted in
        # clock time that silence would be 4 s; in polls it is the few since the resume.
        os.kill(process.pid, signal.SIGCONT)
        time.sleep(0.3)
        os.killpg(process.pid, signal.SIGCONT)
        assert process.stdout.read().strip() == "same"
        assert process.wait(60) == 0
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)


STUCK_RANK = """
import os, sys, threading
# A worker (`python -m engine.distributed.worker RANK ...`) of the rank the test names: its main thread stops for
# good at the start of the named step, as in a deadlock, while its heartbeat thread runs on.
if sys.argv[:1] == ["-m"] and sys.argv[1:2] == [os.environ.get("KVBOX_TEST_STUCK_RANK")]:
    import engine.runner
    execute, calls = engine.runner.ModelRunner.execute, []

    def stuck(self, scheduler_output):
        calls.append(1)
        if len(calls) == int(os.environ["KVBOX_TEST_STUCK_AT"]):
            threading.Event().wait()
        return execute(self, scheduler_output)

    engine.runner.ModelRunner.execute = stuck
"""


def test_a_worker_stuck_in_a_step_is_killed_and_fails_the_engine_before_its_collective_timeout(
        tiny_model, monkeypatch, tmp_path):
    """A worker whose main thread stops mid-step while its heartbeat thread beats on: rank 0 has waited for it in
    the step's first all-reduce the whole heartbeat timeout while it stayed busy in one step, so it is killed as
    stuck and the request fails within seconds, not after the 120 s collective timeout."""
    (tmp_path / "sitecustomize.py").write_text(STUCK_RANK)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("KVBOX_TEST_STUCK_RANK", "1")
    monkeypatch.setenv("KVBOX_TEST_STUCK_AT", "3")  # the prefill and a decode step run first
    greedy = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    llm = LLM(tiny_model("llama"), dtype="float32", device="cpu", tensor_parallel_size=2, collective_timeout_s=120,
              rank_heartbeat_timeout_s=2)
    try:
        started = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(code -9, stuck: busy in one step for 2 s while rank 0 "
                                                  r"waited for it: killed as hung\)"):
            llm.generate("Once upon a time", greedy, use_tqdm=False)
        assert 2 < time.monotonic() - started < 10
    finally:
        llm.shutdown()


STUCK_RANK_0 = """
import os, pathlib, threading
# An engine process's rank 0 (the only process that sends steps): its main thread stops for good once it has sent
# the named step to the workers, which then wait for it in that step's first all-reduce. Once: the engine the
# supervisor starts again runs normally.
if os.environ.get("KVBOX_TEST_STUCK_AT"):
    import engine.distributed.tp_runner as tp_runner
    from engine import contract
    send, steps = tp_runner.TensorParallelRunner.send, []

    def stuck(self, command):
        send(self, command)
        once = pathlib.Path(os.environ["KVBOX_TEST_STUCK_ONCE"])
        if isinstance(command, contract.ExecuteStep) and not once.exists():
            steps.append(1)
            if len(steps) == int(os.environ["KVBOX_TEST_STUCK_AT"]):
                once.touch()
                threading.Event().wait()

    tp_runner.TensorParallelRunner.send = stuck
"""


def test_served_rank_0_stuck_in_a_step_ends_its_engine_which_restarts(tiny_model, monkeypatch, tmp_path):
    """Rank 0's main thread stops mid-step while the worker waits for it: rank 0's own heartbeat thread finds it
    stuck, reports why and ends the engine process; the request fails within seconds, and the restarted engine
    answers as before."""
    (tmp_path / "sitecustomize.py").write_text(STUCK_RANK_0)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [str(tmp_path), os.environ.get("PYTHONPATH")])))
    monkeypatch.setenv("KVBOX_TEST_STUCK_AT", "3")
    monkeypatch.setenv("KVBOX_TEST_STUCK_ONCE", str(tmp_path / "stuck-once"))
    config = server_config([model_config("llama", tiny_model("llama"), parallelism={"tensor": 2})],
                           rank_heartbeat_timeout_s=2)
    body = {"model": "llama", "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0, "ignore_eos": True}
    with run_server(config, tmp_path) as server, server.http() as http:
        started = time.monotonic()
        response = http.post("/v1/completions", json=body, timeout=60)
        assert response.status_code >= 500 and "error" in response.json(), response.text
        assert time.monotonic() - started < 10
        wait_for_model_error(server, "llama", "rank 0 (stuck: busy in one step for 2 s while rank 1 waited for it)")
        deadline = time.monotonic() + 60
        while server.admin_models()["llama"]["status"] != "ready":
            assert time.monotonic() < deadline, "the model did not come back"
            time.sleep(0.2)
        response = http.post("/v1/completions", json=body, timeout=60)
        assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] == 8, response.text
