"""The long fuzz run over the OpenAPI document (CI runs a bounded one, tests/test_openapi_fuzz.py): an in-process
server on a tiny model, N generated requests per operation, random seeds unless --seed. Prints the statuses seen
and exits non-zero on the first server error, dropped connection or error outside OpenAI's shape.

    PYTHONPATH=.:tests python bench/fuzz_api.py --examples 2000
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]

from engine.tools.tiny_model import build_tiny_model  # noqa: E402
from helpers_fuzz import fuzz, fuzz_config  # noqa: E402
from helpers_server import run_inprocess  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--examples", type=int, default=1000, help="generated requests per operation")
    parser.add_argument("--seed", type=int, default=None, help="a fixed seed (default: random)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as workdir:
        model = str(build_tiny_model("llama", Path(workdir)))
        with run_inprocess(fuzz_config(lambda family: model)) as server:
            statuses = fuzz(server.base_url, args.examples, args.seed)
    for key, count in sorted(statuses.items()):
        print(f"{count:8d}  {key}")
    print(f"{sum(statuses.values())} requests, no server error")


if __name__ == "__main__":
    main()
