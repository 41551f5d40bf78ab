"""Quantized copies of a float Hugging Face checkpoint, written the way the public tools write them, for tests and
benchmarks: GPTQ (auto-gptq's classic format), AWQ (AutoAWQ GEMM), compressed-tensors (llm-compressor's own
library packs and writes the config) and vLLM-style fp8.

Weights are quantized by round-to-nearest (the algorithms' layouts, not their calibration). Each writer returns the
dequantized float32 weights the checkpoint stands for, under HF names, which `write_float` turns into the reference
folder that transformers runs. The packing here is written independently of `engine.quantization`'s unpacking.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

LINEARS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)


def _is_linear(name: str) -> bool:
    return name.endswith(".weight") and name.split(".")[-2] in LINEARS


def _pack(values: np.ndarray, bits: int, axis: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """uint values -> int32 words along `axis`, value j of a word at bits [bits * j, bits * (j + 1)); with `order`,
    the j-th value of a word is element order[j] of its run (AWQ)."""
    per_word = 32 // bits
    v = np.moveaxis(values.astype(np.uint32), axis, -1)
    v = v.reshape(*v.shape[:-1], -1, per_word)
    if order is not None:
        v = v[..., list(order)]
    words = np.zeros(v.shape[:-1], dtype=np.uint32)
    for j in range(per_word):
        words |= (v[..., j] & ((1 << bits) - 1)) << np.uint32(bits * j)
    return torch.from_numpy(np.ascontiguousarray(np.moveaxis(words.view(np.int32), -1, axis)))


def _group_qparams(w: torch.Tensor, g_idx: torch.Tensor, groups: int, bits: int, sym: bool):
    """auto-gptq's min-max quantizer per (output row, group): float16 scales [groups, out], int zeros [groups, out]."""
    maxq = 2 ** bits - 1
    scales, zeros = [], []
    for g in range(groups):
        wg = w[:, g_idx == g]
        xmin, xmax = wg.min(dim=1).values.clamp(max=0), wg.max(dim=1).values.clamp(min=0)
        if sym:
            xmax = torch.maximum(xmin.abs(), xmax)
            xmin = -xmax
        scale = ((xmax - xmin) / maxq).clamp(min=1e-8).half()
        zero = torch.full_like(xmax, (maxq + 1) // 2) if sym else torch.round(-xmin / scale.float())
        scales.append(scale)
        zeros.append(zero.clamp(1, maxq))  # zero 0 would be stored as -1, which GPTQ's format cannot read back
    return torch.stack(scales), torch.stack(zeros).to(torch.int64)


def gptq_tensors(w: torch.Tensor, bits: int, group_size: int, sym: bool, desc_act: bool, seed: int = 0):
    """(tensors auto-gptq saves for one linear, the float32 weight they stand for)."""
    out_features, in_features = w.shape
    group = in_features if group_size == -1 else group_size
    g_idx = torch.arange(in_features) // group
    if desc_act:  # act-order: rows are quantized in a permuted order, the groups follow it, storage does not
        perm = torch.randperm(in_features, generator=torch.Generator().manual_seed(seed))
        g_idx = torch.empty_like(g_idx)
        g_idx[perm] = torch.arange(in_features) // group
    scales, zeros = _group_qparams(w, g_idx, in_features // group, bits, sym)
    s, z = scales.float()[g_idx].T, zeros[g_idx].T  # [out, in]
    q = torch.clamp(torch.round(w / s) + z, 0, 2 ** bits - 1).to(torch.int64)
    tensors = {
        "qweight": _pack(q.T.numpy(), bits, axis=0),
        "qzeros": _pack((zeros - 1).numpy(), bits, axis=1),
        "scales": scales,
        "g_idx": g_idx.to(torch.int32),
    }
    return tensors, (q - z).float() * s


def awq_tensors(w: torch.Tensor, group_size: int):
    """(tensors AutoAWQ's GEMM layout saves for one linear, the float32 weight they stand for)."""
    in_features = w.shape[1]
    g_idx = torch.arange(in_features) // group_size
    maxq = 15
    scales, zeros = [], []
    for g in range(in_features // group_size):
        wg = w[:, g_idx == g]
        lo, hi = wg.min(dim=1).values, wg.max(dim=1).values
        scale = ((hi - lo).clamp(min=1e-5) / maxq).half()
        scales.append(scale)
        zeros.append(torch.clamp(-torch.round(lo / scale.float()), 0, maxq))
    scales, zeros = torch.stack(scales), torch.stack(zeros).to(torch.int64)
    s, z = scales.float()[g_idx].T, zeros[g_idx].T
    q = torch.clamp(torch.round(w / s) + z, 0, maxq).to(torch.int64)
    tensors = {"qweight": _pack(q.T.numpy(), 4, axis=1, order=AWQ_ORDER),
               "qzeros": _pack(zeros.numpy(), 4, axis=1, order=AWQ_ORDER), "scales": scales}
    return tensors, (q - z).float() * s


def fp8_tensors(w: torch.Tensor, per_channel: bool, input_scale: float | None):
    """(vLLM fp8 tensors: e4m3 weight, float32 weight_scale per tensor [] or channel [out, 1], optional input_scale)."""
    amax = w.abs().amax(dim=1, keepdim=True) if per_channel else w.abs().max()
    scale = (amax / 448.0).float()
    weight = (w / scale).clamp(-448, 448).to(torch.float8_e4m3fn)
    tensors = {"weight": weight, "weight_scale": scale}
    if input_scale is not None:
        tensors["input_scale"] = torch.tensor(input_scale, dtype=torch.float32)
    return tensors, weight.float() * scale


def write_quantized(folder: str | Path, out: str | Path, quantization_config: dict[str, Any], layer_tensors,
                    keep_float: tuple[str, ...] = ()) -> dict:
    """Copies `folder` to `out` with every decoder linear's weight replaced by `layer_tensors(weight)` -> (tensors,
    dequantized) and `quantization_config` in config.json; returns the dequantized float32 state dict. Linears whose
    module name ends with an entry of `keep_float` stay as they were (a checkpoint's ignore list)."""
    folder, out = Path(folder), Path(out)
    shutil.copytree(folder, out, dirs_exist_ok=True)
    weights = load_file(folder / "model.safetensors")
    saved, dequantized = {}, {}
    for name, tensor in weights.items():
        if _is_linear(name) and not name[:-len(".weight")].endswith(keep_float):
            tensors, dequantized[name] = layer_tensors(tensor.float())
            saved.update({f"{name[:-len('weight')]}{key}": value.contiguous() for key, value in tensors.items()})
        else:
            saved[name] = dequantized[name] = tensor
    (out / "model.safetensors").unlink()
    save_file(saved, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config["quantization_config"] = quantization_config
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return dequantized


def write_float(folder: str | Path, out: str | Path, tensors: dict[str, torch.Tensor]) -> Path:
    """A float32 copy of `folder` holding `tensors` (a quantized checkpoint's dequantized weights)."""
    out = Path(out)
    shutil.copytree(folder, out, dirs_exist_ok=True)
    save_file({name: t.float().contiguous() for name, t in tensors.items()}, out / "model.safetensors",
              metadata={"format": "pt"})
    config = json.loads((out / "config.json").read_text())
    config.pop("quantization_config", None)
    config["torch_dtype"] = config["dtype"] = "float32"
    (out / "config.json").write_text(json.dumps(config, indent=2))
    return out


def gptq_config(bits: int, group_size: int, sym: bool, desc_act: bool) -> dict[str, Any]:
    """config.json's quantization_config as auto-gptq 0.7 saves it."""
    return {"bits": bits, "group_size": group_size, "damp_percent": 0.01, "desc_act": desc_act,
            "static_groups": False, "sym": sym, "true_sequential": True, "model_name_or_path": None,
            "model_file_base_name": None, "quant_method": "gptq", "checkpoint_format": "gptq"}


def awq_config(group_size: int) -> dict[str, Any]:
    """As AutoAWQ saves it."""
    return {"quant_method": "awq", "zero_point": True, "group_size": group_size, "bits": 4, "version": "gemm",
            "modules_to_not_convert": None}


def fp8_config(static: bool) -> dict[str, Any]:
    return {"quant_method": "fp8", "activation_scheme": "static" if static else "dynamic"}
