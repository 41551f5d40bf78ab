"""The runner's host work for one decode step of many rows, without a model: `ModelRunner._batch_rows` and
`InputBatch.fill` padded to the decode graph's bucket, as a CUDA decode step does them (on the CPU device).

    python bench/decode_host_path.py [--rows 256] [--steps 200] [--runs 7]

Prints the best run's time per step. Run it with PYTHONPATH=<tree> on two trees, alternating, to compare them.
"""

from __future__ import annotations

import argparse
import inspect
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

import torch  # noqa: E402

from engine.input_batch import CachedRequestState, InputBatch, ScheduledRow  # noqa: E402
from engine.runner import ModelRunner  # noqa: E402
from engine.sampling_params import SamplingParams  # noqa: E402


class _Runner:  # what `_batch_rows` reads of a runner
    device = torch.device("cpu")
    _last_sampled_rows: dict[str, int] = {}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, default=256)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    batch = InputBatch(8192, args.rows, 64, 16, torch.device("cpu"), with_lora=False)
    states = [CachedRequestState(str(i), list(range(100)), 50, SamplingParams(temperature=0.0), frozenset(),
                                 list(range(i, i + 7)), None, None) for i in range(args.rows)]
    rows = [ScheduledRow(state, 99, 1) for state in states]
    # Trees before mixed verify steps were padded (#20) take no row length.
    extra = (1,) if "row_len" in inspect.signature(ModelRunner._batch_rows).parameters else ()
    best = float("inf")
    for _ in range(args.runs):
        start = time.perf_counter()
        for _ in range(args.steps):
            batch_rows = ModelRunner._batch_rows(_Runner, rows, *extra)[0]
            batch.fill(batch_rows, pad_to=args.rows, pad_query_len=1)
        best = min(best, (time.perf_counter() - start) / args.steps)
    print(f"{best * 1e6:.0f} us per {args.rows}-row decode step (_batch_rows + fill), best of {args.runs} runs")


if __name__ == "__main__":
    main()
