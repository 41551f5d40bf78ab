"""The sampling defaults in effect for one model: what a request leaves unset comes from the YAML `default_sampling`,
else from the checkpoint's `generation_config.json` (as vLLM's `--generation-config auto`), else from
`SamplingParams`' own defaults. `model_sampling_defaults` merges the first two once per model start and logs the
result, so an operator sees what a bare request gets.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import msgspec

from appliance.config import ModelSpec
from appliance.config.schema import SamplingDefaults

logger = logging.getLogger("kvbox.supervisor")

# generation_config.json key -> SamplingDefaults field, with transformers' own default for the key: like vLLM, only
# values that differ from it count (a file that merely restates transformers' defaults, e.g. top_k 50, sets nothing).
_GENERATION_KEYS: dict[str, tuple[str, Any]] = {
    "temperature": ("temperature", 1.0),
    "top_p": ("top_p", 1.0),
    "top_k": ("top_k", 50),
    "min_p": ("min_p", None),
    "repetition_penalty": ("repetition_penalty", 1.0),
    "max_new_tokens": ("max_tokens", None),
}


def generation_config_defaults(model_path: str | None) -> dict[str, Any]:
    """The sampling fields a model folder's generation_config.json sets (empty for GGUF files and folders without
    one; a file that cannot be read is logged and ignored: it must not stop the model)."""
    if model_path is None or not Path(model_path).is_dir():
        return {}
    path = Path(model_path) / "generation_config.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        logger.warning("%s: ignored: %s", path, e)
        return {}
    return {field: data[key] for key, (field, hf_default) in _GENERATION_KEYS.items()
            if data.get(key) is not None and data[key] != hf_default}


def model_sampling_defaults(spec: ModelSpec, model_path: str | None, max_tokens_cap: int) -> SamplingDefaults:
    """The YAML's defaults over the checkpoint's; logs each default and where it comes from."""
    sources: dict[str, tuple[Any, str]] = {}
    for field, value in generation_config_defaults(model_path).items():
        if field == "max_tokens":
            value = min(int(value), max_tokens_cap)
        sources[field] = (value, "generation_config.json")
    if spec.default_sampling is not None:
        for field in SamplingDefaults.__struct_fields__:
            value = getattr(spec.default_sampling, field)
            if value is not None:
                sources[field] = (value, "config")
    try:
        merged = msgspec.convert({k: v for k, (v, _) in sources.items()}, SamplingDefaults)
    except msgspec.ValidationError as e:  # only the checkpoint's values can be out of range here
        logger.warning("%s: the checkpoint's sampling defaults are ignored: %s", spec.name, e)
        return spec.default_sampling or SamplingDefaults()
    described = ", ".join(f"{k}={v} ({source})" for k, (v, source) in sources.items())
    logger.info("%s: sampling defaults for requests that leave them unset: %s", spec.name,
                described or "none (the requests' own values, else temperature 1.0, no top-p or top-k)")
    return merged
