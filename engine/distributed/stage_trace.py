"""When each parallel rank ran each step, kept only when asked for (KVBOX_STAGE_TRACE=PREFIX: every rank writes
PREFIX.rank<R>.json when the engine stops): a diagnostic of pipeline stages running several steps at once.

A rank's interval for a step runs from taking its command to handing its output on (rank 0: the first stage's
forward, activations posted; the last stage: its answer posted). Times are `time.monotonic()`, which one machine's
processes share. With several steps in flight, the first stage runs step N+1 while the last one still runs step N:
`overlaps` counts such pairs.
"""

from __future__ import annotations

import contextlib
import json
import os
import time
from collections.abc import Iterator

ENV = "KVBOX_STAGE_TRACE"


class StageTrace:
    def __init__(self, path: str):
        self.path = path
        self.steps: list[tuple[int, float, float]] = []  # step id, start, end

    @classmethod
    def from_env(cls, rank: int) -> StageTrace | None:
        prefix = os.environ.get(ENV)
        return cls(f"{prefix}.rank{rank}.json") if prefix else None

    @contextlib.contextmanager
    def step(self, step_id: int) -> Iterator[None]:
        start = time.monotonic()
        yield
        self.steps.append((step_id, start, time.monotonic()))

    def write(self) -> None:
        with open(self.path, "w") as out:
            json.dump(self.steps, out)


def traced(trace: StageTrace | None, step_id: int) -> contextlib.AbstractContextManager:
    return trace.step(step_id) if trace is not None else contextlib.nullcontext()


def read(path: str) -> dict[int, tuple[float, float]]:
    with open(path) as f:
        return {step_id: (start, end) for step_id, start, end in json.load(f)}


def overlaps(first: dict[int, tuple[float, float]], later: dict[int, tuple[float, float]]) -> int:
    """How many steps the `first` stage ran while the `later` one still ran an earlier step."""
    return sum(1 for step_id, (start, end) in first.items()
               if any(other < step_id and s < end and start < e for other, (s, e) in later.items()))
