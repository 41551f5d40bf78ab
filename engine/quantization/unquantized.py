"""The plain float linear: one [output, input] weight in the model dtype, applied by `kernels.linear`.

On the CPU a weight is reordered once, after loading (`kernels.cpu.prepack`): into panels of 16 output channels
for kvbox's own kernel (float32, and bf16 where the CPU has AVX512_BF16; results within float rounding of MKL's or
oneDNN's), else a bf16 one into oneDNN's blocked layout (torch's bf16 `F.linear` reorders the weight on every call,
which halves a decode step's weight bandwidth). The reordered weight replaces the plain one: no second copy.
"""

from __future__ import annotations

import torch
from torch import nn

from engine import kernels
from engine.quantization.base import LinearMethod, add_param, replace_param


class UnquantizedLinearMethod(LinearMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       output_slices: tuple[int, ...], params_dtype: torch.dtype) -> None:
        add_param(layer, "weight", torch.empty(output_size, input_size, dtype=params_dtype), output_dim=0,
                  input_dim=1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        packed = kernels.prepack_linear(layer.weight.data)
        if packed is not None:
            replace_param(layer, "weight", packed)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.linear(x, layer.weight, bias)
