"""GPTQ checkpoints as auto-gptq and gptqmodel write them (`checkpoint_format: gptq`): `qweight` [in / pack, out]
int32 packed along the input, `qzeros` [groups, out / pack] int32 stored minus one, fp16 `scales` [groups, out],
`g_idx` [in] (act-order when `desc_act`); 4 or 8 bits, symmetric or not. Loaded as stored, then put in the
canonical weight-only layout (`wna16.py`): only the zero points are unpacked (and get their one back).
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


class GPTQLinearMethod(WNA16LinearMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       output_slices: tuple[int, ...], params_dtype: torch.dtype) -> None:
        s = self.scheme
        pack = 32 // s.bits
        # A row-parallel rank holds a slice of the input rows. Plain groups split with them; act-order groups (any
        # row in any group) and a single group do not: the rank keeps every group's scales and zeros, as vLLM does.
        row_split = layer.shard_dim == 1 and layer.tp_size > 1
        split_groups = not row_split or (not s.act_order and s.group_size != -1)
        groups = num_groups(s, input_size if split_groups else input_size * layer.tp_size)
        group_dim = 0 if split_groups else None
        add_param(layer, "qweight", torch.empty(input_size // pack, output_size, dtype=torch.int32),
                  input_dim=0, output_dim=1)
        add_param(layer, "qzeros", torch.empty(groups, output_size // pack, dtype=torch.int32),
                  input_dim=group_dim, output_dim=1)
        add_param(layer, "scales", torch.empty(groups, output_size, dtype=torch.float16), input_dim=group_dim,
                  output_dim=1)
        g_idx = add_param(layer, "g_idx", torch.empty(len(output_slices), input_size, dtype=torch.int32),
                          per_part=True)
        first_group = layer.tp_rank * groups if row_split and split_groups else 0
        g_idx.weight_loader = partial(load_g_idx, layer, first_group)
        if not s.act_order:  # plain groups: older GPTQ checkpoints leave g_idx out
            g_idx.data.copy_(default_g_idx(input_size, s.group_size, g_idx.device).expand_as(g_idx))
            g_idx.optional = True

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        bits = self.scheme.bits
        check_shape(self.scheme, layer.input_size, layer.output_slices, out_pack=32 // bits)
        values = unpack_int32(layer.qweight.data, bits, dim=0)  # [in, out]
        # Stored minus one, and read back as the public kernels do: (stored + 1) without wrapping.
        zeros = unpack_int32(layer.qzeros.data, bits, dim=1) + 1  # [groups, out]
        g_idx = shared_g_idx(layer.g_idx.data, "gptq")
        if int(g_idx.min()) < 0 or int(g_idx.max()) >= zeros.shape[0]:
            raise ValueError(f"gptq: g_idx names groups outside [0, {zeros.shape[0]})")
        self.set_canonical(layer, values, layer.scales.data, zeros, g_idx)

