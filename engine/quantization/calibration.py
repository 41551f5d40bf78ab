"""The calibration forward of online quantization: the float model, as loaded and before its linears quantize,
runs once over the built-in text (`kv_calibration.txt`: prose, a chat turn, code, numbers, three languages; the
model's own tokenizer) while hooks record each chosen linear's largest |input| per input channel. SmoothQuant
(`smoothing`) and the outlier channels kept in float (`outliers`) are chosen from it, the same on every start.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.models.attention import AttentionMetadata
from engine.quantization.context import UNQUANTIZED
from engine.quantization.kv_calibration import CALIBRATION_TEXT

CALIBRATION_WINDOW = 512
_BLOCK = 16


def calibration_windows(tokenizer_path: str, max_model_len: int) -> list[list[int]]:
    """The calibration text's tokens cut into prompts of at most `CALIBRATION_WINDOW` tokens, or the model's
    longest sequence (the rotary table's length) if shorter."""
    from engine.tokenizer import load_tokenizer

    window = min(CALIBRATION_WINDOW, max_model_len)
    token_ids = load_tokenizer(tokenizer_path).encode(CALIBRATION_TEXT.read_text(), verbose=False)
    return [token_ids[i:i + window] for i in range(0, len(token_ids), window)]


def input_amax(model: nn.Module, windows: list[list[int]], linears: list[nn.Module]) -> dict[nn.Module, torch.Tensor]:
    """Each of `linears`' largest |input| per input channel (float32) over one float forward of `windows` (every
    linear runs its float weights, as loaded), the prompts side by side, on a cache allocated for it alone."""
    amax: dict[nn.Module, torch.Tensor] = {}

    def record(linear: nn.Module, args: tuple) -> None:
        seen = args[0].detach().abs().amax(0).float()
        amax[linear] = torch.maximum(amax[linear], seen) if linear in amax else seen

    methods = {module: module.quant_method for module in model.modules() if hasattr(module, "quant_method")}
    hooks = [linear.register_forward_pre_hook(record) for linear in linears]
    try:
        for module in methods:  # the float weights, as loaded
            module.quant_method = UNQUANTIZED
        _forward(model, windows)
    finally:
        for hook in hooks:
            hook.remove()
        for module, method in methods.items():
            module.quant_method = method
    return amax


def _forward(model: nn.Module, windows: list[list[int]]) -> None:
    device = next(model.parameters()).device
    lengths = [len(w) for w in windows]
    blocks = [-(-n // _BLOCK) for n in lengths]
    config = model.config
    for attention in model.attention_layers():
        attention.kv_cache = torch.zeros(2, sum(blocks), _BLOCK, attention.num_kv_heads, attention.head_size,
                                         dtype=config.dtype, device=device)
    table = torch.full((len(windows), max(blocks)), 0, dtype=torch.int32)
    slots, first = [], 0
    for i, (n, count) in enumerate(zip(lengths, blocks)):
        table[i, :count] = torch.arange(first, first + count, dtype=torch.int32)
        slots.append(torch.arange(n) + first * _BLOCK)
        first += count
    starts = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0, dtype=torch.int32)
    metadata = AttentionMetadata(torch.cat(slots).to(device), table.to(device),
                                 torch.tensor(lengths, dtype=torch.int32, device=device), starts.to(device),
                                 max(lengths), max(lengths))
    try:
        model(torch.tensor(sum(windows, []), device=device),
              torch.cat([torch.arange(n) for n in lengths]).to(device), metadata)
    finally:
        for attention in model.attention_layers():
            attention.kv_cache = None
