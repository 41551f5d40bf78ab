"""The linear-method seam: how a linear layer creates, loads, post-processes and applies its weight.

A `LinearMethod` is chosen once per model at load (`engine.quantization.methods.linear_method_for`) and every
decoder linear (`engine.models.layers._ParallelLinear`: qkv, o, gate_up, down) delegates to it, in vLLM's shape:
`create_weights` registers the parameters the checkpoint fills, `process_weights_after_loading` turns them into the
layout `apply` runs, and `apply` is the forward. Parameters carry where their features lie (`output_dim`,
`input_dim`, possibly packed: the layer's loader scales offsets by the parameter's extent), or `per_part` (one entry
per merged projection, for per-tensor scales), so one weight_loader shards and merges every format.
"""

from __future__ import annotations

import torch
from torch import nn


class LinearMethod:
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       output_slices: tuple[int, ...], params_dtype: torch.dtype) -> None:
        """Registers the parameters of a linear of `input_size` x `output_size` (this rank's) on `layer`;
        `output_slices` are the merged parts' output sizes."""
        raise NotImplementedError

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        """Called once every checkpoint tensor is in place: repack, check, drop what the forward does not need."""

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x [num_tokens, input_size] -> [num_tokens, output_size] in x's dtype."""
        raise NotImplementedError

    def input_quant_dtype(self, layer: nn.Module) -> torch.dtype | None:
        """The 8-bit type in which `apply` also takes its input already quantized per token (symmetric), as an
        `engine.quantization.producer_quant.QuantizedActivation`; None: float input only."""
        return None

    def fill_dummy(self, layer: nn.Module, generator: torch.Generator, std: float) -> None:
        """`load_format: dummy`: fills the parameters `create_weights` made (not the bias) as a checkpoint of this
        format would, with weights of about `std`; `process_weights_after_loading` follows as after a real load."""
        raise NotImplementedError


def random_words(param: torch.Tensor, generator: torch.Generator) -> None:
    """Random int32 words: any bits are valid packed values."""
    words = torch.randint(-2**31, 2**31, param.shape, generator=generator, device=param.device, dtype=torch.int64)
    param.copy_(words.to(torch.int32))


def add_param(layer: nn.Module, name: str, data: torch.Tensor, *, output_dim: int | None = None,
              input_dim: int | None = None, per_part: bool = False) -> nn.Parameter:
    """Registers `data` as a frozen parameter loaded by the layer's weight_loader. `output_dim` / `input_dim`: the
    axis holding output / input features (at any packing: the loader scales by the axis' extent); `per_part`: the
    first axis has one entry per merged projection."""
    param = nn.Parameter(data, requires_grad=False)
    param.output_dim, param.input_dim, param.per_part = output_dim, input_dim, per_part
    param.weight_loader = layer.weight_loader
    layer.register_parameter(name, param)
    return param


def replace_param(layer: nn.Module, name: str, data: torch.Tensor | None) -> None:
    """Swaps a loaded parameter for its processed form (None: drops it), keeping it a frozen parameter so that
    `.to()` and `state_dict` see it."""
    delattr(layer, name)
    if data is not None:
        layer.register_parameter(name, nn.Parameter(data, requires_grad=False))


def part_bounds(output_slices: tuple[int, ...]) -> list[tuple[int, int]]:
    """(start, end) output features of each merged part."""
    bounds, start = [], 0
    for size in output_slices:
        bounds.append((start, start + size))
        start += size
    return bounds
