"""LoRA adapters in the PEFT layout: read, checked against the base model, arranged for the GPU slots.

An adapter folder holds `adapter_config.json` and `adapter_model.safetensors`. Pickled weights
(`adapter_model.bin`) are refused, since unpickling runs arbitrary code, and nothing from the folder is ever
executed. The config's options must be plain LoRA; the rank, the target modules and every tensor's name, shape and
values are checked against the base model before anything is built, so a bad adapter raises a ValueError that says
what is wrong and leaves no trace.

The weights stay in host memory, one `LoraWeights` per linear of ours that the adapter targets, already in the slot
layout: a merged linear's parts (q/k/v, gate/up) side by side, zeros for parts the adapter leaves alone, and the
scale (lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA) folded into B. Shapes are checked against the full
base model; with tensor parallelism each rank then keeps its own shard (`lora_shard` of the base linear), with
pipeline stages the weights of its own stage's layers (the others' are checked against a twin, `remote`).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open

if TYPE_CHECKING:
    from engine.lora.layers import LoraLinear

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
_PICKLED_FILES = ("adapter_model.bin", "adapter_model.pt", "adapter_model.pth")
# PEFT's names: base_model.model.<module path>.lora_A.weight (and lora_B)
_TENSOR_NAME = re.compile(r"base_model\.model\.(?P<module>.+)\.lora_(?P<matrix>[AB])\.weight")
# PEFT options that change the forward pass beyond plain LoRA; an adapter may only leave them off.
_UNSUPPORTED_OPTIONS = ("use_dora", "modules_to_save", "rank_pattern", "alpha_pattern", "fan_in_fan_out", "lora_bias",
                        "layer_replication", "trainable_token_indices", "alora_invocation_tokens",
                        "target_parameters", "use_qalora", "use_bdlora")


@dataclass(frozen=True)
class LoraWeights:
    """One adapter's share of one of our linears (this rank's shard), on the host, in the model's dtype."""

    a: torch.Tensor  # [num_slices, rank, in_features]
    b: torch.Tensor  # [out_features, rank], scale folded in


@dataclass(frozen=True)
class LoraAdapter:
    name: str
    adapter_id: str  # unique per loaded version: requests carry it and the prefix cache hashes it
    path: str
    rank: int
    weights: dict[str, LoraWeights]  # our module name -> its weights, for the modules the adapter targets


def load_adapter(name: str, adapter_id: str, path: str, layers: Mapping[str, LoraLinear],
                 lora_modules: Mapping[str, tuple[str, ...]], max_rank: int, dtype: torch.dtype,
                 remote: Mapping[str, LoraLinear] | None = None) -> LoraAdapter:
    """Reads and checks the adapter at `path` for the wrapped linears `layers` (by module name); `lora_modules`
    maps each of our targetable linears to the HF projections it holds; `remote`: other pipeline stages' linears,
    each by a twin of the same shapes (checked, not kept)."""
    try:
        folder = Path(path)
        config = _read_config(folder)
        rank, scale = _rank_and_scale(config, max_rank)
        _check_target_modules(config, lora_modules)
        weights = _arrange(_read_tensors(folder), rank, scale, layers, lora_modules, dtype, remote or {})
    except ValueError as error:
        raise ValueError(f"LoRA adapter {name!r} at {path}: {error}") from error
    return LoraAdapter(name, adapter_id, str(path), rank, weights)


def _read_config(folder: Path) -> dict:
    if not folder.is_dir():
        raise ValueError("not a folder")
    file = folder / CONFIG_FILE
    if not file.is_file():
        raise ValueError(f"no {CONFIG_FILE}")
    try:
        config = json.loads(file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"cannot read {CONFIG_FILE}: {error}") from error
    if not isinstance(config, dict):
        raise ValueError(f"{CONFIG_FILE} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise ValueError(f"peft_type is {config['peft_type']!r}; only LORA adapters are supported")
    if config.get("bias", "none") != "none":
        raise ValueError(f"bias={config['bias']!r}: adapters that train biases are not supported")
    for option in _UNSUPPORTED_OPTIONS:
        if config.get(option):
            raise ValueError(f"{option}={config[option]!r} is not supported")
    return config


def _rank_and_scale(config: dict, max_rank: int) -> tuple[int, float]:
    rank, alpha = config.get("r"), config.get("lora_alpha")
    if not isinstance(rank, int) or isinstance(rank, bool) or rank < 1:
        raise ValueError(f"r must be a positive integer, got {rank!r}")
    if rank > max_rank:
        raise ValueError(f"rank {rank} is above this engine's max_lora_rank ({max_rank})")
    if not isinstance(alpha, (int, float)) or isinstance(alpha, bool):
        raise ValueError(f"lora_alpha must be a number, got {alpha!r}")
    return rank, alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)


def _check_target_modules(config: dict, lora_modules: Mapping[str, tuple[str, ...]]) -> None:
    # A string is a regular expression over module names; the tensors' names are checked one by one anyway.
    targets = config.get("target_modules")
    if not isinstance(targets, list):
        return
    supported = {hf for projections in lora_modules.values() for hf in projections}
    unknown = sorted({str(t) for t in targets if str(t).rpartition(".")[2] not in supported})
    if unknown:
        raise ValueError(f"unknown target module(s) {', '.join(unknown)}; LoRA applies to "
                         f"{', '.join(sorted(supported))}")


def _read_tensors(folder: Path) -> dict[str, torch.Tensor]:
    file = folder / WEIGHTS_FILE
    if not file.is_file():
        pickled = [name for name in _PICKLED_FILES if (folder / name).exists()]
        if pickled:
            raise ValueError(f"only pickled weights ({', '.join(pickled)}); kvbox reads {WEIGHTS_FILE} only, "
                             "because unpickling runs arbitrary code")
        raise ValueError(f"no {WEIGHTS_FILE}")
    try:
        with safe_open(file, framework="pt", device="cpu") as f:
            return {name: f.get_tensor(name) for name in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as error:
        raise ValueError(f"cannot read {WEIGHTS_FILE}: {error}") from error


def _arrange(tensors: dict[str, torch.Tensor], rank: int, scale: float, layers: Mapping[str, LoraLinear],
             lora_modules: Mapping[str, tuple[str, ...]], dtype: torch.dtype,
             remote: Mapping[str, LoraLinear]) -> dict[str, LoraWeights]:
    """Checks every tensor against the layer it targets, then builds each targeted layer's slot-layout weights
    (for the layers this rank holds)."""
    part_of = {hf: (ours, i) for ours, projections in lora_modules.items() for i, hf in enumerate(projections)}
    found: dict[tuple[str, int], dict[str, torch.Tensor]] = {}  # (our module, part) -> {"A": ..., "B": ...}
    projection_of: dict[tuple[str, int], str] = {}  # the same key -> the adapter's module path, for messages
    for tensor_name, tensor in tensors.items():
        match = _TENSOR_NAME.fullmatch(tensor_name)
        if match is None:
            raise ValueError(f"unexpected tensor {tensor_name!r}; expected base_model.model.<module>.lora_A.weight "
                             "and lora_B.weight pairs")
        parent, _, projection = match["module"].rpartition(".")
        if projection not in part_of:
            raise ValueError(f"tensor {tensor_name!r} targets {projection!r}; LoRA applies to "
                             f"{', '.join(sorted(part_of))}")
        ours, part = part_of[projection]
        module = f"{parent}.{ours}"
        target = layers[module] if module in layers else remote.get(module)
        if target is None:
            raise ValueError(f"tensor {tensor_name!r}: the base model has no module {match['module']!r}")
        base = target.base
        expected = (rank, base.full_input_size) if match["matrix"] == "A" else (base.full_output_slices[part], rank)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"tensor {tensor_name!r} has shape {list(tensor.shape)}; rank {rank} on this base "
                             f"model needs {list(expected)}")
        if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
            raise ValueError(f"tensor {tensor_name!r} must hold finite floating-point values")
        found.setdefault((module, part), {})[match["matrix"]] = tensor
        projection_of[(module, part)] = match["module"]
    if not found:
        raise ValueError("no LoRA tensors")
    for key, pair in found.items():
        if len(pair) != 2:
            have, missing = ("A", "B") if "A" in pair else ("B", "A")
            raise ValueError(f"{projection_of[key]} has lora_{have} but no lora_{missing}")

    weights = {}
    for module in sorted({module for module, _ in found if module in layers}):
        slices = layers[module].output_slices
        a = torch.zeros(len(slices), rank, layers[module].input_size, dtype=dtype)  # [num_slices, rank, in]
        b = torch.zeros(sum(slices), rank, dtype=dtype)  # [out_features, rank]
        start = 0
        for part, size in enumerate(slices):
            if (module, part) in found:
                pair = found[module, part]
                a[part], b_part = layers[module].base.lora_shard(part, pair["A"], pair["B"])
                b[start:start + size] = b_part.float() * scale
            start += size
        weights[module] = LoraWeights(a, b)
    return weights
