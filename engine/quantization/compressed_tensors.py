"""compressed-tensors checkpoints (what llm-compressor writes): `pack-quantized` W4A16 / W8A16 runs here; the
8-bit formats (`float-quantized` FP8, `int-quantized` INT8 W8A8) use the same tensor names as vLLM's fp8 checkpoints
and run in `w8a8.py`.

pack-quantized stores per linear `weight_packed` [out, in * bits / 32] int32, values offset by 2^(bits-1) and packed
along the input low bits first, `weight_scale` [out, groups], `weight_shape` [2] (the unpacked shape), and when
asymmetric `weight_zero_point` [out * bits / 32, groups] packed along the output; with act-order groups also
`weight_g_idx` [in]. Converted at load into the canonical weight-only layout (`wna16.py`). Under row-parallel tensor
parallelism an act-order rank keeps every group and its rows of weight_g_idx, as GPTQ's does.
"""

from __future__ import annotations

from functools import partial

import torch
from torch import nn

from engine.quantization.base import add_param
from engine.quantization.wna16 import (
    WNA16LinearMethod,
    check_shape,
    default_g_idx,
    load_g_idx,
    num_groups,
    shared_g_idx,
    unpack_int32,
)


class PackQuantizedLinearMethod(WNA16LinearMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       output_slices: tuple[int, ...], params_dtype: torch.dtype) -> None:
        s = self.scheme
        pack = 32 // s.bits
        # As GPTQ's: act-order groups take any input row, so a row-parallel rank keeps every group's scales and
        # zero points (and a single group per row is every rank's whole).
        split_groups = not (s.act_order and layer.shard_dim == 1 and layer.tp_size > 1)
        groups = num_groups(s, input_size if split_groups else input_size * layer.tp_size)
        group_dim = 1 if s.group_size != -1 and split_groups else None
        add_param(layer, "weight_packed", torch.empty(output_size, input_size // pack, dtype=torch.int32),
                  output_dim=0, input_dim=1)
        # Stored in the model's dtype (often bfloat16): float32 holds any of them exactly.
        add_param(layer, "weight_scale", torch.empty(output_size, groups, dtype=torch.float32), output_dim=0,
                  input_dim=group_dim)
        add_param(layer, "weight_shape", torch.empty(len(output_slices), 2, dtype=torch.int64), per_part=True)
        # The checkpoint's whole shapes, of which this rank holds a slice.
        column_split, row_split = (layer.tp_size, 1) if layer.shard_dim == 0 else (1, layer.tp_size)
        layer.whole_shapes = [(size * column_split, input_size * row_split) for size in output_slices]
        if not s.symmetric:
            add_param(layer, "weight_zero_point", torch.empty(output_size // pack, groups, dtype=torch.int32),
                      output_dim=0, input_dim=group_dim)
        if s.act_order:
            g_idx = add_param(layer, "weight_g_idx", torch.empty(len(output_slices), input_size, dtype=torch.int32),
                              per_part=True)
            g_idx.weight_loader = partial(load_g_idx, layer, 0)  # act-order groups are numbered over the whole

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        s = self.scheme
        check_shape(s, layer.input_size, layer.output_slices, out_pack=1 if s.symmetric else 32 // s.bits)
        shapes = [tuple(shape) for shape in layer.weight_shape.data.tolist()]
        want = layer.whole_shapes
        if shapes != want:
            raise ValueError(f"compressed-tensors: weight_shape {shapes} does not match the layer's {want}")
        values = unpack_int32(layer.weight_packed.data, s.bits, dim=1).T  # [in, out]
        offset = 1 << (s.bits - 1)  # signed values were stored plus this
        if s.symmetric:
            zeros = torch.full_like(layer.weight_scale.data, offset, dtype=torch.int32)
        else:  # the signed zero points were stored plus the same offset, so they are the unsigned zeros already
            zeros = unpack_int32(layer.weight_zero_point.data, s.bits, dim=0)
        g_idx = (shared_g_idx(layer.weight_g_idx.data, "compressed-tensors") if s.act_order
                 else default_g_idx(values.shape[0], s.group_size, values.device))
        self.set_canonical(layer, values, layer.weight_scale.data.T, zeros.T, g_idx)
