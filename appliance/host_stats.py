"""Host readings for the dashboard (psutil): the machine's CPU and memory, and each process's resident memory and
CPU share (the server's own and every engine process's), read once a second by the statistics' sampler.

`psutil.Process` objects are kept per pid, because a process's CPU share is measured between two readings of the
same object; pids that are gone are forgotten.
"""

from __future__ import annotations

import os
from typing import Any

import psutil


class HostSampler:
    def __init__(self):
        self._processes: dict[int, psutil.Process] = {}
        psutil.cpu_percent(None)  # the first reading only starts the interval
        self.num_cpus = psutil.cpu_count() or 1
        self.ram_total = psutil.virtual_memory().total

    def host(self) -> dict[str, float]:
        memory = psutil.virtual_memory()
        return {"cpu": psutil.cpu_percent(None) / 100, "ram_used": float(memory.total - memory.available),
                "server_rss": float(self.process(os.getpid())["rss"])}

    def process(self, pid: int) -> dict[str, Any]:
        """{"rss": bytes, "cpu": cores in use since the last reading}; zeros for a process that is gone."""
        found = self._processes.get(pid)
        try:
            if found is None:
                found = self._processes[pid] = psutil.Process(pid)
                found.cpu_percent(None)
            with found.oneshot():
                return {"rss": found.memory_info().rss, "cpu": found.cpu_percent(None) / 100}
        except psutil.Error:
            self._processes.pop(pid, None)
            return {"rss": 0, "cpu": 0.0}

    def forget_others(self, pids: set[int]) -> None:
        for pid in [p for p in self._processes if p not in pids and p != os.getpid()]:
            del self._processes[pid]
