"""LoRA-aware linears: a wrapper that adds every token's adapter to a base linear's output, and the function that
puts it around the model's targetable linears.

Only a model served with LoRA is wrapped, so the forward of one without it has no extra op. The wrapper owns the
GPU slots of its layer: `lora_a` and `lora_b` hold `max_loras` adapters, allocated once at the largest rank, and
loading an adapter copies into a slot. With tensor parallelism they hold this rank's share, cut as the base weight
is (`lora_shard` of the base linear). Which slot each token uses comes from the runner's persistent per-token
buffer, which all wrappers share.

With pipeline stages a rank wraps its own stage's layers only; an adapter's tensors for the other stages' layers are
checked against their twin here (the same linear of a layer this stage holds: a family's decoder layers all have
the same shapes) and left to the stage that holds them.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from engine import kernels
from engine.lora.adapter import LoraWeights


class LoraLinear(nn.Module):
    def __init__(self, base: nn.Module, max_loras: int, max_rank: int, token_slots: torch.Tensor):
        super().__init__()
        self.base = base
        self.output_slices = base.output_slices
        self.max_rank = max_rank
        self.token_slots = token_slots  # [max_num_batched_tokens] int32, the runner fills a prefix each step
        # In the model dtype, whatever the base stores (a quantized base has no float weight).
        dtype, device = base.params_dtype, token_slots.device
        # Buffers, not parameters: they are no part of the checkpoint. Layouts as kernels.add_lora takes them.
        self.register_buffer("lora_a", torch.zeros(  # [num_slices, max_loras, max_rank, in_features]
            len(self.output_slices), max_loras, max_rank, base.input_size, dtype=dtype, device=device),
            persistent=False)
        self.register_buffer("lora_b", torch.zeros(  # [out_features, max_loras, max_rank]
            base.output_size, max_loras, max_rank, dtype=dtype, device=device), persistent=False)

    @property
    def input_size(self) -> int:
        return self.base.input_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # [num_tokens, in] -> [num_tokens, out]
        # Before the row-parallel all-reduce: the sum over ranks of (x_r A_r^T) B^T is x A^T B^T, no extra collective.
        out = self.base.partial(x)
        kernels.add_lora(out, x, self.lora_a, self.lora_b, self.token_slots[:x.shape[0]], self.output_slices)
        return self.base.reduce(out)

    def load_slot(self, slot: int, weights: LoraWeights | None) -> None:
        """Puts one adapter's weights for this layer in `slot`; None (the adapter does not target it) zeroes it."""
        self.lora_a[:, slot].zero_()
        self.lora_b[:, slot].zero_()
        if weights is None:
            return
        rank = weights.a.shape[1]
        self.lora_a[:, slot, :rank].copy_(weights.a)  # [num_slices, rank, in]
        self.lora_b[:, slot, :rank].copy_(weights.b)  # [out, rank]


def add_lora_layers(model: nn.Module, max_loras: int, max_rank: int,
                    token_slots: torch.Tensor) -> dict[str, LoraLinear]:
    """Wraps every linear named in `model.lora_modules` (after its weights are loaded); returns the wrappers by
    module name (`model.layers.0.self_attn.qkv_proj`)."""
    targets = getattr(model, "lora_modules", None)
    if targets is None:
        raise ValueError(f"{type(model).__name__} does not support LoRA adapters")
    layers = {}
    for name, module in list(model.named_modules()):
        parent_name, _, leaf = name.rpartition(".")
        if leaf in targets:
            layers[name] = LoraLinear(module, max_loras, max_rank, token_slots)
            setattr(model.get_submodule(parent_name), leaf, layers[name])
    return layers


_LAYER_INDEX = re.compile(r"(?<=\.layers\.)\d+(?=\.)")


def other_stage_twins(layers: dict[str, LoraLinear], num_layers: int, stage_layers: range) -> dict[str, LoraLinear]:
    """The targetable linears of the layers that other pipeline stages hold, by module name, each mapped to its
    twin in this stage (`model.layers.7.mlp.down_proj` -> this stage's `model.layers.0.mlp.down_proj`)."""
    twins = {}
    for name, layer in layers.items():
        match = _LAYER_INDEX.search(name)
        if match is None or int(match.group()) != stage_layers.start:
            continue
        for i in range(num_layers):
            if i not in stage_layers:
                twins[f"{name[:match.start()]}{i}{name[match.end():]}"] = layer
    return twins
