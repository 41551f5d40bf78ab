"""The bounded CI version of bench/perplexity.py: the built-in SmolLM2's perplexity on the first 384 tokens of the
GPL-3 text (three windows of 128) with online fp8 weights, int8 weights and the FP8 KV cache, each close to the float
model's (the model as loaded: its GGUF dequantized).

Measured on the CPU (float32): float 39.218; fp8 KV -0.51% (+0.91% with the C kernels' norms); on the first 1024
tokens (windows of 256, symmetric int8 then): float 24.267, fp8 weights +2.80%, int8 weights +3.06%, fp8 KV +1.26%.
With 8-bit activations this slice's perplexity is one draw among many: the same norms rounded differently in their
last bit (the torch path, the C kernels, or five seeds of a random one-ulp jitter on every norm's output,
/tmp scripts in the fourteenth session) gave fp8 weights 37.53-40.29 (-4.3% to +2.7%) and int8 weights 38.04-40.28
(-3.0% to +2.7%), while the float model moved by 1e-6. So the weight-quantized cases are held to 5%, the FP8 KV
cache (whose rounding these do not touch as much) to 2%. The FP8 KV cache with scales calibrated at start-up
(`calculate_kv_scales`, amax / 448 over the built-in calibration text: no headroom) is beyond the bound, +8.28% on
this slice, so its case is an expected failure that turns into a failure once it holds.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.perplexity import CONFIGS, DEFAULT_MODEL, DEFAULT_TEXT, perplexities
from engine.models.builtin import resolve_builtin

BOUND = 0.02
BOUNDS = {"fp8 weights": 0.05, "int8 weights": 0.05}  # 8-bit activations: the slice's draw-to-draw spread


@pytest.fixture(scope="module")
def results() -> dict[str, float]:
    if not Path(DEFAULT_TEXT).is_file():
        pytest.skip(f"{DEFAULT_TEXT} (Debian's base-files) is not on this machine")
    try:
        resolve_builtin(DEFAULT_MODEL)
    except FileNotFoundError as e:
        pytest.skip(str(e))
    rows = {name: CONFIGS[name] for name in ("float", "fp8 weights", "int8 weights", "fp8 KV", "fp8 KV calib")}
    return perplexities(DEFAULT_MODEL, Path(DEFAULT_TEXT).read_text(), window=128, max_tokens=384, configs=rows,
                        device="cpu", dtype="float32")


@pytest.mark.parametrize("name", [
    "fp8 weights",
    "int8 weights",
    "fp8 KV",
    pytest.param("fp8 KV calib", marks=pytest.mark.xfail(strict=True, reason=(
        "calibrated amax / 448 scales measure +8.3%: the GPL text's K / V exceed the calibration text's and saturate"))),
])
def test_within_two_percent_of_float(results, name):
    assert 1 < results["float"] < 100  # a sane language model on English text
    assert abs(results[name] / results["float"] - 1) <= BOUNDS.get(name, BOUND), results
