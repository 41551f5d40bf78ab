"""Quantized checkpoints as older public tools left them: the settings in a separate `quantize_config.json` (older
AutoGPTQ, early TheBloke repos), an all-zero `.bias` beside every quantized linear (GPTQ-for-LLaMa, early
auto-gptq), one `self_attn.kv_scale` for K and V (vLLM's first fp8 checkpoints); and `kvbox check-config` on a Hub
repo id, read from the local Hugging Face cache.

Each checkpoint is written by the writers of `tests/test_quantization.py` and then rearranged as the older tool
saved it; it must give the greedy tokens transformers gives on its dequantized float32 weights.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from engine import LLM
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.quantization.spec import QuantizationConfigError
from engine.tools import quantized_checkpoints as qc
from test_quant_kv_scales import prompt_token_logprobs
from test_quantization import SHAPE, assert_greedy_matches_transformers, write_format

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    return build_tiny_model("llama", tmp_path_factory.mktemp("float"), **SHAPE)


def move_to_quantize_config(folder: Path, file: str = "quantize_config.json") -> dict:
    """config.json without quantization_config, its settings in quantize_config.json without quant_method, as
    auto-gptq before 0.5 (and AutoAWQ's GPTQ-era layout) saved them; quant_config.json: AutoAWQ's own file and keys
    (w_bit, q_group_size, zero_point, version "GEMM"), as early AWQ repos ship it."""
    config = json.loads((folder / "config.json").read_text())
    settings = config.pop("quantization_config")
    settings.pop("quant_method")
    if file == "quant_config.json":
        settings = {"zero_point": settings["zero_point"], "q_group_size": settings["group_size"],
                    "w_bit": settings["bits"], "version": "GEMM"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / file).write_text(json.dumps(settings, indent=2))
    return settings


def add_biases(folder: Path, value: float = 0.0) -> None:
    """A float16 `.bias` of `value` beside every packed linear, as GPTQ-for-LLaMa and early auto-gptq saved them."""
    tensors = load_file(folder / "model.safetensors")
    for name in [name for name in tensors if name.endswith(".qweight")]:
        tensors[name[:-len("qweight")] + "bias"] = torch.full((tensors[name].shape[1],), value, dtype=torch.float16)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def check_config(yaml: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """`kvbox check-config` as a user runs it (a fresh process, so that huggingface_hub reads HF_HUB_CACHE)."""
    return subprocess.run([sys.executable, "-m", "appliance.cli", "check-config", str(yaml)], capture_output=True,
                          text=True, env={**os.environ, **(env or {})}, cwd=Path(__file__).parent.parent)


@pytest.mark.parametrize("name, file, described", [
    ("gptq-4b-g32-asym-actorder", "quantize_config.json", "gptq 4-bit, group 32, zero points, act-order, weight-only"),
    ("awq-g64", "quantize_config.json", "awq 4-bit, group 64, zero points, weight-only"),
    ("awq-g64", "quant_config.json", "awq 4-bit, group 64, zero points, weight-only"),
])
def test_settings_in_quantize_config_json_load_and_show_in_check_config(float_model, tmp_path, name, file,
                                                                         described):
    folder = tmp_path / "quantized"
    dequantized = write_format(name, float_model, folder)
    settings = move_to_quantize_config(folder, file)
    assert ("zero_point" in settings) == name.startswith("awq")  # what tells AutoAWQ's file from auto-gptq's
    assert_greedy_matches_transformers(folder, qc.write_float(float_model, tmp_path / "ref", dequantized))

    yaml = tmp_path / "kvbox.yaml"
    yaml.write_text(f"models:\n  - name: m\n    source: {folder}\n    device: cpu\n")
    result = check_config(yaml)
    assert result.returncode == 0, result.stderr
    assert f"m: quantization {described}, kv cache auto" in result.stdout

    bits = "w_bit" if file == "quant_config.json" else "bits"
    settings[bits] = 3
    (folder / file).write_text(json.dumps(settings))
    result = check_config(yaml)
    assert result.returncode == 1
    assert f"models[0].source: quantization_config.{bits} = 3: kvbox supports" in result.stderr


def test_config_json_settings_win_over_quantize_config_json(float_model, tmp_path):
    """Repos that gained a quantization_config kept their old quantize_config.json; transformers reads config.json."""
    folder = tmp_path / "quantized"
    write_format("gptq-4b-g128-sym", float_model, folder)
    (folder / "quantize_config.json").write_text(json.dumps({**qc.gptq_config(8, 64, True, False)}))
    assert ModelConfig.from_pretrained(folder).quantization_config == qc.gptq_config(4, 128, True, False)


def test_a_quantize_config_json_that_is_no_object_names_the_file_and_model(float_model, tmp_path):
    folder = tmp_path / "quantized"
    write_format("gptq-4b-g128-sym", float_model, folder)
    move_to_quantize_config(folder)
    (folder / "quantize_config.json").write_text("[4, 128]")
    with pytest.raises(QuantizationConfigError, match=rf"quantize_config.json = \[4, 128\]: expected a JSON object "
                                                      rf"\(model {folder}\)"):
        ModelConfig.from_pretrained(folder)


def test_all_zero_biases_beside_packed_linears_are_skipped(float_model, tmp_path):
    """An old GPTQ repo as a whole: quantize_config.json and a zero bias on every quantized linear."""
    folder = tmp_path / "quantized"
    dequantized = write_format("gptq-4b-g128-sym", float_model, folder)
    move_to_quantize_config(folder)
    add_biases(folder)
    assert_greedy_matches_transformers(folder, qc.write_float(float_model, tmp_path / "ref", dequantized))


def test_a_nonzero_bias_the_model_has_no_place_for_is_refused(float_model, tmp_path):
    folder = tmp_path / "quantized"
    write_format("gptq-4b-g128-sym", float_model, folder)
    add_biases(folder, 0.5)
    with pytest.raises(ValueError, match=r"'model.layers.0.mlp.down_proj.bias' in the checkpoint for "
                                         r"LlamaForCausalLM is a nonzero bias \(largest 0.5\)"):
        load_model(ModelConfig.from_pretrained(folder, dtype="float32"), folder, CPU)


def test_a_bias_beside_a_float_linear_is_still_unexpected(float_model, tmp_path):
    """Only packed linears get the zero biases skipped: a float checkpoint with stray biases is a wrong config."""
    folder = tmp_path / "float"
    shutil.copytree(float_model, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors["model.layers.0.mlp.down_proj.bias"] = torch.zeros(SHAPE["hidden_size"])
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"unexpected tensor 'model.layers.0.mlp.down_proj.bias'"):
        load_model(ModelConfig.from_pretrained(folder, dtype="float32"), folder, CPU)


def test_one_kv_scale_for_k_and_v_runs_as_both(tiny_model, tmp_path):
    """vLLM's `self_attn.kv_scale` gives the fp8 cache the same scales, and outputs, as k_scale = v_scale."""
    scales = (0.03, 0.05)  # per layer; the tiny llama has two
    folders = {}
    for naming, suffixes in (("kv", ("kv_scale",)), ("k_and_v", ("k_scale", "v_scale"))):
        folders[naming] = folder = tmp_path / naming
        shutil.copytree(tiny_model("llama"), folder)
        tensors = load_file(folder / "model.safetensors")
        for layer, scale in enumerate(scales):
            tensors.update({f"model.layers.{layer}.self_attn.{suffix}": torch.tensor(scale) for suffix in suffixes})
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    prompt = [[5, 17, 99, 3, 250, 31, 7, 402, 11, 64]]
    logprobs = {}
    for naming, folder in folders.items():
        llm = LLM(str(folder), dtype="float32", kv_cache_dtype="fp8", max_model_len=32, num_kv_blocks=8, block_size=8)
        layers = llm.core.runner.model.attention_layers()
        assert [(a.k_scale, a.v_scale) for a in layers] == [pytest.approx((s, s)) for s in scales]
        assert all(a.kv_scales_from_checkpoint for a in layers)  # kept, not calibrated over at start-up
        logprobs[naming] = prompt_token_logprobs(llm, prompt)
    assert logprobs["kv"] == logprobs["k_and_v"]


def _hub_cache(root: Path, repo_id: str, files: dict[str, str]) -> None:
    """`files` laid out as huggingface_hub caches a download: blobs, a snapshot of symlinks to them, refs/main."""
    repo = root / f"models--{repo_id.replace('/', '--')}"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots" / commit).mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    for i, (name, text) in enumerate(files.items()):
        blob = repo / "blobs" / f"{i:040x}"
        blob.write_text(text)
        (repo / "snapshots" / commit / name).symlink_to(os.path.relpath(blob, repo / "snapshots" / commit))


def test_check_config_reads_a_hub_repo_from_the_local_cache(float_model, tmp_path):
    hf = json.loads((Path(float_model) / "config.json").read_text())
    gptq = {key: value for key, value in qc.gptq_config(4, 128, True, False).items() if key != "quant_method"}
    _hub_cache(tmp_path / "hub", "TheBloke/Old-GPTQ", {"config.json": json.dumps(hf),
                                                        "quantize_config.json": json.dumps(gptq)})
    _hub_cache(tmp_path / "hub", "org/float", {"config.json": json.dumps(hf)})
    _hub_cache(tmp_path / "hub", "org/bad-groups", {"config.json": json.dumps(
        {**hf, "quantization_config": qc.gptq_config(4, 128, True, False), "hidden_size": 96})})
    yaml = tmp_path / "kvbox.yaml"
    env = {"HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1"}
    yaml.write_text("models:\n" + "".join(f"  - {{name: {name}, source: {source}, device: cpu{extra}}}\n"
                                          for name, source, extra in (
                                              ("old", "TheBloke/Old-GPTQ", ""), ("float", "org/float", ""),
                                              ("uncached", "org/not-downloaded", ""),
                                              ("named", "org/not-downloaded-gptq", ", quantization: gptq"))))
    result = check_config(yaml, env)
    assert result.returncode == 0, result.stderr
    old, float_, uncached, named = result.stdout.splitlines()[1:]
    assert old.startswith("  old: quantization gptq 4-bit, group 128")
    assert float_ == "  float: quantization none, kv cache auto"
    for line, name in ((uncached, "uncached"), (named, "named")):  # a method named: checked once it is downloaded
        assert line == (f"  {name}: quantization read from the checkpoint when the engine downloads it (not in the "
                        "local Hugging Face cache), kv cache auto")

    yaml.write_text("models:\n  - {name: wrong, source: org/float, device: cpu, quantization: gptq}\n")
    result = check_config(yaml, env)
    assert result.returncode == 1
    assert "models[0].quantization" in result.stderr and "gptq" in result.stderr

    yaml.write_text("models:\n  - {name: bad, source: org/bad-groups, device: cpu}\n")
    result = check_config(yaml, env)
    assert result.returncode == 1
    assert ("models[0].source: quantization_config.group_size = 128: the groups do not divide qkv_proj's 96 inputs"
            in result.stderr)
