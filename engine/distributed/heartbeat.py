"""Liveness between a parallel engine's ranks, beside their collectives: each rank's thread adds to its own counter in
the rendezvous store (rank 0's TCPStore) every `BEAT_S` (a tenth of the timeout, if shorter) and reads the counters
of the ranks it watches (rank 0 watches every other rank; the others watch rank 0). A counter that has not moved for
the engine's `rank_heartbeat_timeout_s`, or a store that no longer answers, means that rank is lost.

It catches what closes no connection, which a collective would otherwise wait out for its whole timeout (minutes):
a machine that lost power or its network, a node frozen whole (its own stopped-rank watchdog with it), a process
whose threads no longer run. A rank whose main thread is stuck while its other threads run (a Python deadlock)
beats on; with tensor parallelism each beat also publishes the main thread's phase (`progress.py`), and rank 0
finds a rank busy in one step while another of its group has waited for it the whole timeout: that rank is lost
as stuck. A stuck rank no group waits for (a pipeline stage alone in its stage, a GPU kernel that never ends while
every host waits) is still left to the collective timeout.

Silence is counted in this thread's own polls, not in clock time, so a watcher that was itself paused (a suspended
machine, a stopped job resumed) does not take the ranks it could not see for lost ones.
"""

from __future__ import annotations

import datetime
import logging
import math
import threading
from collections.abc import Callable
from urllib.parse import urlsplit

import torch.distributed as dist

from engine.distributed.progress import PROGRESS, stuck_ranks

logger = logging.getLogger("kvbox.engine")
BEAT_S = 0.5


def _key(rank: int) -> str:
    return f"kvbox/beat/{rank}"


def _phase_key(rank: int) -> str:
    return f"kvbox/phase/{rank}"


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__  # c10d adds frames


class Heartbeat:
    """`rank`'s beat and its watch over `watched`; `on_lost(rank, reason)` is called once per lost rank, from this
    object's daemon thread (rank 0's store itself unreachable: once, for rank 0). `groups`: the tensor-parallel
    groups whose stuck ranks this one finds (rank 0's, itself included)."""

    def __init__(self, init_method: str, rank: int, watched: list[int], timeout_s: float,
                 on_lost: Callable[[int, str], None], groups: list[list[int]] | None = None):
        address = urlsplit(init_method)
        self._host, self._port = address.hostname, address.port
        self._rank, self._watched = rank, list(watched)
        self._groups = [group for group in groups or [] if len(group) > 1]
        self._phases: dict[int, tuple[str, int]] = {}  # rank -> (snapshot, polls it has not changed)
        self._stuck: set[int] = set()
        self._timeout_s, self._on_lost = timeout_s, on_lost
        # Ten polls or more per timeout: one late beat (a busy machine) never looks like silence.
        self._beat_s = min(BEAT_S, timeout_s / 10)
        self._limit = math.ceil(timeout_s / self._beat_s)  # polls without a change
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"rank-{rank}-heartbeat", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            # A client of its own: the rendezvous store's connection is the process group's, used from its thread.
            store = dist.TCPStore(self._host, self._port, is_master=False, wait_for_workers=False,
                                  timeout=datetime.timedelta(seconds=self._timeout_s))
        except Exception as e:
            self._lose(0, f"its rendezvous store at {self._host}:{self._port} does not answer ({_first_line(e)})")
            return
        seen: dict[int, tuple[int, int]] = {}  # rank -> (counter, polls it has not moved)
        while not self._done.wait(self._beat_s):
            try:
                store.add(_key(self._rank), 1)
                store.set(_phase_key(self._rank), PROGRESS.snapshot())
                counters = {rank: store.add(_key(rank), 0) for rank in self._watched}
                if self._groups:
                    self._find_stuck(store)
            except Exception as e:  # connection reset (rank 0's process ended) or timed out (its machine is away)
                if not self._done.is_set():
                    self._lose(0, f"its rendezvous store at {self._host}:{self._port} stopped answering "
                                  f"({_first_line(e)})")
                return
            for rank, counter in counters.items():
                before, still = seen.get(rank, (-1, 0))
                seen[rank] = (counter, still + 1 if counter == before else 0)
                if seen[rank][1] >= self._limit:
                    self._watched.remove(rank)
                    self._lose(rank, f"no heartbeat for {self._timeout_s:g} s")

    def _find_stuck(self, store: dist.TCPStore) -> None:
        ranks = sorted({rank for group in self._groups for rank in group})
        keys = [_phase_key(rank) for rank in ranks]
        if not store.check(keys):  # a rank that has not beaten yet
            return
        for rank, key in zip(ranks, keys):
            snapshot = store.get(key).decode()
            before, still = self._phases.get(rank, ("", 0))
            self._phases[rank] = (snapshot, still + 1 if snapshot == before else 0)
        for rank, waiter in stuck_ranks(self._groups, self._phases, self._limit).items():
            if rank not in self._stuck:
                self._stuck.add(rank)
                self._lose(rank, f"stuck: busy in one step for {self._timeout_s:g} s while rank {waiter} waited "
                                 f"for it")

    def _lose(self, rank: int, reason: str) -> None:
        logger.error("rank %d (seen from rank %d): %s", rank, self._rank, reason)
        self._on_lost(rank, reason)

    def stop(self) -> None:
        self._done.set()
