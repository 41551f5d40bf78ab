"""AWQ checkpoints as AutoAWQ writes them (GEMM version): `qweight` [in, out / 8] int32 packed along the output in
the interleaved nibble order [0, 2, 4, 6, 1, 3, 5, 7], `qzeros` [groups, out / 8] in the same order (not minus one),
fp16 `scales` [groups, out]; 4 bits with zero points. Repacked at load into the canonical weight-only layout
(`wna16.py`), which packs along the input instead.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.quantization.base import add_param
from engine.quantization.wna16 import WNA16LinearMethod, check_shape, default_g_idx, num_groups, unpack_int32

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # the j-th nibble of a word holds output column 8 * word + AWQ_ORDER[j]
_PACK = 8


class AWQLinearMethod(WNA16LinearMethod):
    def create_weights(self, layer: nn.Module, input_size: int, output_size: int,
                       output_slices: tuple[int, ...], params_dtype: torch.dtype) -> None:
        groups = num_groups(self.scheme, input_size)
        add_param(layer, "qweight", torch.empty(input_size, output_size // _PACK, dtype=torch.int32),
                  input_dim=0, output_dim=1)
        add_param(layer, "qzeros", torch.empty(groups, output_size // _PACK, dtype=torch.int32),
                  input_dim=0, output_dim=1)
        add_param(layer, "scales", torch.empty(groups, output_size, dtype=torch.float16), input_dim=0, output_dim=1)

    def process_weights_after_loading(self, layer: nn.Module) -> None:
        check_shape(self.scheme, layer.input_size, layer.output_slices, out_pack=_PACK)
        values = unpack_int32(layer.qweight.data, 4, dim=1, order=AWQ_ORDER)  # [in, out]
        zeros = unpack_int32(layer.qzeros.data, 4, dim=1, order=AWQ_ORDER)  # [groups, out]
        g_idx = default_g_idx(values.shape[0], self.scheme.group_size, values.device)
        self.set_canonical(layer, values, layer.scales.data, zeros, g_idx)
