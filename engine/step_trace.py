"""A step-by-step timeline of an engine, kept only when asked for (`EngineCore.step_trace`; in the appliance,
KVBOX_STEP_TRACE=PREFIX writes PREFIX.PID.json when the engine stops): where a run's wall time went.

Two runs of one workload that differ in wall time (offline and served, say) differ in one of: when the requests
arrived, how many steps ran and how big they were, how long each took and how much of it was spent waiting for the
device, and the gaps between steps (the loop's own work outside `step`, or idling for requests). Times are
`time.monotonic()`, which one machine's processes share, so a client can cut out its own run's window.
"""

from __future__ import annotations

import json
import statistics
from dataclasses import asdict, dataclass, field


@dataclass
class StepRecord:
    start: float
    seconds: float
    device_wait_seconds: float
    num_tokens: int  # launched by this call: prompt chunks plus one per decoding request
    num_requests: int


@dataclass
class StepTrace:
    steps: list[StepRecord] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # when each request reached the engine
    bounds: tuple[float, float] | None = None  # a client's run, when cut out by `window`

    def write(self, path: str) -> None:
        with open(path, "w") as out:
            json.dump(asdict(self), out)

    @classmethod
    def read(cls, path: str) -> StepTrace:
        with open(path) as f:
            data = json.load(f)
        return cls([StepRecord(**s) for s in data["steps"]], data["arrivals"])

    def window(self, start: float, end: float) -> StepTrace:
        """The steps and arrivals of a client's run from `start` to `end`; the summary then also tells how long the
        first request took to arrive and how long after the last step the run ended."""
        return StepTrace([s for s in self.steps if start <= s.start <= end],
                         [t for t in self.arrivals if start <= t <= end], (start, end))

    def summary(self) -> dict[str, float]:
        """From the first arrival (or step) to the end of the last step: the time in steps, of it waiting for the
        device, and outside them; the arrivals' spread; prefill-carrying and decode-only steps, their count and
        median time."""
        if not self.steps:
            return {}
        begin = min([self.steps[0].start, *self.arrivals[:1]])
        end = self.steps[-1].start + self.steps[-1].seconds
        in_steps = sum(s.seconds for s in self.steps)
        around = {} if self.bounds is None else {"lead_s": begin - self.bounds[0], "tail_s": self.bounds[1] - end}
        decode = [s for s in self.steps if s.num_tokens == s.num_requests]
        prefill = [s for s in self.steps if s.num_tokens > s.num_requests]
        return {
            "span_s": end - begin,
            "first_step_after_s": self.steps[0].start - begin,
            "arrivals": len(self.arrivals),
            "arrival_spread_s": self.arrivals[-1] - self.arrivals[0] if self.arrivals else 0.0,
            "steps": len(self.steps),
            "in_steps_s": in_steps,
            "device_wait_s": sum(s.device_wait_seconds for s in self.steps),
            "between_steps_s": end - begin - in_steps - (self.steps[0].start - begin),
            "prefill_steps": len(prefill),
            "prefill_step_median_ms": statistics.median(s.seconds for s in prefill) * 1e3 if prefill else 0.0,
            "prefill_step_tokens": sum(s.num_tokens for s in prefill),  # their decode tokens too
            "decode_steps": len(decode),
            "decode_step_median_ms": statistics.median(s.seconds for s in decode) * 1e3 if decode else 0.0,
            "slowest_step_ms": max(s.seconds for s in self.steps) * 1e3,  # a compile mid-run shows here
            **around,
        }


def print_summary(summary: dict[str, float]) -> None:
    if not summary:
        print("  step trace: no steps")
        return
    print(f"  step trace: {summary['span_s']:.2f} s from the first arrival to the last step's end; "
          f"{summary['arrivals']} arrivals over {summary['arrival_spread_s'] * 1e3:.0f} ms, first step after "
          f"{summary['first_step_after_s'] * 1e3:.1f} ms")
    print(f"    {summary['steps']} steps: {summary['in_steps_s']:.2f} s in them ({summary['device_wait_s']:.2f} s "
          f"waiting for the device), {summary['between_steps_s']:.2f} s between them")
    print(f"    {summary['prefill_steps']} with prompt tokens ({summary['prefill_step_tokens']} tokens in all; "
          f"median {summary['prefill_step_median_ms']:.1f} ms), {summary['decode_steps']} decode-only (median "
          f"{summary['decode_step_median_ms']:.1f} ms); the slowest {summary['slowest_step_ms']:.1f} ms")
    if "lead_s" in summary:
        print(f"    the client's run: {summary['lead_s'] * 1e3:.0f} ms before the first arrival, "
              f"{summary['tail_s'] * 1e3:.0f} ms after the last step")
