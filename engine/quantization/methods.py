"""The linear method that runs a `QuantScheme`, chosen once per model at load."""

from __future__ import annotations

from torch import nn

from engine.models.llama import _MERGED_SHARDS
from engine.quantization.context import UNQUANTIZED
from engine.quantization.awq import AWQLinearMethod
from engine.quantization.base import LinearMethod
from engine.quantization.compressed_tensors import PackQuantizedLinearMethod
from engine.quantization.gguf import GGUFLinearMethod
from engine.quantization.gptq import GPTQLinearMethod
from engine.quantization.spec import QuantScheme
from engine.quantization.w8a8 import W8A8LinearMethod

_METHODS = {
    "gptq": GPTQLinearMethod,
    "awq": AWQLinearMethod,
    "pack": PackQuantizedLinearMethod,
    "fp8": W8A8LinearMethod,
    "int8": W8A8LinearMethod,
    "gguf": GGUFLinearMethod,
}
# A merged linear's checkpoint modules: qkv_proj -> q_proj, k_proj, v_proj.
_HF_PARTS: dict[str, list[str]] = {}
for _hf, (_merged, _) in _MERGED_SHARDS.items():
    _HF_PARTS.setdefault(_merged, []).append(_hf)


def linear_method_for(scheme: QuantScheme | None) -> LinearMethod:
    return UNQUANTIZED if scheme is None else _METHODS[scheme.layout](scheme)


def keep_float_linears(model: nn.Module, scheme: QuantScheme | None) -> None:
    """Makes the linears the checkpoint left in float (`scheme.unquantized`) plain float ones, before loading. A
    merged linear (qkv_proj, gate_up_proj) runs one method, so its parts must agree."""
    if scheme is None or not scheme.unquantized:
        return
    for name, module in model.named_modules():
        if getattr(module, "quant_method", UNQUANTIZED) is UNQUANTIZED:
            continue
        prefix, _, leaf = name.rpartition(".")
        parts = [f"{prefix}.{part}" for part in _HF_PARTS.get(leaf, [leaf])]
        kept = [scheme.keeps_float(part) for part in parts]
        if not any(kept):
            continue
        if not all(kept):
            raise ValueError(f"{scheme.method}: the checkpoint leaves {', '.join(p for p, k in zip(parts, kept) if k)} "
                             f"in float but not {', '.join(p for p, k in zip(parts, kept) if not k)}, which kvbox "
                             f"runs as one linear ({name})")
        for param in [param for param, _ in module.named_parameters(recurse=False) if param != "bias"]:
            delattr(module, param)
        module.quant_method = UNQUANTIZED
        UNQUANTIZED.create_weights(module, module.input_size, module.output_size, module.output_slices,
                                   module.params_dtype)
