"""GGUF linears kept packed: each checkpoint tensor stays in llama.cpp's blocks ([rows, row bytes] uint8, its own
type: Q4_K_M files mix Q4_K and Q6_K within one layer's q/k/v) and `kernels.gguf_linear` dequantizes inside the
matmul (on the CPU, the layer's weight for that call only). F16 / F32 / BF16 tensors of such a file load as float.

With `gguf_dequantize: load` (`dequantize_at_load`) every packed weight, the embedding's too, is dequantized once
after loading and the model runs as a float one.

`engine.models.gguf.iter_gguf_tensors` yields packed tensors with a `gguf_type` attribute. The loader here takes
this rank's rows (or block-aligned input columns) of each merged part; after loading, consecutive parts of one type
are joined into one packed weight, so a layer whose parts share a type runs one matmul and the others one per run.
"""

from __future__ import annotations

from functools import partial
from typing import Any

import torch
from torch import nn

from engine import kernels
from engine.quantization.base import LinearMethod, add_param, replace_param
from engine.quantization.spec import QuantScheme
from engine.kernels.reference import GGUF_BLOCKS, dequantize_gguf


def gguf_type(tensor: torch.Tensor) -> int | None:
    """The GGUF block type of a packed tensor from `iter_gguf_tensors`; None for a float one."""
    return getattr(tensor, "gguf_type", None)


class GGUFLinearMethod(LinearMethod):
    def __init__(self, scheme: QuantScheme):
        self.scheme = scheme

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       output_slices: tuple[int, ...], params_dtype: torch.dtype) -> None:
        # A placeholder that names the checkpoint tensors; what they hold is only known as each one loads.
        param = add_param(layer, "weight", torch.empty(0, dtype=torch.uint8))
        param.weight_loader = partial(_load_part, layer)
        layer.output_parts, layer.loaded_parts = output_slices, {}

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        replace_param(layer, "weight", None)
        runs: list[tuple[int | None, list[torch.Tensor]]] = []
        for part in range(len(layer.output_parts)):
            qtype, tensor = layer.loaded_parts.pop(part)
            if runs and runs[-1][0] == qtype:
                runs[-1][1].append(tensor)
            else:
                runs.append((qtype, [tensor]))
        layer.run_types = tuple(qtype for qtype, _ in runs)
        layer.run_sizes = tuple(sum(t.shape[0] for t in tensors) for _, tensors in runs)
        for i, (_, tensors) in enumerate(runs):
            layer.register_buffer(f"qweight{i}", torch.cat(tensors) if len(tensors) > 1 else tensors[0])
        del layer.loaded_parts

    def fill_dummy(self, layer: nn.Module, generator: torch.Generator, std: float) -> None:
        """Q8_0 blocks of random int8 values, each block's scale giving weights of about `std`."""
        device = layer.weight.device
        blocks = layer.input_size // 32
        for part, size in enumerate(layer.output_parts):
            data = torch.randint(-64, 64, (size, blocks, 34), generator=generator, device=device,
                                 dtype=torch.int32).to(torch.int8).view(torch.uint8)
            data[..., 0:2] = torch.tensor([std * 3**0.5 / 64], dtype=torch.float16).view(torch.uint8).to(device)
            layer.loaded_parts[part] = (8, data.reshape(size, blocks * 34))

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if len(layer.run_types) == 1:
            return _matmul(layer.run_types[0], x, layer.qweight0, bias)
        biases = bias.split(layer.run_sizes) if bias is not None else [None] * len(layer.run_sizes)
        return torch.cat([_matmul(qtype, x, getattr(layer, f"qweight{i}"), b)
                          for i, (qtype, b) in enumerate(zip(layer.run_types, biases))], dim=-1)


def _matmul(qtype: int | None, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return kernels.linear(x, weight, bias) if qtype is None else kernels.gguf_linear(x, weight, qtype, bias)


def _load_part(layer: nn.Module, param: nn.Parameter, loaded: torch.Tensor, shard_id: Any = None) -> None:
    """Keeps this rank's share of one checkpoint tensor (packed or float) as merged part `shard_id`."""
    part, _, size, source = layer._part(shard_id)
    qtype = gguf_type(loaded)
    block, type_size = (1, 1) if qtype is None else GGUF_BLOCKS[qtype]  # inputs per `type_size` stored entries
    full_inputs = layer.input_size * (layer.tp_size if layer.shard_dim == 1 else 1)
    if loaded.dim() != 2 or loaded.shape[1] * block != full_inputs * type_size:
        raise ValueError(f"shape mismatch: checkpoint has {tuple(loaded.shape)} ({full_inputs} inputs expected)")
    if layer.shard_dim == 0:
        loaded = loaded.narrow(0, source * size, size)
    else:
        if layer.input_size % block:
            raise ValueError(f"this rank's {layer.input_size} inputs do not split the GGUF blocks of {block} values")
        width = layer.input_size // block * type_size
        loaded = loaded.narrow(1, layer.tp_rank * width, width)
    if loaded.shape[0] != size:
        raise ValueError(f"shape mismatch: checkpoint has {loaded.shape[0]} rows, parameter shard wants {size}")
    dtype = torch.uint8 if qtype is not None else layer.params_dtype
    layer.loaded_parts[part] = (qtype, loaded.to(param.device, dtype).contiguous())


def dequantize_at_load(model: nn.Module, dtype: torch.dtype) -> None:
    """Every packed GGUF weight of `model` replaced by its float weight in `dtype` (a tied head's shared Parameter
    once, so embedding and head stay one tensor)."""
    for module in model.modules():
        if isinstance(getattr(module, "quant_method", None), GGUFLinearMethod):
            for i, qtype in enumerate(module.run_types):
                if qtype is not None:
                    name = f"qweight{i}"
                    weight = dequantize_gguf(getattr(module, name), qtype).to(dtype)
                    packed = kernels.prepack_linear(weight)  # as a float checkpoint's linear is after loading
                    setattr(module, name, weight if packed is None else packed)
            module.run_types = (None,) * len(module.run_types)
        weight = getattr(module, "weight", None)
        if isinstance(weight, nn.Parameter) and gguf_type(weight) is not None:
            weight.data = dequantize_gguf(weight.data, weight.gguf_type).to(dtype)
            del weight.gguf_type
