"""Rank heartbeats (engine.distributed.heartbeat): a rank whose beat stops is lost within the timeout, a beating one
never is, a store that goes away loses rank 0; in a tensor-parallel engine a worker that falls silent without
exiting or closing a connection is killed and fails the engine within seconds (its collective timeout: a minute)."""

import datetime
import os
import signal
import time

import pytest
import torch.distributed as dist

from engine import LLM, SamplingParams
from engine.distributed import tp_runner
from engine.distributed.heartbeat import Heartbeat
from engine.distributed.tp_runner import WorkerDiedError

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
