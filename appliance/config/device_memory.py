"""Whether the models that may be awake at once fit the GPU: the check `kvbox check-config` and the server's start
run on a config with two or more single-GPU models.

Each model's footprint is estimated without torch: its weights from its checkpoint's files (safetensors, .bin or GGUF
sizes; with dummy weights, the parameter count of its config.json at the configured dtype), plus its configured KV
cache (`kv_cache.memory_bytes`, or `num_blocks` blocks at the model's shape), plus `ENGINE_OVERHEAD_BYTES` for the
CUDA context, activations and CUDA graphs. A model that sizes its cache by `kv_cache.memory_fraction` claims that
share of the device. The largest `server.max_active_models` footprints (every model without a limit) must fit the
device's memory: `nvidia-smi`'s figure for GPU 0, or KVBOX_DEVICE_MEMORY_BYTES where set (tests, planning a config
for another machine). Models on the CPU, pinned to GPUs (`gpu_ids`) or spread over several, and Hub repos not yet
downloaded are left out (nothing local to measure, or no one device to compare with).
"""

from __future__ import annotations

import functools
import json
import os
import subprocess
from pathlib import Path

from appliance.config.error import ConfigError
from appliance.config.schema import AppConfig, ModelSpec

ENGINE_OVERHEAD_BYTES = 1 << 30
_DTYPE_BYTES = {"float32": 4, "float": 4, "float16": 2, "half": 2, "bfloat16": 2}
_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")


def device_memory_bytes() -> int | None:
    """GPU 0's memory, None where there is no GPU."""
    if os.environ.get("KVBOX_DEVICE_MEMORY_BYTES"):
        return int(os.environ["KVBOX_DEVICE_MEMORY_BYTES"])
    return _nvidia_smi_total()


@functools.cache
def _nvidia_smi_total() -> int | None:
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=memory.total", "--format=csv,noheader,nounits", "-i", "0"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.split()[0]) * 2**20
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


def check_device_memory(config: AppConfig, source: str) -> None:
    models = [m for m in config.models if m.device != "cpu" and m.gpu_ids is None and m.parallelism.num_gpus == 1]
    if len(models) < 2 or (total := device_memory_bytes()) is None:
        return
    footprints = {m.name: f for m in models if (f := model_footprint_bytes(m, total)) is not None}
    limit = config.server.max_active_models or len(footprints)
    largest = sorted(footprints.items(), key=lambda item: -item[1])[:limit]
    needed = sum(f for _, f in largest)
    if needed > total:
        shown = ", ".join(f"{name} {f / 2**30:.1f}" for name, f in largest)
        raise ConfigError(source, "server.max_active_models",
                          f"the {len(largest)} largest models that may be awake at once need {needed / 2**30:.1f} GiB "
                          f"({shown} GiB: weights, KV cache and {ENGINE_OVERHEAD_BYTES / 2**30:.0f} GiB each for "
                          f"the engine) but the GPU has {total / 2**30:.1f} GiB; lower max_active_models or the "
                          f"models' kv_cache.memory_bytes / num_blocks (memory_fraction claims that share of the GPU)")


def model_footprint_bytes(m: ModelSpec, device_bytes: int) -> int | None:
    """Weights + KV cache + the engine's allowance; None when the checkpoint is not local."""
    folder = Path(m.source)
    hf = _hf_config(folder)
    weights = _weight_file_bytes(folder)
    if weights == 0 and m.load_format == "dummy" and hf is not None:
        weights = _num_parameters(hf) * _dtype_bytes(m, hf)
    if weights == 0:
        return None
    kv = m.kv_cache
    if kv.memory_bytes is not None:
        return weights + kv.memory_bytes + ENGINE_OVERHEAD_BYTES
    if kv.num_blocks is not None and hf is not None:
        return weights + kv.num_blocks * kv.block_size * _kv_bytes_per_token(m, hf) + ENGINE_OVERHEAD_BYTES
    return int(kv.memory_fraction * device_bytes)


def _hf_config(folder: Path) -> dict | None:
    path = folder / "config.json"
    return json.loads(path.read_text()) if path.is_file() else None


def _weight_file_bytes(source: Path) -> int:
    if source.is_file():
        return source.stat().st_size
    if not source.is_dir():
        return 0
    sizes = {suffix: sum(p.stat().st_size for p in source.glob(f"*{suffix}")) for suffix in _WEIGHT_SUFFIXES}
    return next((size for size in sizes.values() if size), 0)  # safetensors first: a repo may carry both


def _dtype_bytes(m: ModelSpec, hf: dict) -> int:
    dtype = hf.get("torch_dtype", "float32") if m.dtype == "auto" else m.dtype
    return _DTYPE_BYTES.get(str(dtype), 2)


def _head_dim(hf: dict) -> int:
    return hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]


def _num_parameters(hf: dict) -> int:
    """A decoder's parameters from its shape (attention, gated MLP, norms, embeddings)."""
    h, layers = hf["hidden_size"], hf["num_hidden_layers"]
    q = hf["num_attention_heads"] * _head_dim(hf)
    kv = hf.get("num_key_value_heads", hf["num_attention_heads"]) * _head_dim(hf)
    per_layer = h * (q + 2 * kv) + q * h + 3 * h * hf["intermediate_size"] + 2 * h
    embeddings = hf["vocab_size"] * h * (1 if hf.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + h


def _kv_bytes_per_token(m: ModelSpec, hf: dict) -> int:
    kv_heads = hf.get("num_key_value_heads", hf["num_attention_heads"])
    return 2 * hf["num_hidden_layers"] * kv_heads * _head_dim(hf) * _dtype_bytes(m, hf)
