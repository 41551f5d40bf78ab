"""Calibrated FP8 KV-cache scales (`calculate_kv_scales`): one prompt forward at start-up over a fixed text sets
each attention layer's k_scale / v_scale to the largest |K| (after RoPE) / |V| it computes, divided by the cache
type's largest value (vLLM's amax / range rule), for the layers whose checkpoint gives no scales. Layer by layer:
a layer's scales are set before it stores, so the layers after it see K / V read back as they will be when serving.

Why at start-up rather than on the first request's prefill, where vLLM computes them: the scales are plain floats
that CUDA graphs capture as kernel arguments, so they must be final before capture; and a fixed text
(`kv_calibration.txt`: prose, a chat turn, code, numbers, three languages) makes them the same on every start,
whatever traffic comes first. The pass runs once the cache is allocated, on its first blocks (nothing holds them
yet; whoever gets them overwrites them), and costs one prefill of at most a few hundred tokens.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch

from engine.models.attention import Attention
from engine.kernels import reference

CALIBRATION_TEXT = Path(__file__).with_name("kv_calibration.txt")
_FORWARD_ARGS = ("query", "key", "value", "metadata", "positions", "rotary_emb")  # Attention.forward's


def calibrate_kv_scales(layers: list[Attention], cache_dtype: torch.dtype, tokenizer_path: str, max_tokens: int,
                        run_prompt: Callable[[list[int]], None]) -> None:
    """Runs the calibration text's first `max_tokens` tokens through the model (`run_prompt`) and sets the scales of
    `layers` not loaded from the checkpoint, each from the K / V it computes, layer by layer."""
    if not layers:  # an encoder caches nothing
        return
    from engine.tokenizer import load_tokenizer

    token_ids = load_tokenizer(tokenizer_path).encode(CALIBRATION_TEXT.read_text(), truncation=True,
                                                      max_length=max_tokens)
    targets = {layer for layer in layers if not layer.kv_scales_from_checkpoint}
    top = float(torch.finfo(cache_dtype).max)

    def calibrate(layer: Attention, args: tuple, kwargs: dict) -> None:
        # Before the layer stores: its scales are set from this K / V, and the layers after it see K / V read back
        # as they will be when serving.
        inputs = dict(zip(_FORWARD_ARGS, args)) | kwargs
        key = inputs["key"].reshape(-1, layer.num_kv_heads, layer.head_size)
        if inputs.get("rotary_emb") is not None:
            rotary, query, key = inputs["rotary_emb"], inputs["query"].clone(), key.clone()
            reference.rotary_embedding(inputs["positions"], query.view(key.shape[0], -1, layer.head_size), key,
                                       rotary.cos_sin_cache, rotary.is_neox)
        # An all-zero K or V (a dead head) would give scale 0 and divide by it: it keeps 1.0.
        layer.k_scale = float(key.abs().max()) / top or 1.0
        layer.v_scale = float(inputs["value"].abs().max()) / top or 1.0

    hooks = [layer.register_forward_pre_hook(calibrate, with_kwargs=True) for layer in targets]
    try:
        run_prompt(token_ids)
    finally:
        for hook in hooks:
            hook.remove()
