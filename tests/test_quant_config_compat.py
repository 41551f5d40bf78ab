"""quantization_config keys real checkpoints carry beyond the basic ones, and the `quantization` option's
checkpoint method names (vLLM's): each checkpoint is written as its tool writes it, loaded through the loader or
`LLM`, and compared with transformers on its dequantized weights (or, for FP8 activations, with the same checkpoint
under the key kvbox already read); what kvbox cannot run is refused with the key and its value.
"""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.config import EngineConfig, EngineConfigError
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.quantization.spec import QuantizationConfigError, parse_quantization
from engine.tools import quantized_checkpoints as qc
from tests.test_quantization import LOGITS_ATOL, SHAPE, ct_pack_writer, prefill_logits
from tests.test_quantization_w8a8 import ct_config

CPU = torch.device("cpu")
TOKENS = list(range(5, 29))


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    return build_tiny_model("llama", tmp_path_factory.mktemp("float"), **SHAPE)


def load(folder):
    config = ModelConfig.from_pretrained(folder, dtype="float32")
    return load_model(config, folder, CPU), config


def float_linears(model) -> set[str]:
    return {name for name, module in model.named_modules()
            if name.endswith("_proj") and hasattr(module, "weight") and module.weight.dtype == torch.float32}


def assert_matches_transformers(float_model, tmp_path, folder, dequantized):
    model, config = load(folder)
    reference = AutoModelForCausalLM.from_pretrained(qc.write_float(float_model, tmp_path / "ref", dequantized),
                                                     dtype=torch.float32).eval()
    want = reference(torch.tensor([TOKENS])).logits[0]
    torch.testing.assert_close(prefill_logits(model, config, TOKENS), want, atol=LOGITS_ATOL, rtol=0)
    return model


def refusal(checkpoint, requested=None) -> str:
    with pytest.raises(QuantizationConfigError) as error:
        parse_quantization(checkpoint, requested)
    return str(error.value)


@torch.inference_mode()
def test_fp8_modules_to_not_convert_keeps_the_same_linears_float_as_ignored_layers(float_model, tmp_path):
    """transformers' FineGrainedFP8 key: a module's name, a parent of it or its last parts; a router named
    mlp.gate is no prefix of mlp.gate_proj, and layers.1 none of layers.1x."""
    writer = lambda w: qc.fp8_tensors(w, False, None)  # noqa: E731
    keep = ("layers.1.mlp.gate_proj", "layers.1.mlp.up_proj", "layers.1.mlp.down_proj", "layers.0.self_attn.o_proj")
    hf = {**qc.fp8_config(False), "fmt": "e4m3",
          "modules_to_not_convert": ["lm_head", "model.layers.1.mlp", "layers.0.self_attn.o_proj",
                                     "model.layers.0.mlp.gate"]}
    qc.write_quantized(float_model, tmp_path / "hf", hf, writer, keep_float=keep)
    vllm = {**qc.fp8_config(False), "ignored_layers": [f"model.{name}" for name in keep]}
    qc.write_quantized(float_model, tmp_path / "vllm", vllm, writer, keep_float=keep)
    model, config = load(tmp_path / "hf")
    reference, _ = load(tmp_path / "vllm")
    assert float_linears(model) == float_linears(reference) == {
        "model.layers.1.mlp.gate_up_proj", "model.layers.1.mlp.down_proj", "model.layers.0.self_attn.o_proj"}
    assert torch.equal(prefill_logits(model, config, TOKENS), prefill_logits(reference, config, TOKENS))


def test_fp8_settings_vllm_refuses_are_refused():
    assert refusal({**qc.fp8_config(False), "fmt": "e5m2"}) == \
        "quantization_config.fmt = 'e5m2': kvbox supports 'e4m3'"
    assert refusal({**qc.fp8_config(True), "weight_block_size": [128, 128]}) == (
        "quantization_config.activation_scheme = 'static': block-scaled weights (weight_block_size) run with dynamic "
        "activations only")
    assert parse_quantization({**qc.fp8_config(False), "weight_block_size": [128, 128]}, None).block_size == (128, 128)


@torch.inference_mode()
def test_gptq_linears_outside_modules_in_block_to_quantize_run_in_float(float_model, tmp_path):
    listed = [["self_attn.k_proj", "self_attn.v_proj", "self_attn.q_proj"], ["self_attn.o_proj"], ["mlp.up_proj"],
              ["mlp.gate_proj"]]  # gptqmodel's steps; down_proj was left out
    config = {**qc.gptq_config(4, 32, False, True), "modules_in_block_to_quantize": listed}
    dequantized = qc.write_quantized(float_model, tmp_path / "q", config,
                                     lambda w: qc.gptq_tensors(w, 4, 32, False, True), keep_float=("mlp.down_proj",))
    model = assert_matches_transformers(float_model, tmp_path, tmp_path / "q", dequantized)
    assert float_linears(model) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert model.quant_scheme.describe().endswith(r"float: re:(?!.*(?:self_attn\.k_proj|self_attn\.v_proj|"
                                                  r"self_attn\.q_proj|self_attn\.o_proj|mlp\.up_proj|mlp\.gate_proj))")
    every = [*listed, ["mlp.down_proj"]]
    assert parse_quantization({**config, "modules_in_block_to_quantize": every}, None).unquantized == ()
    assert refusal({**config, "modules_in_block_to_quantize": "mlp.down_proj"}) == (
        "quantization_config.modules_in_block_to_quantize = 'mlp.down_proj': expected a list of module names, or of "
        "lists of them")


def split_groups(config: dict, *targets: list[str]) -> dict:
    """llm-compressor's config for a recipe that names the linears by pattern, one group per targets list, the format
    on each group (mixed-precision's layout) and none at the top."""
    config = copy.deepcopy(config)
    (scheme,) = config["config_groups"].values()
    scheme["format"] = config.pop("format")
    config["config_groups"] = {f"group_{i}": {**scheme, "targets": list(t)} for i, t in enumerate(targets)}
    return config


@torch.inference_mode()
def test_compressed_tensors_groups_of_one_scheme_with_regex_targets(float_model, tmp_path):
    """Two groups of one scheme, attention and gate/up by pattern: down_proj, which no target names, stays float."""
    config, writer = ct_pack_writer(4, 32, False)
    config = split_groups(config, [r"re:.*self_attn\.(q|k|v|o)_proj$"],
                          ["re:.*mlp.gate_proj", "re:.*mlp.up_proj"])
    dequantized = qc.write_quantized(float_model, tmp_path / "q", config, writer, keep_float=("mlp.down_proj",))
    model = assert_matches_transformers(float_model, tmp_path, tmp_path / "q", dequantized)
    assert float_linears(model) == {"model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj"}
    assert model.quant_scheme.weights_at == "config_groups.group_0.weights."


def test_compressed_tensors_format_is_read_from_the_groups_or_inferred():
    fp8 = ct_config("float", "channel", False)
    no_format = {key: value for key, value in fp8.items() if key != "format"}
    assert parse_quantization(no_format, None).layout == "fp8"
    assert parse_quantization({**fp8, "format": "mixed-precision"}, None).layout == "fp8"
    assert parse_quantization({**ct_config("int", "channel", False), "format": None}, None).layout == "int8"
    pack = ct_pack_writer(8, None, True)[0]
    assert parse_quantization({**pack, "format": None}, None).layout == "pack"
    grouped = split_groups(pack, ["Linear"])
    assert parse_quantization(grouped, None).layout == "pack"
    grouped["config_groups"]["group_0"]["format"] = "dense"
    assert refusal(grouped) == ("quantization_config.config_groups.group_0.format = 'dense': kvbox supports "
                                "'pack-quantized', 'int-quantized', 'float-quantized', 'naive-quantized'")


def test_compressed_tensors_features_kvbox_cannot_run_are_refused():
    fp8 = ct_config("float", "channel", False)
    sparse = {"format": "sparse-24-bitmask", "sparsity_structure": "2:4", "targets": ["Linear"], "ignore": ["lm_head"],
              "global_sparsity": 0.4}
    assert refusal({**fp8, "sparsity_config": sparse}) == ("quantization_config.sparsity_config.format = "
                                                           "'sparse-24-bitmask': kvbox runs dense weights only (no "
                                                           "2:4 or other sparse formats)")
    assert parse_quantization({**fp8, "sparsity_config": {**sparse, "format": "dense"}}, None).layout == "fp8"
    transform = {"config_groups": {"R1": {"type": "hadamard", "apply": [{"targets": ["Linear"], "location": "input"}]}}}
    assert refusal({**fp8, "transform_config": transform}) == (
        f"quantization_config.transform_config = {transform!r}: kvbox does not apply compressed-tensors transforms "
        "(Hadamard or other rotations of the weights and activations)")

    two = split_groups(fp8, ["re:.*self_attn.*"], ["re:.*mlp.*"])
    two["config_groups"]["group_1"]["weights"] = {**two["config_groups"]["group_1"]["weights"], "strategy": "tensor"}
    assert refusal(two) == ("quantization_config.config_groups = ['group_0', 'group_1']: kvbox runs one scheme for "
                            "every linear, but group_1 differ from group_0")
    classes = copy.deepcopy(fp8)
    classes["config_groups"]["group_0"]["targets"] = ["LlamaDecoderLayer"]
    assert refusal(classes) == ("quantization_config.config_groups.group_0.targets = ['LlamaDecoderLayer']: kvbox "
                                "quantizes decoder linears only: targets must be Linear, module names or re: patterns")
    outputs = copy.deepcopy(fp8)
    outputs["config_groups"]["group_0"]["output_activations"] = {"num_bits": 8, "type": "float"}
    assert refusal(outputs).startswith("quantization_config.config_groups.group_0.output_activations = {'num_bits': "
                                       "8, 'type': 'float'}: kvbox quantizes no linear's outputs")


def test_quantization_may_name_the_checkpoints_own_method(float_model, tmp_path):
    """vLLM's `LLM(model, quantization="gptq_marlin")` on a GPTQ checkpoint: the same tokens as transformers on its
    dequantized weights; a method the checkpoint does not declare is refused naming both."""
    dequantized = qc.write_quantized(float_model, tmp_path / "q", qc.gptq_config(4, 32, True, False),
                                     lambda w: qc.gptq_tensors(w, 4, 32, True, False))
    reference = AutoModelForCausalLM.from_pretrained(qc.write_float(float_model, tmp_path / "ref", dequantized),
                                                     dtype=torch.float32).eval()
    llm = LLM(str(tmp_path / "q"), dtype="float32", num_kv_blocks=32, quantization="gptq_marlin")
    output = llm.generate([TOKENS], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    expected = reference.generate(torch.tensor([TOKENS]), attention_mask=torch.ones(1, len(TOKENS), dtype=torch.long),
                                  do_sample=False, max_new_tokens=6, min_new_tokens=6)
    assert output[0].outputs[0].token_ids == expected[0, len(TOKENS):].tolist()

    config = ModelConfig.from_pretrained(tmp_path / "q", dtype="float32")
    with pytest.raises(QuantizationConfigError) as error:
        load_model(config, tmp_path / "q", CPU, quantization="awq_marlin")
    assert str(error.value) == (
        "quantization = 'awq_marlin': the checkpoint's quantization_config.quant_method is 'gptq', not awq (gptq "
        f"4-bit, group 32, weight-only); leave quantization unset or set it to gptq (model {tmp_path / 'q'})")
    with pytest.raises(QuantizationConfigError) as error:
        load_model(ModelConfig.from_pretrained(float_model, dtype="float32"), float_model, CPU,
                   quantization="compressed-tensors")
    assert str(error.value) == (
        "quantization = 'compressed-tensors': compressed-tensors is a checkpoint's own method, but this checkpoint is "
        "not quantized (its config.json has no quantization_config); fp8 or int8 quantize a float checkpoint at load "
        f"(model {float_model})")


def test_every_method_name_is_accepted_where_it_matches():
    auto_round = {**qc.gptq_config(4, 128, True, False), "quant_method": "intel/auto-round",
                  "backend": "auto_round:gptq:exllamav2"}
    fp8 = qc.fp8_config(False)
    for requested, checkpoint in [("gptq", qc.gptq_config(4, 128, True, False)), ("awq", qc.awq_config(128)),
                                  ("awq_marlin", qc.awq_config(128)), ("auto-round", auto_round), ("fp8", fp8),
                                  ("compressed-tensors", ct_config("int", "channel", False)),
                                  ("gguf", {"quant_method": "gguf", "types": {"Q4_0": 7}})]:
        assert parse_quantization(checkpoint, requested) == parse_quantization(checkpoint, None), requested
    assert refusal(fp8, "int8").startswith("quantization = 'int8': int8 quantizes a float checkpoint, but this one is "
                                           "already quantized (fp8 8-bit")
    assert refusal(None, "bitsandbytes") == (
        "quantization = 'bitsandbytes': expected one of none, fp8, int8 (quantize a float checkpoint at load) or the "
        "checkpoint's own method: gptq, awq, compressed-tensors, fp8, auto-round, gguf, gptq_marlin, awq_marlin")
    EngineConfig(model="m", quantization="awq_marlin")
    with pytest.raises(EngineConfigError, match="quantization: expected null or one of none, fp8, int8, gptq, "
                                                "gptq_marlin, awq, awq_marlin, compressed-tensors, auto-round, gguf, "
                                                "got 'bitsandbytes'"):
        EngineConfig(model="m", quantization="bitsandbytes")


def test_check_config_takes_the_checkpoints_method_name(float_model, tmp_path, capsys):
    from appliance.cli import main

    qc.write_quantized(float_model, tmp_path / "awq", qc.awq_config(64), lambda w: qc.awq_tensors(w, 64))
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  - name: m\n    source: awq\n    device: cpu\n    quantization: awq\n")
    assert main(["check-config", str(config)]) == 0
    assert "m: quantization awq 4-bit, group 64, zero points, weight-only" in capsys.readouterr().out
    config.write_text("models:\n  - name: m\n    source: awq\n    device: cpu\n    quantization: gptq\n")
    assert main(["check-config", str(config)]) == 1
    assert ("models[0].quantization: the checkpoint's quantization_config.quant_method is 'awq', not gptq" in
            capsys.readouterr().err)
