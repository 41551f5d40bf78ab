"""SmoothQuant at load (`engine.quantization.smoothing`) on tiny checkpoints of every decoder family (all with GQA;
qwen2 with q/k/v biases, qwen3 with q/k norms, qwen3 and gemma2 tied, gemma2 with (1 + w) norms): the folding is
exact in float, it balances each smoothed channel's activation and weight extremes as SmoothQuant's formula says,
and online int8 / fp8 of the smoothed model matches a fake-quantized transformers reference of the same smoothed
weights under tests/test_quantization_w8a8.py's rule.
"""

from __future__ import annotations

import os
from unittest import mock

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM
from engine.kernels import cpu_native
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.quantization import calibration, smoothing
from engine.quantization.spec import last_down_proj
from engine.tools import quantized_checkpoints as qc
from engine.tools.tiny_model import FAMILIES
from tests.test_quantization import prefill_logits
from tests.test_quantization_w8a8 import TOKENS, fake_input, fake_quant, rule_ratio, TOLERANCE

CPU = torch.device("cpu")
ALPHA = 0.5


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    return {family: build_tiny_model(family, tmp_path_factory.mktemp(family)) for family in FAMILIES}


def float_model(folder):
    """A float model as the loader has it before smoothing: its weights in the checkpoint's layout, not packed for the
    CPU's kernels (smoothing runs inside the load, before that)."""
    config = ModelConfig.from_pretrained(folder, dtype="float32")
    with mock.patch.dict(os.environ, {cpu_native.ENV_VAR: "0"}):
        return load_model(config, folder, CPU), config


@pytest.mark.parametrize("family", FAMILIES)
@torch.inference_mode()
def test_folding_is_exact_in_float(checkpoints, family):
    model, config = float_model(checkpoints[family])
    before = prefill_logits(model, config, TOKENS)
    norm = model.model.layers[0].input_layernorm.weight.clone()
    smoothing.smooth_model(model, str(checkpoints[family]), ALPHA, smoothing.ALL_TARGETS)
    assert not torch.allclose(norm, model.model.layers[0].input_layernorm.weight)  # it did fold something
    torch.testing.assert_close(prefill_logits(model, config, TOKENS), before, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@torch.inference_mode()
def test_alpha_one_half_balances_activation_and_weight_extremes(checkpoints, family):
    """SmoothQuant's defining property at alpha 0.5: after folding, each channel's largest |input| over the
    calibration text equals its weight column's largest |value| (o_proj: per KV-head group, the group's largest)."""
    folder = str(checkpoints[family])
    model, config = float_model(folder)
    targets = smoothing.ALL_TARGETS
    smoothing.smooth_model(model, folder, ALPHA, targets)
    windows = calibration.calibration_windows(folder, config.max_model_len)
    amax = calibration.input_amax(model, windows, smoothing.target_linears(model, targets))
    attention = model.model.layers[0].self_attn
    for layer in model.model.layers:
        for target in targets:
            linear = layer.get_submodule(target)
            act, weight = amax[linear], linear.weight.abs().amax(0)
            if target == smoothing.O:
                group = (attention.num_kv_heads, attention.num_heads // attention.num_kv_heads, attention.head_size)
                act, weight = act.view(group).amax(1), weight.view(group).amax(1)
            torch.testing.assert_close(act, weight, rtol=1e-3, atol=1e-5)


def hf_weights(model) -> dict[str, torch.Tensor]:
    """kvbox's (smoothed) float weights under transformers' names: merged q/k/v and gate/up split back."""
    weights = {}
    for i, layer in enumerate(model.model.layers):
        prefix, attention, mlp = f"model.layers.{i}.", layer.self_attn, layer.mlp
        q, k, v = attention.qkv_proj.weight.split(attention.qkv_sizes)
        gate, up = mlp.gate_up_proj.weight.split(mlp.gate_up_proj.output_slices)
        weights |= {f"{prefix}self_attn.{name}_proj.weight": w for name, w in zip("qkv", (q, k, v))}
        if attention.qkv_proj.bias is not None:
            q_b, k_b, v_b = attention.qkv_proj.bias.split(attention.qkv_sizes)
            weights |= {f"{prefix}self_attn.{name}_proj.bias": b for name, b in zip("qkv", (q_b, k_b, v_b))}
        weights |= {f"{prefix}self_attn.o_proj.weight": attention.o_proj.weight,
                    f"{prefix}mlp.gate_proj.weight": gate, f"{prefix}mlp.up_proj.weight": up,
                    f"{prefix}mlp.down_proj.weight": mlp.down_proj.weight}
        weights |= {f"{prefix}{name}.weight": layer.get_submodule(name).weight
                    for name in layer.smoothing_norms.values()}
    return weights


def reference_logits(folder, weights: dict[str, torch.Tensor], weight_dtype, inputs) -> torch.Tensor:
    """transformers in float32 with `weights` in place, each decoder linear's weight fake-quantized per row (if
    `weight_dtype`) and its input per token (if `inputs`), but the last layer's down projection, which online
    quantization leaves in float (spec.last_down_proj)."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    kept = last_down_proj(model.config.num_hidden_layers)
    params = dict(model.named_parameters())
    for name, value in weights.items():
        quantize = (weight_dtype is not None and name.endswith(".weight") and name.split(".")[-2] in qc.LINEARS
                    and not name.startswith(kept + "."))
        params[name].data = fake_quant(value, weight_dtype, None) if quantize else value.clone()
    if inputs is not None:
        for name, module in model.named_modules():
            if name.split(".")[-1] in qc.LINEARS and name != kept:
                module.register_forward_pre_hook(lambda _, args: (fake_input(args[0], inputs, None),))
    with torch.inference_mode():
        return model(torch.tensor([TOKENS])).logits[0]


@pytest.mark.parametrize("family", ["llama", "gemma2"])
@pytest.mark.parametrize("method, dtype, inputs", [("fp8", torch.float8_e4m3fn, torch.float8_e4m3fn),
                                                   ("int8", torch.int8, "asym")])
def test_online_smoothed_path_within_the_rule(checkpoints, family, method, dtype, inputs):
    folder = checkpoints[family]
    config = ModelConfig.from_pretrained(folder, dtype="float32")
    smoothed, _ = float_model(folder)
    with torch.no_grad():
        smoothing.smooth_model(smoothed, str(folder), ALPHA)
    weights = {name: w.detach().clone() for name, w in hf_weights(smoothed).items()}
    float_logits = reference_logits(folder, weights, None, None)
    fake = reference_logits(folder, weights, dtype, inputs)
    model = load_model(config, folder, CPU, quantization=method, smoothquant_alpha=ALPHA)
    with torch.inference_mode():
        got = prefill_logits(model, config, TOKENS)
    assert rule_ratio(got, fake, float_logits) <= TOLERANCE
    # The same rule tells the smoothed path from the unsmoothed one.
    unsmoothed = {name: w.detach().clone() for name, w in hf_weights(float_model(folder)[0]).items()}
    assert rule_ratio(got, reference_logits(folder, unsmoothed, dtype, inputs), float_logits) > TOLERANCE


def test_the_engine_smooths_online_int8_by_default_and_not_when_off_or_serving_lora(checkpoints):
    folder = str(checkpoints["llama"])
    config = ModelConfig.from_pretrained(folder, dtype="float32")
    plain = load_model(config, folder, CPU, quantization="int8").model.layers[0].mlp.down_proj.weight_scale

    def down_scales(**options):
        llm = LLM(folder, dtype="float32", quantization="int8", num_kv_blocks=32, **options)
        down = llm.core.runner.model.model.layers[0].mlp.down_proj
        return getattr(down, "base", down).weight_scale  # a LoRA layer wraps the base linear

    assert not torch.allclose(down_scales(), plain)
    torch.testing.assert_close(down_scales(smoothquant_alpha=None), plain, rtol=0, atol=0)
    # Adapters were trained on the unsmoothed inputs.
    torch.testing.assert_close(down_scales(enable_lora=True), plain, rtol=0, atol=0)
