"""What a rank's main thread is doing, for its heartbeat to publish (`engine.distributed.heartbeat`): idle, busy
with a step, or waiting for the other ranks of its tensor-parallel group (in a collective of the forward, or for
the device to finish a step that holds one). Each change starts a new episode.

Ranks of one tensor-parallel group do the same work between their collectives, so one that stays busy in a single
episode while another of its group has waited all that time is stuck (a Python deadlock, a call that never
returns), not slow. The heartbeat beats on from its own thread whatever the main thread does, so without this a
stuck main thread was found only when the waiting rank's collective timed out (minutes). Only steps count as busy:
loading, profiling and graph capture differ between ranks in length and are never judged.
"""

from __future__ import annotations

IDLE, BUSY, WAITING = "idle", "busy", "waiting"


class Progress:
    """This process's rank's phase; written by its main thread only, read by the heartbeat's."""

    def __init__(self):
        self.phase = IDLE
        self.episode = 0
        self._outer: list[str] = []

    def snapshot(self) -> str:
        return f"{self.phase}:{self.episode}"

    def _enter(self, phase: str) -> None:
        self._outer.append(self.phase)
        self.phase, self.episode = phase, self.episode + 1

    def _leave(self) -> None:
        self.phase, self.episode = self._outer.pop(), self.episode + 1

    def busy(self) -> _Phase:
        """`with PROGRESS.busy():` around a step."""
        return _Phase(self, BUSY)

    def waiting(self) -> _Phase:
        """`with PROGRESS.waiting():` around a wait for the group's other ranks."""
        return _Phase(self, WAITING)


class _Phase:
    __slots__ = ("_progress", "_phase")

    def __init__(self, progress: Progress, phase: str):
        self._progress, self._phase = progress, phase

    def __enter__(self) -> None:
        self._progress._enter(self._phase)

    def __exit__(self, *exc) -> None:
        self._progress._leave()


PROGRESS = Progress()


def stuck_ranks(groups: list[list[int]], seen: dict[int, tuple[str, int]], limit: int) -> dict[int, int]:
    """{stuck rank: a rank of its group waiting for it}: a rank busy in one episode for `limit` polls or more while
    another of its group has been waiting as long. `seen`: rank -> (its published snapshot, polls it has not
    changed)."""
    stuck = {}
    for group in groups:
        long = {rank: seen[rank][0].partition(":")[0] for rank in group if rank in seen and seen[rank][1] >= limit}
        waiting = [rank for rank, phase in long.items() if phase == WAITING]
        if waiting:
            stuck.update({rank: waiting[0] for rank, phase in long.items() if phase == BUSY})
    return stuck
