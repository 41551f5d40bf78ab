"""The scheduler's host time per step: `schedule()` and `update_from_output()` for N decoding requests, no model.

    python bench/scheduler_step.py --requests 256                       # this tree's scheduler
    python bench/scheduler_step.py --requests 256 --compare-with main   # and engine/scheduler.py from a git revision

With --compare-with, the revision's scheduler file is imported from a temporary folder (it must run against this
tree's other modules) and the two are timed in alternation, each first in every other pair; process time, so that
other work on the machine weighs less.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[0] = str(ROOT)

from bench.common import module_at  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.contract import ModelRunnerOutput  # noqa: E402
from engine.kv_cache.manager import KVCacheManager  # noqa: E402
from engine.request import Request  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402
import engine.scheduler  # noqa: E402


def seconds_per_step(module, num_requests: int, steps: int) -> float:
    scheduler = module.Scheduler(EngineConfig(model="unused", max_model_len=1 << 16, max_num_seqs=num_requests),
                                 KVCacheManager(num_requests * 200, 16, True))
    for i in range(num_requests):
        scheduler.add_request(Request(str(i), list(range(i * 7, i * 7 + 100)),
                                      SamplingParams(max_tokens=1 << 20, ignore_eos=True), frozenset({2})))

    def step():
        out = scheduler.schedule()
        ids = out.req_ids()
        scheduler.update_from_output(out, ModelRunnerOutput(ids, [5] * len(ids)))

    for _ in range(20):  # the prefill, then decodes only
        step()
    start = time.process_time()
    for _ in range(steps):
        step()
    return (time.process_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--repeats", type=int, default=8)
    parser.add_argument("--compare-with", help="a git revision whose engine/scheduler.py is timed too")
    args = parser.parse_args()
    modules = {"this tree": engine.scheduler}
    if args.compare_with:
        modules[args.compare_with] = module_at(args.compare_with, "engine/scheduler.py")
    times = {name: [] for name in modules}
    for repeat in range(args.repeats):  # the order alternates: the first timed of a pair ran up to 20% slower
        for name, module in list(modules.items())[::1 if repeat % 2 == 0 else -1]:
            gc.collect()  # the previous run's requests and blocks, not this one's time
            times[name].append(seconds_per_step(module, args.requests, args.steps))
    for name, values in times.items():
        print(f"{name}: {args.requests} decoding requests, min {min(values) * 1e6:.0f} us, median "
              f"{statistics.median(values) * 1e6:.0f} us per step (process time, {args.repeats} x {args.steps} steps)")


if __name__ == "__main__":
    main()
