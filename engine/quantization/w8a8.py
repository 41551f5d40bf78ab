"""8-bit weights, float8 e4m3 or int8, with their activations quantized to the same type (W8A8) or not (FP8 weight-
only): pre-quantized checkpoints (vLLM's `fp8`: `weight` + per-tensor `weight_scale` or block `weight_scale_inv`,
optional static `input_scale`; compressed-tensors float-quantized / int-quantized: per-tensor or per-channel
`weight_scale`, or FP8_BLOCK's per-block one, int8 activations symmetric or not: static `input_zero_point`, or a zero
point per token) and online quantization of a float checkpoint at load (`quantization: fp8 | int8`:
per-output-channel weight scales, dynamic per-token activations, int8's asymmetric; a few input channels may stay in
float beside them, `outliers`). Block-scaled weights run weight-only (`spec._block_size` says why).

After loading every form is one layout: `weight` [out, in] 8-bit, `weight_scale` float32 per output channel [out]
(per-tensor scales of merged parts become per-channel, exactly) or per block, and `input_scale` (static, one for
the merged layer: the parts' largest, as vLLM does) or none (dynamic), and for asymmetric int8 activations
`input_zero_point` (static, merged likewise) and `azp_adj`. `kernels.w8a8_linear` runs it (the float32 emulation on
CPU, cuBLAS on CUDA).
"""

from __future__ import annotations

import torch
from torch import nn

from engine.quantization.base import LinearMethod, add_param, replace_param
from engine.quantization.producer_quant import QuantizedActivation
from engine.quantization.spec import QuantScheme
from engine import kernels
from engine.kernels import reference

_DTYPES = {"fp8": torch.float8_e4m3fn, "int8": torch.int8}


class W8A8LinearMethod(LinearMethod):
    def __init__(self, scheme: QuantScheme):
        self.scheme = scheme
        self.dtype = _DTYPES[scheme.layout]

    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       output_slices: tuple[int, ...], params_dtype: torch.dtype) -> None:
        s = self.scheme
        weight_dtype = params_dtype if s.online else self.dtype
        add_param(layer, "weight", torch.empty(output_size, input_size, dtype=weight_dtype), output_dim=0,
                  input_dim=1)
        layer.output_parts = output_slices
        if s.online:  # `outliers` may set the input channels kept in float before processing
            layer.register_buffer("outlier_index", None)
            return
        if s.weight_strategy == "tensor":
            add_param(layer, "weight_scale", torch.empty(len(output_slices), dtype=torch.float32), per_part=True)
        elif s.weight_strategy == "channel":
            add_param(layer, "weight_scale", torch.empty(output_size, 1, dtype=torch.float32), output_dim=0)
        else:  # the last block row and column may be cut short (float32 holds a bfloat16 scale exactly)
            rows, cols = s.block_size
            add_param(layer, _block_scale_name(s), torch.empty(-(-output_size // rows), -(-input_size // cols),
                                                               dtype=torch.float32), output_dim=0, input_dim=1)
        if s.activations == "tensor":
            add_param(layer, "input_scale", torch.empty(len(output_slices), dtype=torch.float32), per_part=True)
            if not s.input_symmetric:  # int8 in the checkpoint; float32 holds it exactly
                add_param(layer, "input_zero_point", torch.empty(len(output_slices), dtype=torch.float32),
                          per_part=True)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        s = self.scheme
        outlier_weight = None
        if s.online:
            weight = layer.weight.data
            if layer.outlier_index is not None:
                outlier_weight = weight[:, layer.outlier_index].contiguous()
                weight = weight.index_fill(1, layer.outlier_index, 0.0)
            weight, scale = _quantize_per_channel(weight, self.dtype)
            replace_param(layer, "weight", weight)
        elif s.weight_strategy == "tensor":
            scale = torch.repeat_interleave(layer.weight_scale.data,
                                            torch.tensor(layer.output_parts, device=layer.weight.device))
        elif s.weight_strategy == "channel":
            scale = layer.weight_scale.data[:, 0]
        else:
            _check_blocks(layer, s)
            scale = getattr(layer, _block_scale_name(s)).data
        for name in ("weight_scale", "weight_scale_inv"):
            if hasattr(layer, name):
                replace_param(layer, name, None)
        layer.register_buffer("weight_scale", scale.float().contiguous())
        layer.register_buffer("outlier_weight", outlier_weight)  # [out, kept] float, beside `outlier_index`
        input_scale, input_zero_point = _static_input(layer) if s.activations == "tensor" else (None, None)
        layer.register_buffer("input_scale", input_scale)
        layer.register_buffer("input_zero_point", input_zero_point)
        # Asymmetric activations: each output channel's int8 weight summed over K, the zero point's share of the GEMM.
        azp_adj = None if s.input_symmetric else layer.weight.data.sum(dim=1, dtype=torch.int32)
        layer.register_buffer("azp_adj", azp_adj)

    def fill_dummy(self, layer: nn.Module, generator: torch.Generator, std: float) -> None:
        weight = layer.weight.data
        if self.scheme.online:  # a float checkpoint, quantized after loading like a real one
            weight.normal_(0.0, std, generator=generator)
            return
        top = reference.FP8_MAX if self.dtype == torch.float8_e4m3fn else reference.INT8_MAX
        for rows in torch.split(weight, 4096):  # bounded float copies
            values = torch.randn(rows.shape, generator=generator, device=weight.device).mul_(top / 4).clamp_(-top, top)
            rows.copy_(values if self.dtype == torch.float8_e4m3fn else values.round())
        for name in ("weight_scale", "weight_scale_inv"):
            if hasattr(layer, name):
                getattr(layer, name).data.fill_(std / (top / 4))
        if hasattr(layer, "input_scale"):  # activations of about unit size, their extremes near the type's top
            layer.input_scale.data.fill_(8.0 / top)
        if hasattr(layer, "input_zero_point"):
            layer.input_zero_point.data.zero_()

    def input_quant_dtype(self, layer: nn.Module) -> torch.dtype | None:
        # Dynamic symmetric per-token activations (per-channel weight scales): what `kernels.w8a8_gemm` takes; not
        # with outlier channels, whose float part needs the float input.
        s = self.scheme
        takes = s.activations == "token" and s.input_symmetric and layer.outlier_weight is None
        return self.dtype if takes else None

    def apply(self, layer: nn.Module, x: torch.Tensor | QuantizedActivation,
              bias: torch.Tensor | None) -> torch.Tensor:
        if isinstance(x, QuantizedActivation):
            return kernels.w8a8_gemm(x.q, x.scale, layer.weight, layer.weight_scale, bias, x.dtype)
        y = kernels.w8a8_linear(x, layer.weight, layer.weight_scale, layer.input_scale, bias,
                                quantize_input=self.scheme.activations is not None, azp_adj=layer.azp_adj,
                                input_zero_point=layer.input_zero_point, block_size=self.scheme.block_size)
        if layer.outlier_weight is not None:  # the input channels kept in float (`outliers`)
            y = y.addmm_(x.index_select(-1, layer.outlier_index), layer.outlier_weight.t())
        return y


def _block_scale_name(scheme: QuantScheme) -> str:
    """vLLM's fp8 checkpoints name block scales weight_scale_inv (DeepSeek's name; multiplied all the same),
    compressed-tensors weight_scale."""
    return "weight_scale_inv" if scheme.method == "fp8" else "weight_scale"


def _check_blocks(layer: nn.Module, scheme: QuantScheme) -> None:
    """A block cut short must end a checkpoint tensor: no merged part (the next one's scales begin a block) nor a
    tensor-parallel shard (the next rank's do) may end inside one. Checked here, not when built: a linear the
    checkpoint leaves in float is no longer this method's."""
    rows, cols = scheme.block_size
    parts = layer.output_parts
    whole_parts = len(parts) > 1 or (layer.tp_size > 1 and layer.shard_dim == 0)
    whole_inputs = layer.tp_size > 1 and layer.shard_dim == 1
    if (whole_parts and any(size % rows for size in parts)) or (whole_inputs and layer.input_size % cols):
        raise ValueError(f"{scheme.method}: block size {list(scheme.block_size)} does not divide a linear of "
                         f"{layer.input_size} inputs and outputs {list(parts)} into the whole blocks its merged parts "
                         "or tensor-parallel shards need")


def _static_input(layer: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The merged layer's one static activation scale and zero point (None: symmetric), from the checkpoint's per-part
    parameters, which it drops. Symmetric: the parts' largest scale, as vLLM does."""
    scales = layer.input_scale.data
    replace_param(layer, "input_scale", None)
    if not hasattr(layer, "input_zero_point"):
        return scales.max(), None
    zero_points = layer.input_zero_point.data
    replace_param(layer, "input_zero_point", None)
    return _merge_asymmetric(scales, zero_points)


def _merge_asymmetric(scales: torch.Tensor, zero_points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The merged parts' static (scale, zero point) pairs -> one pair whose int8 range covers every part's range
    s * ([-128, 127] - z) (as vLLM merges them): no part's activations clamp where they did not before."""
    low = (scales * (reference.INT8_MIN - zero_points)).min()
    high = (scales * (reference.INT8_MAX - zero_points)).max()
    scale = (high - low) / (reference.INT8_MAX - reference.INT8_MIN)
    return scale, (reference.INT8_MIN - low / scale).round().to(torch.int32)


def _quantize_per_channel(weight: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """A float weight [out, in] -> (8-bit weight, float32 scale [out]): each row's largest magnitude maps to the
    type's largest value (symmetric, round to nearest)."""
    quantized, scale = reference.quantize_activations(weight, dtype)  # row-wise is what per-token does
    return quantized, scale[:, 0]
