"""Per-layer FP8 KV cache scales under every name the public tools write them (vLLM / llm-compressor
`self_attn.k_scale`, AutoFP8 / ModelOpt `self_attn.k_proj.k_scale`, older llm-compressor
`self_attn.k_proj.output_scale`), and compressed-tensors checkpoints that declare their KV cache quantization
(`kv_cache_scheme`)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM, SamplingParams
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.quantization.spec import QuantizationConfigError, parse_quantization

CPU = torch.device("cpu")
NAMINGS = {"vllm": "self_attn.{kv}_scale", "autofp8": "self_attn.{kv}_proj.{kv}_scale",
           "output_scale": "self_attn.{kv}_proj.output_scale"}
SCALES = {"k": (0.02, 0.05), "v": (0.03, 0.015)}  # per layer; the tiny llama has two


def with_scales(folder, out, naming: str, quantization_config: dict | None = None):
    shutil.copytree(folder, out)
    tensors = load_file(out / "model.safetensors")
    for kv, per_layer in SCALES.items():
        for layer, scale in enumerate(per_layer):
            # llm-compressor saves them as one-element tensors, AutoFP8 as scalars.
            tensors[f"model.layers.{layer}." + NAMINGS[naming].format(kv=kv)] = torch.tensor([scale])
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    if quantization_config is not None:
        config = json.loads((out / "config.json").read_text())
        config["quantization_config"] = quantization_config
        (out / "config.json").write_text(json.dumps(config))
    return out


def prompt_token_logprobs(llm: LLM, prompts: list[list[int]]) -> list[list[float]]:
    """As bench/perplexity.py's (importing that module replaces sys.path[0], which other test modules rely on)."""
    params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    return [[position.logprobs[0] for position in output.prompt_logprobs[1:]] for output in outputs]


def kv_only_config(**kv_changes) -> dict:
    """What llm-compressor saves for an FP8 KV cache recipe without weight quantization (compressed-tensors' own
    serialization)."""
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig
    kv = QuantizationArgs(num_bits=8, type="float", strategy="tensor", dynamic=False, symmetric=True)
    config = QuantizationConfig(config_groups={}, kv_cache_scheme=kv, format="dense", quantization_status="compressed",
                                ignore=["lm_head"])
    saved = {"quant_method": "compressed-tensors", **json.loads(config.model_dump_json(exclude=["quant_method"]))}
    saved["kv_cache_scheme"].update(kv_changes)
    return saved


@pytest.mark.parametrize("naming", list(NAMINGS))
def test_each_naming_reaches_the_attention_layers(tiny_model, tmp_path, naming):
    folder = with_scales(tiny_model("llama"), tmp_path / naming, naming)
    model = load_model(ModelConfig.from_pretrained(folder, dtype="float32"), folder, CPU)
    layers = model.attention_layers()
    assert [a.k_scale for a in layers] == pytest.approx(list(SCALES["k"]))
    assert [a.v_scale for a in layers] == pytest.approx(list(SCALES["v"]))
    assert all(a.kv_scales_from_checkpoint for a in layers)


def test_a_compressed_tensors_kv_cache_scheme_runs_its_scales(tiny_model, tmp_path):
    """A KV-only recipe keeps float weights, and its scales give the fp8 cache the same outputs as vLLM's naming."""
    assert parse_quantization(kv_only_config(), None) is None
    assert parse_quantization(kv_only_config(), "fp8").online  # the float weights may still be quantized online
    vllm = with_scales(tiny_model("llama"), tmp_path / "vllm", "vllm")
    ct = with_scales(tiny_model("llama"), tmp_path / "ct", "output_scale", kv_only_config())
    path = [[5, 17, 99, 3, 250, 31, 7, 402, 11, 64]]
    logprobs = [prompt_token_logprobs(LLM(str(folder), dtype="float32", kv_cache_dtype="fp8", max_model_len=32,
                                          num_kv_blocks=8, block_size=8), path) for folder in (vllm, ct)]
    assert logprobs[0] == logprobs[1]
    unscaled = LLM(tiny_model("llama"), dtype="float32", kv_cache_dtype="fp8", max_model_len=32, num_kv_blocks=8,
                   block_size=8)
    assert prompt_token_logprobs(unscaled, path) != logprobs[0]  # the scales matter at all


@pytest.mark.parametrize("key, value", [("type", "int"), ("strategy", "attn_head"), ("dynamic", True),
                                        ("num_bits", 4)])
def test_kv_cache_schemes_kvbox_cannot_run_are_refused_by_key(key, value):
    with pytest.raises(QuantizationConfigError) as error:
        parse_quantization(kv_only_config(**{key: value}), None)
    assert (error.value.key, error.value.value) == (f"quantization_config.kv_cache_scheme.{key}", value)
