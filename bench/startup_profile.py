"""Where an engine's start-up goes: cProfile over one `EngineCore` construction (weights, KV sizing, CUDA graphs),
with the phases the engine logs; run it twice on one machine to see the start with Triton's cache cold, then warm.

    python bench/startup_profile.py --shape llama-3.1-8b
    python bench/startup_profile.py --shape tiny-llama --device cpu   # smoke

cProfile follows the main thread only: work in the engine's other threads shows as time the main thread's calls
waited for the interpreter lock.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import time
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])

from bench.common import SHAPES, shape_folder  # noqa: E402
from engine.config import EngineConfig  # noqa: E402
from engine.core import EngineCore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="llama-3.1-8b", choices=sorted(SHAPES))
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--top", type=int, default=30, help="rows of each table")
    args = parser.parse_args()
    folder = shape_folder(args.shape)
    profiler = cProfile.Profile()
    started = time.perf_counter()
    profiler.enable()
    core = EngineCore(EngineConfig(model=folder, load_format="dummy", dtype=SHAPES[args.shape]["torch_dtype"],
                                   device=args.device, max_model_len=args.max_model_len,
                                   max_prefill_tokens_while_decoding=512))  # served defaults: mixed graphs too
    profiler.disable()
    print(f"engine built in {time.perf_counter() - started:.2f} s; phases "
          + ", ".join(f"{name} {seconds:.2f} s" for name, seconds in core.startup_seconds.items()))
    stats = pstats.Stats(profiler)
    stats.sort_stats("cumulative").print_stats(args.top)
    stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
