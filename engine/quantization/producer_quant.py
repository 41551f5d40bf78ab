"""Activations quantized by the op that produces them.

A W8A8 linear with dynamic symmetric per-token activations (online fp8, compressed-tensors or fp8 checkpoints without
static input scales) quantizes its input first: a launch of its own per linear, about 0.5 ms of a 3.7 ms Llama-3.1-8B
decode step on an H200 (bench/RESULTS.md, thirteenth session). The norm before q/k/v and gate/up and the gated
activation before down hold each row whole, so they can write it quantized instead (`kernels.rms_norm_quant`,
`silu_and_mul_quant`, ...), and the linear takes the 8-bit rows and their scales as they are. `arm` sets this up
after loading, producer by producer, where every linear that reads the producer's output takes such input; the
numbers are the same as quantizing in the linear (the references are that composition).

Not armed: LoRA wraps the linears and needs the float input; asymmetric int8 (a zero point per token) and static
activation scales keep the linear's own quantizer.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn


class QuantizedActivation(NamedTuple):
    q: torch.Tensor  # [num_tokens, features] float8_e4m3fn or int8
    scale: torch.Tensor  # [num_tokens, 1] float32
    dtype: torch.dtype  # what the producer would have written: the linear's output takes it


def arm(model: nn.Module) -> int:
    """Has each decoder layer's producers quantize their output for the linears that read it, where those take it
    (their method's `input_quant_dtype`); returns how many producers were armed."""
    from engine.models.layers import GatedMLP

    armed = 0
    for layer in getattr(getattr(model, "model", None), "stage_layers", ()):
        pairs = [(layer.get_submodule(norm), layer.get_submodule(linear))
                 for linear, norm in getattr(layer, "smoothing_norms", {}).items()]
        pairs += [(mlp, mlp.down_proj) for mlp in layer.modules() if isinstance(mlp, GatedMLP)]
        for producer, linear in pairs:
            dtype = _input_quant_dtype(linear)
            if dtype is not None:
                producer.quantize_output = dtype
                armed += 1
    return armed


def _input_quant_dtype(linear: nn.Module) -> torch.dtype | None:
    method = getattr(linear, "quant_method", None)  # a LoRA wrapper has none of its own: it needs float input
    return method.input_quant_dtype(linear) if method is not None else None
