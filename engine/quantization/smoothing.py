"""SmoothQuant for online W8A8 (`quantization: int8 | fp8` on a float checkpoint): before the loaded float weights
are quantized, one calibration forward (the built-in `kv_calibration.txt`, the model's own tokenizer) records each
decoder linear's largest |input| per input channel, and every channel j whose producer can absorb a scale gets
s_j = max|X_j|^alpha / max|W_:,j|^(1 - alpha): the producer's output is divided by s (X / s), the linear's input
column multiplied by it (W * s). The product is unchanged in float; the activations' outlier channels shrink, so
per-token activation scales waste less of the 8-bit range on them (SmoothQuant, Xiao et al. 2022; the mappings are
llm-compressor's SmoothQuantModifier's for Llama-like decoders).

Producers (per decoder layer): the norm before q/k/v (the family's `smoothing_norms`), the norm before gate/up, up's
output rows for down (act(gate) * up is linear in up), v's output rows for o (an o input channel belongs to one
query head, which reads one KV head: a scale is shared by the query heads of a group). A norm scaling by
(weight + offset) (Gemma) absorbs it as (weight + offset) / s - offset. The arithmetic runs in float32 and is
rounded to the model dtype once. Which linears are smoothed is `TARGETS`; every mapping is kept, tested and
measurable (`bench/perplexity.py --smooth-targets`), since which pays is a property of the model and the 8-bit type.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.quantization.calibration import calibration_windows, input_amax

# Which linears' inputs are smoothed, by their attribute path in a decoder layer.
QKV, O, GATE_UP, DOWN = "self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"
ALL_TARGETS = (QKV, O, GATE_UP, DOWN)
# What the engine smooths: down alone measured best on the built-in SmolLM2 (whole GPL-3 text, online int8, alpha
# 0.5: +0.39% perplexity over float; all four +0.99%, gate/up and down +1.14%, none +2.52%; bench/RESULTS.md).
TARGETS = (DOWN,)
# `smoothquant_alpha: auto` per 8-bit type: int8's best (down only, alpha 0.3 to 0.7: +2.27, +1.33, +0.39, +1.00,
# +1.27%); none for fp8, whose error is mostly its mantissa's: alpha 0.1 to 0.5 measured +1.97 to +2.50% on the whole
# text (+2.66% unsmoothed) but swung the CI slice from -8.8% to +2.4% (bench/RESULTS.md).
AUTO_ALPHA = {"int8": 0.5}


def smooth_online(model: nn.Module, layout: str, alpha: float | str | None, tokenizer_path: str) -> None:
    """Smooths a model about to be quantized online to `layout` (int8, fp8) with strength `alpha` ("auto": the
    layout's `AUTO_ALPHA`; None: not), if its family says where to fold."""
    alpha = AUTO_ALPHA.get(layout) if alpha == "auto" else alpha
    if alpha is not None and can_smooth(model):
        smooth_model(model, tokenizer_path, alpha)


def can_smooth(model: nn.Module) -> bool:
    """Whether `model`'s decoder layers say which norm feeds which linear (the Llama-like families do)."""
    layers = getattr(getattr(model, "model", None), "stage_layers", ())
    return bool(layers) and all(hasattr(layer, "smoothing_norms") for layer in layers)


@torch.no_grad()
def smooth_model(model: nn.Module, tokenizer_path: str, alpha: float, targets: tuple[str, ...] | None = None) -> None:
    """Folds SmoothQuant scales of migration strength `alpha` into `model`'s float weights (loaded, not yet
    processed by their linear method), for the linears named in `targets` (None: `TARGETS`)."""
    targets = targets or TARGETS
    amax = input_amax(model, calibration_windows(tokenizer_path, model.config.max_model_len),
                      target_linears(model, targets))
    for layer in model.model.stage_layers:
        # o and down first: they rescale rows of q/k/v and gate/up, whose columns' extremes the norms' scales read.
        if O in targets:
            _smooth_v_into_o(layer.self_attn, amax[layer.self_attn.o_proj], alpha)
        if DOWN in targets:
            _smooth_up_into_down(layer.mlp, amax[layer.mlp.down_proj], alpha)
        for target in (QKV, GATE_UP):
            if target in targets:
                linear = layer.get_submodule(target)
                scales = smoothing_scales(amax[linear], _column_amax(linear.weight), alpha)
                _scale_norm(layer.get_submodule(layer.smoothing_norms[target]), scales)
                _scale_columns(linear.weight, scales)


def target_linears(model: nn.Module, targets: tuple[str, ...]) -> list[nn.Module]:
    return [layer.get_submodule(target) for layer in model.model.stage_layers for target in targets]


def smoothing_scales(act_amax: torch.Tensor, weight_amax: torch.Tensor, alpha: float) -> torch.Tensor:
    """s = max|X|^alpha / max|W|^(1 - alpha) per input channel; 1 where a channel never fired or has no weight."""
    scales = act_amax.pow(alpha) / weight_amax.pow(1 - alpha)
    return torch.where(torch.isfinite(scales) & (scales > 0), scales, torch.ones_like(scales)).clamp(min=1e-5)


def _column_amax(weight: torch.Tensor) -> torch.Tensor:
    return weight.abs().amax(0).float()


def _scale_columns(weight: torch.Tensor, scales: torch.Tensor) -> None:
    weight.copy_(weight.float() * scales)


def _divide_rows(param: torch.Tensor | None, scales: torch.Tensor) -> None:
    if param is not None:
        param.copy_(param.float() / (scales if param.dim() == 1 else scales[:, None]))


def _scale_norm(norm: nn.Module, scales: torch.Tensor) -> None:
    offset = norm.weight_offset
    norm.weight.copy_((norm.weight.float() + offset) / scales - offset)


def _smooth_up_into_down(mlp: nn.Module, act: torch.Tensor, alpha: float) -> None:
    gate_up, down = mlp.gate_up_proj, mlp.down_proj
    scales = smoothing_scales(act, _column_amax(down.weight), alpha)
    up = slice(gate_up.output_slices[0], None)
    _divide_rows(gate_up.weight[up], scales)
    _divide_rows(gate_up.bias[up] if gate_up.bias is not None else None, scales)
    _scale_columns(down.weight, scales)


def _smooth_v_into_o(attention: nn.Module, act: torch.Tensor, alpha: float) -> None:
    """o's input channel (h, d) is query head h's output, a mix of its KV head's V channel d; the query heads of one
    KV head share that channel's scale, from their largest |input| and largest |weight| column."""
    qkv, o = attention.qkv_proj, attention.o_proj
    kv_heads, head_size = attention.num_kv_heads, attention.head_size
    group = attention.num_heads // kv_heads

    def per_v_channel(values: torch.Tensor) -> torch.Tensor:  # [heads * head_size] -> [kv_heads * head_size]
        return values.view(kv_heads, group, head_size).amax(1).reshape(-1)

    scales = smoothing_scales(per_v_channel(act), per_v_channel(_column_amax(o.weight)), alpha)
    v = slice(qkv.q_size + qkv.kv_size, None)
    _divide_rows(qkv.weight[v], scales)
    _divide_rows(qkv.bias[v] if qkv.bias is not None else None, scales)
    _scale_columns(o.weight, scales.view(kv_heads, 1, head_size).expand(kv_heads, group, head_size).reshape(-1))
