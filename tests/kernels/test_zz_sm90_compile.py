"""Every Triton launch the kernel tests before this one made under the interpreter compiles for sm_90 (named to
run last in this folder; tests/kernels/sm90_compile.py says why)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from sm90_compile import LAUNCHES


def test_interpreted_launches_compile_for_sm90(tmp_path):
    if not LAUNCHES:
        pytest.skip("no kernel ran under the interpreter before this test in this session")
    launches = tmp_path / "launches.jsonl"
    launches.write_text("".join(json.dumps(launch) + "\n" for launch in LAUNCHES))
    root = Path(__file__).resolve().parents[2]
    # This process's environment less the interpreter (the kernels must be JIT functions); a cache of its own.
    env = {**{k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}, "TRITON_CACHE_DIR": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "tests.kernels.sm90_compile", str(launches)], cwd=root,
                          capture_output=True, text=True, env=env, timeout=1200)
    print(done.stdout)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
