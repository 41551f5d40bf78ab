"""Intel AutoRound checkpoints (`quant_method: auto-round`): written as AutoRound's exporter saves them (its
quantization_config keys, and the tensors of the layout its `packing_format` names: auto-gptq's for
auto_round:auto_gptq, AutoAWQ's GEMM for auto_round:auto_awq), they run as the GPTQ / AWQ methods do, on the
weights they stand for; settings kvbox cannot run are refused by key.
"""

from __future__ import annotations

import pytest
import torch
from test_quantization import float_model, prefill_logits  # noqa: F401 (a fixture)
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.quantization.spec import QuantizationConfigError, parse_quantization
from engine.tools import quantized_checkpoints as qc

CPU = torch.device("cpu")
LOGITS_ATOL = 1e-4


def auto_round_config(bits: int, group_size: int, sym: bool, packing_format: str) -> dict:
    """config.json's quantization_config as AutoRound 0.5+ saves it (`save_quantized_as_autoround`)."""
    return {"bits": bits, "group_size": group_size, "sym": sym, "data_type": "int", "act_bits": 16,
            "enable_quanted_input": True, "enable_minmax_tuning": True, "seqlen": 2048, "batch_size": 8,
            "scale_dtype": "torch.float16", "lr": 0.005, "minmax_lr": 0.005, "gradient_accumulate_steps": 1,
            "iters": 200, "amp": True, "nsamples": 128, "low_gpu_mem_usage": False, "enable_norm_bias_tuning": False,
            "dataset": "NeelNanda/pile-10k", "autoround_version": "0.5.1", "block_name_to_quantize": None,
            "quant_method": "auto-round", "packing_format": packing_format}


FORMATS = {
    "gptq-4b-g128-sym": (auto_round_config(4, 128, True, "auto_round:auto_gptq"),
                         lambda w: qc.gptq_tensors(w, 4, 128, True, False)),
    "gptq-8b-g32-asym": (auto_round_config(8, 32, False, "auto_round:auto_gptq"),
                         lambda w: qc.gptq_tensors(w, 8, 32, False, False)),
    "awq-4b-g64": (auto_round_config(4, 64, False, "auto_round:auto_awq"), lambda w: qc.awq_tensors(w, 64)),
}


@pytest.mark.parametrize(("config", "layout", "bits", "group_size", "symmetric"), [
    (auto_round_config(4, 128, True, "auto_round:auto_gptq"), "gptq", 4, 128, True),
    (auto_round_config(8, -1, False, "auto_round:auto_gptq"), "gptq", 8, -1, False),
    (auto_round_config(4, 32, True, "auto_round:auto_awq"), "awq", 4, 32, False),
    # AutoRound before 0.5: its own quant_method and the format under `backend`.
    ({"bits": 4, "group_size": 128, "sym": True, "data_type": "int", "quant_method": "intel/auto-round",
      "backend": "auto_round:gptq:exllamav2"}, "gptq", 4, 128, True),
])
def test_configs_as_autoround_writes_them(config, layout, bits, group_size, symmetric):
    scheme = parse_quantization(config, None)
    assert (scheme.method, scheme.layout, scheme.bits, scheme.group_size, scheme.symmetric, scheme.act_order) == (
        "auto-round", layout, bits, group_size, symmetric, False)


@pytest.mark.parametrize(("changes", "key", "value"), [
    ({"packing_format": "auto_round"}, "quantization_config.packing_format", "auto_round"),
    ({"packing_format": "auto_round:fp8"}, "quantization_config.packing_format", "auto_round:fp8"),
    ({"act_bits": 8}, "quantization_config.act_bits", 8),
    ({"data_type": "nv_fp"}, "quantization_config.data_type", "nv_fp"),
    ({"bits": 2}, "quantization_config.bits", 2),
    ({"extra_config": {"model.layers.0.mlp.down_proj": {"bits": 8}}}, "quantization_config.extra_config",
     ["model.layers.0.mlp.down_proj"]),
])
def test_what_cannot_run_is_refused_by_key(changes, key, value):
    with pytest.raises(QuantizationConfigError) as error:
        parse_quantization({**auto_round_config(4, 128, True, "auto_round:auto_gptq"), **changes}, None)
    assert (error.value.key, error.value.value) == (key, value)


def test_an_unquantized_lm_head_is_accepted():
    config = {**auto_round_config(4, 128, True, "auto_round:auto_gptq"), "extra_config": {"lm_head": {"bits": 16}}}
    assert parse_quantization(config, None).layout == "gptq"


@pytest.mark.parametrize("name", list(FORMATS))
@torch.inference_mode()
def test_checkpoint_runs_its_dequantized_weights(float_model, tmp_path, name):  # noqa: F811
    config_dict, layer = FORMATS[name]
    dequantized = qc.write_quantized(float_model, tmp_path / "quantized", config_dict, layer)
    config = ModelConfig.from_pretrained(tmp_path / "quantized", dtype="float32")
    model = load_model(config, tmp_path / "quantized", CPU)
    assert model.quant_scheme.method == "auto-round"
    reference = AutoModelForCausalLM.from_pretrained(qc.write_float(float_model, tmp_path / "ref", dequantized),
                                                     dtype=torch.float32).eval()
    token_ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    want = reference(torch.tensor([token_ids])).logits[0]
    torch.testing.assert_close(prefill_logits(model, config, token_ids), want, atol=LOGITS_ATOL, rtol=0)


@pytest.mark.parametrize("name", ["gptq-4b-g128-sym", "awq-4b-g64"])
def test_greedy_tokens_match_transformers(float_model, tmp_path, name):  # noqa: F811
    config_dict, layer = FORMATS[name]
    dequantized = qc.write_quantized(float_model, tmp_path / "quantized", config_dict, layer)
    reference = AutoModelForCausalLM.from_pretrained(qc.write_float(float_model, tmp_path / "ref", dequantized),
                                                     dtype=torch.float32).eval()
    llm = LLM(str(tmp_path / "quantized"), dtype="float32", num_kv_blocks=64)
    prompts = [[5, 17, 99, 3], list(range(40, 70))]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True), use_tqdm=False)
    for ids, output in zip(prompts, outputs):
        input_ids = torch.tensor([ids])
        expected = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=8, min_new_tokens=8)
        assert output.outputs[0].token_ids == expected[0, len(ids):].tolist(), name
