"""Where a Hugging Face checkpoint keeps its quantization settings: config.json's `quantization_config`, or, for
checkpoints from before transformers read GPTQ and AWQ (older AutoGPTQ and AutoAWQ, early TheBloke repos), a separate
`quantize_config.json` (AutoGPTQ's; AutoAWQ's too in some versions) or `quant_config.json` (AutoAWQ's) beside it, the
files vLLM looks for. Torch-free: the engine (`ModelConfig`) and `kvbox check-config` read it alike.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from engine.quantization.spec import QuantizationConfigError

QUANTIZE_CONFIG_FILES = ("quantize_config.json", "quant_config.json")
# AutoAWQ's keys; auto-gptq never writes them.
_AWQ_KEYS = ("zero_point", "version", "w_bit", "q_group_size")


def checkpoint_quantization_config(folder: str | Path, config: dict[str, Any]) -> dict[str, Any] | None:
    """`config`'s (config.json's) quantization_config; else the folder's quantize_config.json or quant_config.json
    (the first there), whose quant_method is gptq unless it names one or has AutoAWQ's keys (as transformers and vLLM
    read it); None: a float checkpoint."""
    if config.get("quantization_config"):
        return config["quantization_config"]
    file = next((Path(folder) / name for name in QUANTIZE_CONFIG_FILES if (Path(folder) / name).is_file()), None)
    if file is None:
        return None
    try:
        settings = json.loads(file.read_text())
    except ValueError as error:
        raise QuantizationConfigError(file.name, str(file), f"not valid JSON ({error})") from None
    if not isinstance(settings, dict):
        raise QuantizationConfigError(file.name, settings, f"expected a JSON object (model {folder})")
    if "quant_method" in settings:
        return settings
    return {**settings, "quant_method": "awq" if any(key in settings for key in _AWQ_KEYS) else "gptq"}
