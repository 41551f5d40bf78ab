"""Producers that quantize their output for W8A8 linears (engine/quantization/producer_quant.py), on the CPU's torch
backend: which producers `arm` arms, that the armed linears then take the quantized rows (kernels.w8a8_gemm), and
that the logits are the unarmed model's bit for bit (the armed ops are the plain op and the same quantizer)."""

from __future__ import annotations

import pytest
import torch

from engine import kernels
from engine.lora.layers import add_lora_layers
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.quantization import producer_quant
from engine.tools import quantized_checkpoints as qc
from engine.tools.tiny_model import build_tiny_model
from tests.test_quantization import SHAPE, prefill_logits
from tests.test_quantization_w8a8 import ct_config, int8_writer

CPU = torch.device("cpu")
TOKENS = torch.randint(0, 512, (24,), generator=torch.Generator().manual_seed(3)).tolist()


def disarm(model) -> None:
    for module in model.modules():
        if hasattr(module, "quantize_output"):
            module.quantize_output = None


def logits_and_gemm_calls(model, config, monkeypatch) -> tuple[torch.Tensor, int]:
    calls = []
    gemm = kernels._active.ops.w8a8_gemm
    monkeypatch.setattr(kernels._active.ops, "w8a8_gemm", lambda *args: calls.append(1) or gemm(*args))
    return prefill_logits(model, config, TOKENS), len(calls)


@pytest.mark.parametrize("family", ["llama", "gemma2", "qwen2"])
@torch.inference_mode()
def test_online_fp8_producers_quantize_and_change_nothing(tmp_path, monkeypatch, family):
    folder = build_tiny_model(family, tmp_path / family, **SHAPE)
    config = ModelConfig.from_pretrained(folder, dtype="float32")
    model = load_model(config, folder, CPU, quantization="fp8")
    layers = model.model.stage_layers
    # Per layer: the norm before q/k/v, the one before gate/up, the MLP's activation before down; but the last
    # layer's activation, whose down projection online quantization leaves in float (spec.last_down_proj).
    assert producer_quant.arm(model) == 3 * len(layers) - 1
    assert layers[0].input_layernorm.quantize_output == torch.float8_e4m3fn
    assert layers[0].mlp.quantize_output == torch.float8_e4m3fn
    assert layers[-1].mlp.quantize_output is None
    armed, calls = logits_and_gemm_calls(model, config, monkeypatch)
    assert calls == 3 * len(layers) - 1  # o_proj's input comes from attention: it quantizes for itself
    disarm(model)
    plain, calls = logits_and_gemm_calls(model, config, monkeypatch)
    assert calls == 0
    assert torch.equal(armed, plain)


@torch.inference_mode()
def test_symmetric_int8_checkpoint_is_armed_asymmetric_online_int8_is_not(tmp_path, monkeypatch):
    folder = build_tiny_model("llama", tmp_path / "float", **SHAPE)
    qc.write_quantized(folder, tmp_path / "ct", ct_config("int", "channel", static=False), int8_writer())
    config = ModelConfig.from_pretrained(tmp_path / "ct", dtype="float32")
    model = load_model(config, tmp_path / "ct", CPU)
    assert producer_quant.arm(model) == 3 * config.num_layers
    assert model.model.layers[0].input_layernorm.quantize_output == torch.int8
    armed, calls = logits_and_gemm_calls(model, config, monkeypatch)
    assert calls == 3 * config.num_layers
    disarm(model)
    assert torch.equal(armed, logits_and_gemm_calls(model, config, monkeypatch)[0])

    # Online int8 has a zero point per token, which the fused producers do not write.
    online = load_model(ModelConfig.from_pretrained(folder, dtype="float32"), folder, CPU, quantization="int8",
                        smoothquant_alpha=None)
    assert producer_quant.arm(online) == 0


@torch.inference_mode()
def test_lora_wrapped_linears_and_float_models_are_not_armed(tmp_path):
    folder = build_tiny_model("llama", tmp_path / "float", **SHAPE)
    config = ModelConfig.from_pretrained(folder, dtype="float32")
    assert producer_quant.arm(load_model(config, folder, CPU)) == 0
    model = load_model(config, folder, CPU, quantization="fp8")
    add_lora_layers(model, 2, 8, torch.zeros(len(TOKENS), dtype=torch.int64))  # LoRA's A reads the float input
    assert producer_quant.arm(model) == 0
