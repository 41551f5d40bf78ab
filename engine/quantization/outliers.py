"""Outlier input channels kept in float for online W8A8 (`outlier_fraction`): LLM.int8()'s decomposition (Dettmers
et al. 2022) with a static channel set. Each quantized linear's `fraction` of input channels with the largest |x|
over the calibration forward (`calibration`) leaves its 8-bit weight (those columns zeroed before the per-channel
scales are taken) and runs as a small float product beside the 8-bit GEMM: y = W8A8(x) + x[:, kept] @ W[:, kept]^T.

Why: an e4m3 value keeps 3 mantissa bits wherever its scale puts it, so a token's activation error is relative, and
the few channels whose values are largest carry the most absolute error into the product. Their share of the
per-token scale does not matter (left in, `bench/fp8_schemes.py` gave the same perplexity to the digit), so the
activation quantizers are unchanged. Off by default: on the built-in SmolLM2, 1% of the channels took online fp8
from +2.39% to +1.48% perplexity over float on the GPL-3 text but only from +2.62% to +2.35% on four other licence
texts, and it cost 22% of a Llama-3.1-8B shape's batch-1 decode speed on an H100 (243.0 -> 189.6 tok/s;
bench/RESULTS.md, twenty-fourth session): a small GEMM and a gather per linear, and the producers' fused
quantization given up for those linears (`W8A8LinearMethod.input_quant_dtype`), since the float input must reach
them.

Dummy weights have no activations worth measuring: the kept channels are spread evenly, at the same count, so a
benchmark pays what a real model does.
"""

from __future__ import annotations

import torch
from torch import nn

from engine.quantization.calibration import calibration_windows, input_amax
from engine.quantization.w8a8 import W8A8LinearMethod


def keep_outliers_online(model: nn.Module, fraction: float | None, tokenizer_path: str, dummy: bool) -> None:
    """Chooses the kept channels (`outlier_index`) of every linear `model` quantizes online, `fraction` of each
    one's inputs (None or 0: none, at least one otherwise); the linears' method splits them off as it quantizes."""
    linears = [module for module in model.modules()
               if isinstance(getattr(module, "quant_method", None), W8A8LinearMethod)
               and module.quant_method.scheme.online]
    if not fraction or not linears:
        return
    amax = ({} if dummy else
            input_amax(model, calibration_windows(tokenizer_path, model.config.max_model_len), linears))
    for linear in linears:
        k = linear.input_size
        count = min(k, max(1, round(fraction * k)))
        index = (torch.linspace(0, k - 1, count, device=linear.weight.device).long() if dummy
                 else amax[linear].topk(count).indices.sort().values)
        linear.outlier_index = index
