"""The plain float linear: one [output, input] weight in the model dtype, applied by `kernels.linear`."""

from __future__ import annotations

import torch
from torch import nn

from engine import kernels
from engine.quantization.base import LinearMethod, add_param


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       output_slices: tuple[int, ...], params_dtype: torch.dtype) -> None:
        add_param(layer, "weight", torch.empty(output_size, input_size, dtype=params_dtype), output_dim=0,
                  input_dim=1)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.linear(x, layer.weight, bias)
