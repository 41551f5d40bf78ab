"""What every weight-only integer format (GPTQ, AWQ, compressed-tensors pack-quantized) turns into after loading:
one canonical layout, so that one reference (`kernels.reference.wna16_linear`) and one GPU kernel serve them all.

Canonical: `qweight` [in / pack, out] int32 with input rows packed low bits first (GPTQ's layout), unsigned values;
`scales` [groups, out]; `zeros` [groups, out] int16, unsigned; `g_idx` [in] int32 (act-order, or row // group).
Each format's method loads its own tensors and calls `set_canonical`.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from engine.quantization.base import LinearMethod, random_words, replace_param
from engine.quantization.spec import QuantScheme
from engine import kernels


def unpack_int32(packed: torch.Tensor, bits: int, dim: int, order: tuple[int, ...] | None = None) -> torch.Tensor:
    """The unsigned values packed low bits first into the int32s of `packed` along `dim`, as int32; `order[j]`
    is the position of the j-th packed value among each word's values (AWQ interleaves them)."""
    shifts = torch.arange(0, 32, bits, dtype=torch.int32, device=packed.device)
    values = (packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)  # [..., per_word]: j-th packed value last
    if order is not None:
        values = values[..., torch.argsort(torch.tensor(order))]
    values = values.movedim(dim, -2).flatten(-2)  # this word's values next to each other along dim
    return values.movedim(-1, dim)


def pack_rows(values: torch.Tensor, bits: int) -> torch.Tensor:
    """[in, out] unsigned values -> [in / pack, out] int32, low bits first (the canonical qweight)."""
    per_word = 32 // bits
    rows = values.to(torch.int64).reshape(-1, per_word, values.shape[1])
    shifts = torch.arange(0, 32, bits, dtype=torch.int64, device=values.device)[None, :, None]
    words = (rows << shifts).sum(dim=1)  # each value in its own bits, so the sum is an or
    return torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)


def default_g_idx(input_size: int, group_size: int, device: torch.device) -> torch.Tensor:
    group = input_size if group_size == -1 else group_size
    return (torch.arange(input_size, dtype=torch.int32, device=device) // group).to(torch.int32)


def num_groups(scheme: QuantScheme, input_size: int) -> int:
    return 1 if scheme.group_size == -1 else input_size // scheme.group_size


def check_shape(scheme: QuantScheme, input_size: int, output_slices: tuple[int, ...], out_pack: int = 1) -> None:
    """Groups and packing must divide this rank's share of the layer. Checked after loading, not when the layer is
    built: only then is a linear the checkpoint leaves in float (`keep_float_linears`) no longer this method's."""
    pack = 32 // scheme.bits
    if input_size % pack or (scheme.group_size != -1 and input_size % scheme.group_size):
        raise ValueError(f"{scheme.method}: a linear's input size {input_size} is not a multiple of the "
                         f"group size {scheme.group_size} and of {pack} values per int32")
    if any(size % out_pack for size in output_slices):
        raise ValueError(f"{scheme.method}: output sizes {list(output_slices)} are not multiples of {out_pack} "
                         "values per int32")


class WNA16LinearMethod(LinearMethod):
    """Shared by the weight-only formats: the canonical layout and its apply."""

    def __init__(self, scheme: QuantScheme):
        self.scheme = scheme

    def set_canonical(self, layer: nn.Module, values: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                      g_idx: torch.Tensor) -> None:
        """values [in, out] unsigned ints, scales / zeros [groups, out], g_idx [in]: the layer's runtime weights."""
        for name in [name for name, _ in layer.named_parameters(recurse=False) if name != "bias"]:
            replace_param(layer, name, None)
        layer.register_buffer("qweight", pack_rows(values, self.scheme.bits))
        layer.register_buffer("scales", scales.contiguous())
        layer.register_buffer("zeros", zeros.to(torch.int16).contiguous())
        layer.register_buffer("g_idx", g_idx.to(torch.int32).contiguous())
        # Without act-order the groups are contiguous rows, which the GPU kernel reads a tile at a time.
        plain = torch.equal(layer.g_idx, default_g_idx(values.shape[0], self.scheme.group_size, values.device))
        layer.contiguous_group_size = self.scheme.group_size if plain else 0

    def fill_dummy(self, layer: nn.Module, generator: torch.Generator, std: float) -> None:
        # Random values and zero points: q - zero then spreads about 2^bits / sqrt(6).
        scale = std * 6**0.5 / (1 << self.scheme.bits)
        for name, param in layer.named_parameters(recurse=False):
            if "g_idx" in name:  # plain groups (act-order permutes rows; the kernel reads them a tile at a time)
                param.data.copy_(default_g_idx(layer.input_size, self.scheme.group_size, param.device))
            elif name == "weight_shape":  # compressed-tensors: each part's unpacked shape
                param.data.copy_(torch.tensor(layer.whole_shapes))
            elif param.dtype == torch.int32:
                random_words(param.data, generator)
            elif name != "bias":
                param.data.uniform_(0.5 * scale, 1.5 * scale, generator=generator)

    def apply(self, layer: nn.Module, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return kernels.wna16_linear(x, layer.qweight, layer.scales, layer.zeros, layer.g_idx, self.scheme.bits, bias,
                                    layer.contiguous_group_size)


def load_g_idx(layer: nn.Module, first_group: int, param: nn.Parameter, loaded: torch.Tensor,
               shard_id: Any = None) -> None:
    """This rank's rows of the checkpoint's g_idx [in] as merged part `shard_id`; where the groups split with the
    rows, numbered from this rank's first group."""
    part = layer._part(shard_id)[0]
    if layer.shard_dim == 1:
        loaded = loaded.narrow(0, layer.tp_rank * layer.input_size, layer.input_size)
    param.data[part].copy_(loaded - first_group)


def shared_g_idx(g_idx: torch.Tensor, method: str) -> torch.Tensor:
    """One g_idx for a merged layer. Act-order sorts by the input's Hessian, which q/k/v (and gate/up) share, so
    the checkpoint's copies agree; a checkpoint where they differ cannot share one packed weight."""
    if not bool((g_idx == g_idx[:1]).all()):
        raise ValueError(f"{method}: the merged projections of one layer have different g_idx (act-order)")
    return g_idx[0]
