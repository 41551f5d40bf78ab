"""Frozen ranks: a rank whose process is stopped (SIGSTOP, a stopped job) keeps its connections open, so the other
ranks wait for it in their next collective until its timeout (the engine's `collective_timeout_s`, minutes).
The process that started the rank (the engine process, or another node's `kvbox serve`) kills it once it has been
seen stopped for `STOPPED_LIMIT_S`: its connections close, the waiting collectives fail at once, and the model's
ranks restart within seconds. A slow rank is never taken for a frozen one: only the kernel's stopped state counts.
Imports no torch (node R > 0 runs it beside its workers)."""

from __future__ import annotations

import logging
import subprocess
import threading
from collections.abc import Callable

logger = logging.getLogger("kvbox.engine")
POLL_S = 0.5
STOPPED_LIMIT_S = 3.0


def is_stopped(pid: int) -> bool:
    """Whether the kernel holds the process stopped (state T in /proc/PID/stat; False where there is no /proc)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return False
    return stat[stat.rindex(")") + 2:].startswith("T")  # the name, in parentheses, may hold spaces


class StoppedRankWatchdog:
    """A daemon thread that kills those of `processes()` seen stopped at every poll for `STOPPED_LIMIT_S`; `killed`
    holds their pids. Counting polls rather than clock time, a watchdog stopped along with its ranks (a stopped
    terminal job) and then resumed does not kill them."""

    def __init__(self, processes: Callable[[], list[subprocess.Popen]], label: str):
        self._processes = processes
        self._label = label
        self.killed: set[int] = set()
        self._done = threading.Event()
        threading.Thread(target=self._run, name="stopped-rank-watchdog", daemon=True).start()

    def _run(self) -> None:
        polls: dict[int, int] = {}  # pid -> consecutive polls it was seen stopped
        while not self._done.wait(POLL_S):
            for process in self._processes():
                if process.poll() is None and is_stopped(process.pid):
                    polls[process.pid] = polls.get(process.pid, 0) + 1
                    if polls[process.pid] * POLL_S >= STOPPED_LIMIT_S and process.pid not in self.killed:
                        logger.error("%s: process %d stopped for %.0f s; killed as hung", self._label, process.pid,
                                     STOPPED_LIMIT_S)
                        self.killed.add(process.pid)
                        process.kill()
                else:
                    polls.pop(process.pid, None)

    def stop(self) -> None:
        self._done.set()
