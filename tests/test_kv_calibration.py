"""Calibrated FP8 KV scales (`calculate_kv_scales`, YAML `kv_cache.calculate_scales`): each layer's k_scale / v_scale
is the largest |K| (after RoPE) / |V| that transformers computes on the same weights over the calibration text,
divided by the fp8 type's largest value; with them the engine holds tests/test_kv_cache_fp8.py's rule against a
fake-quantized reference; a checkpoint's own scales win; dtype auto ignores the option.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AttentionInterface, AutoModelForCausalLM, AutoTokenizer
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from engine import LLM
from engine.quantization.kv_calibration import CALIBRATION_TEXT
from tests.test_kv_cache_fp8 import (FP8_MAX, FP8_TYPES, TOLERANCE, checkpoint_scales, fake_quant,
                                     kvbox_path_logprobs, path_logprobs, reference, with_scales)
from tests.test_quantization import SHAPE

MAX_MODEL_LEN = 64  # with 16 blocks of 8 tokens: the calibration prompt is the text's first 64 tokens


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    return build_tiny_model("llama", tmp_path_factory.mktemp("kvcal") / "float", **SHAPE)


def reference_scales(folder, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """transformers over the calibration text's first MAX_MODEL_LEN tokens: amax(|K| after RoPE) / fp8 max and
    amax(|V|) / fp8 max per layer, named as a checkpoint names them; each layer then attends over its K / V
    fake-quantized with them, so the next layer computes from what an fp8 cache gives back."""
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = AutoTokenizer.from_pretrained(folder).encode(CALIBRATION_TEXT.read_text(), truncation=True,
                                                       max_length=MAX_MODEL_LEN)
    scales = {}

    def record(module, query, key, value, *args, **kwargs):
        prefix = f"model.layers.{module.layer_idx}.self_attn."
        scales[prefix + "k_scale"] = key.abs().max() / FP8_MAX[dtype]
        scales[prefix + "v_scale"] = value.abs().max() / FP8_MAX[dtype]
        key = fake_quant(key, dtype, float(scales[prefix + "k_scale"]))
        value = fake_quant(value, dtype, float(scales[prefix + "v_scale"]))
        return sdpa_attention_forward(module, query, key, value, *args, **kwargs)

    AttentionInterface.register("record_kv_amax", record)
    model.set_attn_implementation("record_kv_amax")
    with torch.inference_mode():
        model(torch.tensor([ids]))
    assert len(ids) == MAX_MODEL_LEN and len(scales) == 2 * model.config.num_hidden_layers
    return scales


def named_pairs(scales: dict[str, torch.Tensor], num_layers: int) -> list[float]:
    """k_scale, v_scale of layer 0, then of layer 1...: engine_scales' order."""
    return [float(scales[f"model.layers.{i}.self_attn.{which}"]) for i in range(num_layers)
            for which in ("k_scale", "v_scale")]


def calibrated_llm(folder, kv_cache_dtype: str = "fp8") -> LLM:
    return LLM(str(folder), dtype="float32", kv_cache_dtype=kv_cache_dtype, calculate_kv_scales=True,
               max_model_len=MAX_MODEL_LEN, num_kv_blocks=16, block_size=8)


def engine_scales(llm: LLM) -> list[float]:
    return [scale for a in llm.core.runner.model.attention_layers() for scale in (a.k_scale, a.v_scale)]


@pytest.mark.parametrize("kv_cache_dtype", ["fp8", "fp8_e5m2"])
def test_scales_are_the_amax_of_the_kv_computed_over_fmax(float_model, kv_cache_dtype):
    expected = reference_scales(float_model, FP8_TYPES[kv_cache_dtype])
    got = engine_scales(calibrated_llm(float_model, kv_cache_dtype))
    assert got == pytest.approx(named_pairs(expected, len(got) // 2), rel=1e-5)
    assert 1.0 not in got  # calibrated, not the default


def test_calibrated_scales_hold_the_fake_quant_rule(float_model):
    dtype = torch.float8_e4m3fn
    scales = reference_scales(float_model, dtype)
    path, fake = reference(float_model, dtype, scales=scales)
    _, float_logprobs = reference(float_model, None, path)
    fake_path = path_logprobs(fake, path)
    own_effect = float((fake_path - path_logprobs(float_logprobs, path)).abs().mean())
    assert own_effect > 1e-4  # the scheme changes something: the rule below is not vacuous
    got = kvbox_path_logprobs(float_model, "fp8", path, calculate_kv_scales=True)
    assert float((got - fake_path).abs().mean()) <= TOLERANCE * own_effect
    # Without calibration (scales 1.0) the same rule fails: the calibrated scales are what the engine used.
    plain = kvbox_path_logprobs(float_model, "fp8", path)
    assert float((plain - fake_path).abs().mean()) > TOLERANCE * own_effect


def test_checkpoint_scales_win(tmp_path, float_model):
    scaled = with_scales(float_model, tmp_path / "scaled")
    got = engine_scales(calibrated_llm(scaled))
    assert got == pytest.approx(named_pairs(checkpoint_scales(len(got) // 2), len(got) // 2))


def test_auto_ignores_the_option(float_model):
    llm = calibrated_llm(float_model, "auto")
    assert set(engine_scales(llm)) == {1.0}
    assert llm.core.runner.model.attention_layers()[0].kv_cache.dtype == torch.float32


def test_yaml_key_maps_to_the_engine_option():
    from tests.test_config import error, model, parse

    spec = parse(model("kv_cache: {dtype: fp8, calculate_scales: true}")).models[0]
    assert spec.to_engine_config(spec.source).calculate_kv_scales is True
    assert parse(model()).models[0].kv_cache.calculate_scales is False
    assert error(model("kv_cache: {calculate_scales: 3}")).startswith("config.yaml: models[0].kv_cache.calculate_scales:")
