"""The vocabulary index xgrammar compiles grammars against (`xgr.TokenizerInfo`), for the engine's grammar backend.

Building it means loading the model's tokenizer: seconds of Python (about 10 s for the built-in GGUF's on one CI
core, the transformers import included). In a background thread of the engine process each of its turns at the
interpreter lock delayed the main thread's steps for as long as it ran: on an H100 the first batch-1 request after
start-up decoded at 40-65 tokens/s against 165, its first token after 0.4-1.3 s against 20 ms (bench/RESULTS.md,
twenty-third session). So a process that has not imported transformers (a served engine) builds the index in a
child process, which hands it over as xgrammar's JSON (no pickle crosses); the engine process still imports
xgrammar, whose import takes transformers' with it (1-3 s), but not the tokenizer's load and decoding. Where
transformers is loaded already (an offline LLM, which loaded the tokenizer for itself; a test process) a child would
pay that import again, and the index is built in the calling thread.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import xgrammar as xgr

_TIMEOUT_S = 600  # a stuck child would leave structured requests waiting for ever; the slowest load seen took 20 s


def tokenizer_info(tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    in_process = "transformers" in sys.modules  # asked first: importing xgrammar imports it
    import xgrammar as xgr

    if in_process:
        return _build(tokenizer_path, vocab_size, stop_token_ids)
    root = str(Path(__file__).resolve().parents[2])  # the folder holding the engine package
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))}
    try:
        # Through a pipe, not a file: a child outliving a killed engine ends at its write and leaves nothing behind.
        done = subprocess.run([sys.executable, "-m", __name__, tokenizer_path, str(vocab_size),
                               json.dumps(stop_token_ids)], env=env, capture_output=True, text=True,
                              timeout=_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"loading the tokenizer {tokenizer_path!r} for structured outputs took over {_TIMEOUT_S} s"
                           ) from None
    if done.returncode != 0:
        reason = done.stderr.strip().splitlines()[-1] if done.stderr.strip() else f"exit code {done.returncode}"
        raise RuntimeError(f"loading the tokenizer {tokenizer_path!r} for structured outputs failed: {reason}")
    return xgr.TokenizerInfo.deserialize_json(done.stdout)


def _build(tokenizer_path: str, vocab_size: int, stop_token_ids: list[int]) -> xgr.TokenizerInfo:
    import xgrammar as xgr

    from engine.tokenizer import load_tokenizer

    return xgr.TokenizerInfo.from_huggingface(load_tokenizer(tokenizer_path), vocab_size=vocab_size,
                                              stop_token_ids=stop_token_ids)


if __name__ == "__main__":
    path, size, stops = sys.argv[1:]
    result = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # what the tokenizer's libraries print goes to stderr
    sys.stdout = sys.stderr
    result.write(_build(path, int(size), json.loads(stops)).serialize_json())
    result.close()
