"""Weight-only quantized checkpoints (GPTQ, AWQ, compressed-tensors pack-quantized) against transformers running
their dequantized float32 weights, and the checks that refuse what kvbox cannot run.

Each checkpoint is written as its public tool writes it (`engine.tools.quantized_checkpoints`; compressed-tensors'
own library for its format). The canonical weights must equal the writer's dequantized weights exactly, the logits
must match transformers within LOGITS_ATOL, and greedy tokens must be identical.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from engine import LLM, SamplingParams
from engine.models.attention import AttentionMetadata
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.quantization.spec import QuantizationConfigError, check_linear_shapes, parse_quantization
from engine.tools import quantized_checkpoints as qc
from engine.kernels.reference import dequantize_wna16

CPU = torch.device("cpu")
LOGITS_ATOL = 1e-4  # float32 both sides on the same float32 weights; only the matmul order differs
# Wide enough for group size 128 on every linear: q 128, k/v 64 outputs; inputs 128 and 256.
SHAPE = dict(hidden_size=128, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=32)
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    return build_tiny_model("llama", tmp_path_factory.mktemp("float"), **SHAPE)


def prefill_logits(model, config: ModelConfig, token_ids: list[int]) -> torch.Tensor:
    n, block = len(token_ids), 16
    blocks = -(-n // block)
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(2, blocks, block, config.num_kv_heads, config.head_size)
    metadata = AttentionMetadata(slot_mapping=torch.arange(n),
                                 block_tables=torch.arange(blocks, dtype=torch.int32)[None],
                                 seq_lens=torch.tensor([n], dtype=torch.int32),
                                 query_start_loc=torch.tensor([0, n], dtype=torch.int32), max_query_len=n,
                                 max_seq_len=n)
    return model.compute_logits(model(torch.tensor(token_ids), torch.arange(n), metadata))


def ct_pack_writer(bits: int, group_size: int | None, symmetric: bool):
    """compressed-tensors' own quantizer and packer (what llm-compressor saves), and its own config serialization."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationConfig, QuantizationScheme
    from compressed_tensors.quantization.utils.helpers import calculate_qparams

    args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric,
                            strategy="group" if group_size else "channel", group_size=group_size)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)

    def layer(w: torch.Tensor):
        grouped = w.reshape(w.shape[0], -1, group_size or w.shape[1])  # [out, groups, size]
        scale, zero = calculate_qparams(grouped.amin(-1), grouped.amax(-1), args)
        state = {"weight": w, "weight_scale": scale.to(torch.bfloat16), "weight_zero_point": zero.to(torch.int8)}
        packed = PackedQuantizationCompressor.compress(state, scheme)
        # Its own unpacking, in float32 (with bfloat16 scales it would round the products to bfloat16).
        as_float32 = {**packed, "weight_scale": packed["weight_scale"].float()}
        return packed, PackedQuantizationCompressor.decompress(as_float32, scheme)["weight"]

    config = QuantizationConfig(config_groups={"group_0": scheme}, format="pack-quantized",
                                quantization_status="compressed", ignore=["lm_head"])
    # What ModelCompressor.update_config writes into config.json.
    as_saved = {"version": "0.0", "quant_method": "compressed-tensors", "sparsity_config": {},
                "transform_config": {}, **json.loads(config.model_dump_json(exclude=["quant_method"]))}
    return as_saved, layer


def ct_actorder_writer(bits: int, group_size: int):
    """llm-compressor's GPTQ with actorder "group": asymmetric groups of any input rows (weight_g_idx), packed by
    compressed-tensors' own packer (which has no act-order quantizer: the groups' min-max is auto-gptq's)."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    config = ct_pack_writer(bits, group_size, False)[0]
    config["config_groups"]["group_0"]["weights"]["actorder"] = "group"
    offset = 1 << (bits - 1)  # compressed-tensors stores signed values

    def layer(w: torch.Tensor):
        in_features = w.shape[1]
        g_idx = torch.empty(in_features, dtype=torch.int64)
        g_idx[torch.randperm(in_features, generator=torch.Generator().manual_seed(0))] = \
            torch.arange(in_features) // group_size
        scales, zeros = qc._group_qparams(w, g_idx, in_features // group_size, bits, False)  # [groups, out]
        s, z = scales.float()[g_idx].T, zeros[g_idx].T  # [out, in]
        q = torch.clamp(torch.round(w / s) + z, 0, 2 ** bits - 1).to(torch.int64)
        tensors = {"weight_packed": pack_to_int32((q - offset).to(torch.int8), bits),
                   "weight_scale": scales.T,  # float16: the model's dtype
                   "weight_zero_point": pack_to_int32((zeros - offset).T.to(torch.int8), bits, packed_dim=0),
                   "weight_shape": torch.tensor(w.shape), "weight_g_idx": g_idx.to(torch.int32)}
        return tensors, (q - z).float() * s

    return config, layer


FORMATS = {
    **{f"gptq-{bits}b-g{group}-{'sym' if sym else 'asym'}{'-actorder' if act else ''}": (
        qc.gptq_config(bits, group, sym, act), lambda w, b=bits, g=group, s=sym, a=act: qc.gptq_tensors(w, b, g, s, a))
       for bits, group, sym, act in [(4, 128, True, False), (4, 32, False, True), (8, 64, True, True),
                                     (8, -1, False, False), (4, -1, True, True)]},
    "awq-g64": (qc.awq_config(64), lambda w: qc.awq_tensors(w, 64)),
    "awq-g128": (qc.awq_config(128), lambda w: qc.awq_tensors(w, 128)),
}
# Built when written: compressed-tensors need not be installed where only the others run (the GPU machine).
CT_FORMATS = {"ct-w4a16-g32-sym": lambda: ct_pack_writer(4, 32, True),
              "ct-w4a16-g64-asym": lambda: ct_pack_writer(4, 64, False),
              "ct-w8a16-channel": lambda: ct_pack_writer(8, None, True),
              "ct-w8a16-g128-asym": lambda: ct_pack_writer(8, 128, False),
              "ct-w4a16-g32-asym-actorder": lambda: ct_actorder_writer(4, 32)}


def write_format(name: str, float_model: Path, out: Path) -> dict[str, torch.Tensor]:
    config, layer = FORMATS[name] if name in FORMATS else CT_FORMATS[name]()
    return qc.write_quantized(float_model, out, config, layer)


@pytest.mark.parametrize("name", [*FORMATS, *CT_FORMATS])
@torch.inference_mode()
def test_weight_only_checkpoint_runs_its_dequantized_weights(float_model, tmp_path, name):
    dequantized = write_format(name, float_model, tmp_path / "quantized")
    config = ModelConfig.from_pretrained(tmp_path / "quantized", dtype="float32")
    model = load_model(config, tmp_path / "quantized", CPU)
    # The packed weights unpack to exactly the weights the writer says they stand for.
    layer = model.model.layers[1]
    for module, parts in ((layer.self_attn.qkv_proj, ("q_proj", "k_proj", "v_proj")),
                          (layer.mlp.down_proj, ("down_proj",))):
        got = dequantize_wna16(module.qweight, module.scales, module.zeros, module.g_idx, model.quant_scheme.bits)
        prefix = "model.layers.1." + ("self_attn." if parts[0] != "down_proj" else "mlp.")
        assert torch.equal(got, torch.cat([dequantized[prefix + part + ".weight"] for part in parts])), name
        assert module.qweight.dtype == torch.int32 and not hasattr(module, "weight")

    reference_folder = qc.write_float(float_model, tmp_path / "reference", dequantized)
    reference = AutoModelForCausalLM.from_pretrained(reference_folder, dtype=torch.float32).eval()
    token_ids = torch.randint(0, config.vocab_size, (24,), generator=torch.Generator().manual_seed(0)).tolist()
    want = reference(torch.tensor([token_ids])).logits[0]
    torch.testing.assert_close(prefill_logits(model, config, token_ids), want, atol=LOGITS_ATOL, rtol=0)


def assert_greedy_matches_transformers(folder: Path, reference_folder: Path, label: str = "") -> None:
    """The quantized checkpoint's greedy tokens through `LLM` equal transformers' on the dequantized float one."""
    reference = AutoModelForCausalLM.from_pretrained(reference_folder, dtype=torch.float32).eval()
    llm = LLM(str(folder), dtype="float32", num_kv_blocks=64)
    prompts = [[5, 17, 99, 3], list(range(40, 70))]
    outputs = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                           use_tqdm=False)
    for ids, output in zip(prompts, outputs):
        input_ids = torch.tensor([ids])
        expected = reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                      max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
        assert output.outputs[0].token_ids == expected[0, len(ids):].tolist(), label


@pytest.mark.parametrize("name", ["gptq-4b-g32-asym-actorder", "awq-g64", "ct-w4a16-g64-asym"])
def test_greedy_tokens_match_transformers(float_model, tmp_path, name):
    dequantized = write_format(name, float_model, tmp_path / "quantized")
    assert_greedy_matches_transformers(tmp_path / "quantized", qc.write_float(float_model, tmp_path / "ref",
                                                                               dequantized), name)


def test_packed_weights_take_a_fraction_of_the_float_bytes(float_model, tmp_path):
    write_format("gptq-4b-g128-sym", float_model, tmp_path / "q")
    config = ModelConfig.from_pretrained(tmp_path / "q", dtype="float32")
    qkv = load_model(config, tmp_path / "q", CPU).model.layers[0].self_attn.qkv_proj
    packed = sum(t.numel() * t.element_size() for t in (qkv.qweight, qkv.scales, qkv.zeros, qkv.g_idx))
    assert packed < 0.2 * qkv.input_size * qkv.output_size * 4  # vs float32: 1/8 for the weight, plus metadata


@pytest.mark.parametrize("checkpoint, requested, key, value", [
    ({"quant_method": "bitsandbytes"}, None, "quantization_config.quant_method", "bitsandbytes"),
    ({**qc.gptq_config(3, 128, True, False)}, None, "quantization_config.bits", 3),
    ({**qc.gptq_config(4, 48, True, False)}, None, "quantization_config.group_size", 48),
    ({**qc.gptq_config(4, 128, True, False), "checkpoint_format": "gptq_v2"}, None,
     "quantization_config.checkpoint_format", "gptq_v2"),
    ({**qc.awq_config(128), "version": "gemv"}, None, "quantization_config.version", "gemv"),
    ({**qc.awq_config(128), "zero_point": False}, None, "quantization_config.zero_point", False),
    # gptqmodel's keys: another word size, a quantized LM head.
    ({**qc.gptq_config(4, 128, True, False), "pack_dtype": "int16"}, None, "quantization_config.pack_dtype", "int16"),
    ({**qc.gptq_config(4, 128, True, False), "lm_head": True}, None, "quantization_config.lm_head", True),
    ({**qc.gptq_config(4, 128, True, False), "dynamic": {"+:.*down_proj": {"bits": 8}, "-:.*o_proj": {}}}, None,
     "quantization_config.dynamic", ["+:.*down_proj"]),
    (qc.gptq_config(4, 128, True, False), "fp8", "quantization", "fp8"),
    (None, "fp4", "quantization", "fp4"),
])
def test_unsupported_settings_name_the_key_and_value(checkpoint, requested, key, value):
    with pytest.raises(QuantizationConfigError) as error:
        parse_quantization(checkpoint, requested)
    assert (error.value.key, error.value.value) == (key, value)
    assert f"{key} = {value!r}" in str(error.value)


def test_compressed_tensors_settings_are_checked():
    config, _ = ct_pack_writer(4, 32, True)
    config["config_groups"]["group_0"]["weights"]["num_bits"] = 2
    with pytest.raises(QuantizationConfigError, match=r"config_groups.group_0.weights.num_bits = 2"):
        parse_quantization(config, None)
    config["config_groups"]["group_0"]["weights"]["num_bits"] = 4
    config["ignore"] = ["lm_head", "model.layers.0.mlp.down_proj"]  # kvbox never quantizes the head
    assert parse_quantization(config, None).unquantized == ("model.layers.0.mlp.down_proj",)


# family -> (quantization_config, layer writer, the HF modules it leaves in float): compressed-tensors' ignore (exact
# names and "re:" patterns), AWQ's modules_to_not_convert (substrings), AutoRound's 16-bit extra_config, fp8's
# ignored_layers.
_QKV1 = tuple(f"model.layers.1.self_attn.{p}_proj" for p in "qkv")
PARTLY_FLOAT = {
    "qwen2-ct": ({**ct_pack_writer(4, 32, False)[0], "ignore": ["lm_head", "re:.*mlp\\.down_proj$", *_QKV1]},
                 ct_pack_writer(4, 32, False)[1], ("mlp.down_proj", *_QKV1)),
    "gemma2-awq": ({**qc.awq_config(64), "modules_to_not_convert": ["o_proj"]}, lambda w: qc.awq_tensors(w, 64),
                   ("o_proj",)),
    "llama-autoround": ({**qc.gptq_config(4, 32, True, True), "quant_method": "auto-round",
                         "packing_format": "auto_round:auto_gptq",
                         "extra_config": {"model.layers.0.mlp.gate_proj": {"bits": 16, "data_type": "float"},
                                          "model.layers.0.mlp.up_proj": {"bits": 16, "data_type": "float"}}},
                        lambda w: qc.gptq_tensors(w, 4, 32, True, False), ("layers.0.mlp.gate_proj",
                                                                           "layers.0.mlp.up_proj")),
    "llama-gptqmodel": ({**qc.gptq_config(8, 64, False, False), "dynamic": {r"-:.*\.1\.mlp\..*": {}}},
                        lambda w: qc.gptq_tensors(w, 8, 64, False, False), ("layers.1.mlp.gate_proj",
                                                                            "layers.1.mlp.up_proj",
                                                                            "layers.1.mlp.down_proj")),
    "llama-fp8": ({**qc.fp8_config(False), "ignored_layers": ["model.layers.1.mlp.down_proj"]},
                  lambda w: qc.fp8_tensors(w, False, None), ("layers.1.mlp.down_proj",)),
}


@pytest.mark.parametrize("name", list(PARTLY_FLOAT))
@torch.inference_mode()
def test_linears_a_checkpoint_leaves_in_float_run_in_float(tiny_model, tmp_path, name):
    config_dict, writer, keep = PARTLY_FLOAT[name]
    folder = tiny_model(name.split("-")[0], **SHAPE)
    dequantized = qc.write_quantized(folder, tmp_path / "q", config_dict, writer, keep_float=keep)
    config = ModelConfig.from_pretrained(tmp_path / "q", dtype="float32")
    model = load_model(config, tmp_path / "q", CPU)
    floats = {name for name, module in model.named_modules() if hasattr(module, "weight")
              and module.weight.dtype == torch.float32 and name.endswith("_proj")}
    merged = {"q_proj": "qkv_proj", "gate_proj": "gate_up_proj", "up_proj": "gate_up_proj"}
    want = {n.rsplit(".", 1)[0] + "." + merged.get(n.rsplit(".", 1)[1], n.rsplit(".", 1)[1])
            for n in (name[:-len(".weight")] for name in dequantized if name.endswith("_proj.weight"))
            if n.endswith(keep) and not n.endswith(("k_proj", "v_proj"))}
    assert floats == want and floats
    reference = AutoModelForCausalLM.from_pretrained(qc.write_float(folder, tmp_path / "ref", dequantized),
                                                     dtype=torch.float32).eval()
    token_ids = list(range(5, 29))
    got, want_logits = prefill_logits(model, config, token_ids), reference(torch.tensor([token_ids])).logits[0]
    if name.endswith("fp8"):  # the other linears quantize their activations: the float one is compared alone
        down, x = model.model.layers[1].mlp.down_proj, torch.randn(3, SHAPE["intermediate_size"])
        torch.testing.assert_close(down(x), x @ dequantized["model.layers.1.mlp.down_proj.weight"].T, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(got, want_logits, atol=LOGITS_ATOL, rtol=0)


def test_a_merged_linear_whose_parts_disagree_is_refused(tiny_model, tmp_path):
    config, writer = ct_pack_writer(4, 32, True)
    config["ignore"] = ["lm_head", "model.layers.1.self_attn.q_proj"]
    folder = tiny_model("llama", **SHAPE)
    qc.write_quantized(folder, tmp_path / "q", config, writer, keep_float=("layers.1.self_attn.q_proj",))
    with pytest.raises(ValueError, match=r"leaves model.layers.1.self_attn.q_proj in float but not "
                                         r"model.layers.1.self_attn.k_proj, model.layers.1.self_attn.v_proj"):
        load_model(ModelConfig.from_pretrained(tmp_path / "q", dtype="float32"), tmp_path / "q", CPU)


def test_a_group_size_that_does_not_divide_fails_at_load_naming_the_model(tiny_model, tmp_path):
    folder = tiny_model("llama")  # hidden size 64: group size 128 cannot divide it
    qc.write_quantized(folder, tmp_path / "q", qc.gptq_config(4, 128, True, False),
                       lambda w: qc.gptq_tensors(w, 4, -1, True, False))
    with pytest.raises(QuantizationConfigError, match=rf"quantization_config.group_size = 128: the groups do not "
                       rf"divide qkv_proj's 64 inputs .*\(model {tmp_path / 'q'}\)"):
        load_model(ModelConfig.from_pretrained(tmp_path / "q"), tmp_path / "q", CPU)
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    config["quantization_config"]["bits"] = 2
    (tmp_path / "q" / "config.json").write_text(json.dumps(config))
    with pytest.raises(QuantizationConfigError, match=rf"bits = 2: .*\(model {tmp_path / 'q'}\)"):
        load_model(ModelConfig.from_pretrained(tmp_path / "q"), tmp_path / "q", CPU)


def test_check_config_shows_the_checkpoints_method_and_refuses_what_cannot_run(float_model, tmp_path, capsys):
    from appliance.cli import main

    write_format("gptq-4b-g32-asym-actorder", float_model, tmp_path / "gptq")
    config = tmp_path / "config.yaml"
    config.write_text("models:\n  - name: m\n    source: gptq\n    device: cpu\n")
    assert main(["check-config", str(config)]) == 0
    assert "m: quantization gptq 4-bit, group 32, zero points, act-order, weight-only" in capsys.readouterr().out

    # Online quantization names the one linear it leaves in float, as the engine's scheme does.
    layers = json.loads((float_model / "config.json").read_text())["num_hidden_layers"]
    config.write_text(f"models:\n  - name: m\n    source: {float_model}\n    device: cpu\n    quantization: fp8\n")
    assert main(["check-config", str(config)]) == 0
    assert (f"m: quantization fp8 (online) 8-bit, per-channel, dynamic per-token activations, float: "
            f"model.layers.{layers - 1}.mlp.down_proj") in capsys.readouterr().out

    config.write_text("models:\n  - name: m\n    source: gptq\n    quantization: int8\n")
    assert main(["check-config", str(config)]) == 1
    assert "models[0].quantization: int8 quantizes a float checkpoint, but this one is already quantized (gptq" in \
        capsys.readouterr().err
    checkpoint = json.loads((tmp_path / "gptq" / "config.json").read_text())
    checkpoint["quantization_config"]["bits"] = 3
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(checkpoint))
    config.write_text("models:\n  - name: m\n    source: gptq\n")
    assert main(["check-config", str(config)]) == 1
    assert "models[0].source: quantization_config.bits = 3: kvbox supports 4, 8" in capsys.readouterr().err


@pytest.mark.parametrize("checkpoint, key, value", [
    (qc.gptq_config(4, 32, True, False), "quantization_config.bits", 4),  # k/v's 36 outputs: qzeros' words
    (qc.awq_config(32), "quantization_config.bits", 4),
    (ct_pack_writer(4, 32, False)[0], "quantization_config.config_groups.group_0.weights.num_bits", 4),
    (ct_pack_writer(8, 64, True)[0], "quantization_config.config_groups.group_0.weights.group_size", 64),
    ({**qc.fp8_config(False), "weight_block_size": [64, 64]}, "quantization_config.weight_block_size", [64, 64]),
    (ct_pack_writer(4, 32, True)[0], None, None),  # symmetric: nothing packed along the outputs
    (qc.fp8_config(True), None, None),
])
def test_shapes_the_scheme_cannot_split_name_the_key(checkpoint, key, value):
    """hidden 128, intermediate 160 (not a multiple of 64), q 128, k/v 36 (not a multiple of 8 or 64)."""
    scheme = parse_quantization(checkpoint, None)
    if key is None:
        check_linear_shapes(scheme, 2, 128, 160, 128, 36)
        return
    with pytest.raises(QuantizationConfigError) as error:
        check_linear_shapes(scheme, 2, 128, 160, 128, 36)
    assert (error.value.key, error.value.value) == (key, value)


def test_only_quantized_linears_must_split_into_groups():
    """down_proj's 160 inputs do not split into groups of 64: refused unless every layer leaves it in float."""
    scheme = parse_quantization({**qc.gptq_config(4, 64, True, False), "dynamic": {r"-:.*\.0\.mlp\.down_proj": {}}},
                                None)
    with pytest.raises(QuantizationConfigError, match="the groups do not divide down_proj's 160 inputs"):
        check_linear_shapes(scheme, 2, 128, 160, 128, 64)
    check_linear_shapes(scheme, 1, 128, 160, 128, 64)


# The modules each format leaves in float: every layer's down_proj, whose 160 inputs groups of 64 cannot split.
FLOAT_DOWN_PROJ = {
    "ct": lambda: ({**ct_pack_writer(4, 64, False)[0], "ignore": ["lm_head", "re:.*mlp\\.down_proj$"]},
                   ct_pack_writer(4, 64, False)[1]),
    "awq": lambda: ({**qc.awq_config(64), "modules_to_not_convert": ["down_proj"]}, lambda w: qc.awq_tensors(w, 64)),
    "gptqmodel": lambda: ({**qc.gptq_config(4, 64, True, False), "dynamic": {r"-:.*\.down_proj": {}}},
                          lambda w: qc.gptq_tensors(w, 4, 64, True, False)),
}


@pytest.mark.parametrize("name", list(FLOAT_DOWN_PROJ))
@torch.inference_mode()
def test_linears_left_in_float_need_not_split_into_groups(tiny_model, tmp_path, capsys, name):
    from appliance.cli import main

    config_dict, writer = FLOAT_DOWN_PROJ[name]()
    folder = tiny_model("llama", **{**SHAPE, "intermediate_size": 160})
    dequantized = qc.write_quantized(folder, tmp_path / "q", config_dict, writer, keep_float=("mlp.down_proj",))
    config = ModelConfig.from_pretrained(tmp_path / "q", dtype="float32")
    model = load_model(config, tmp_path / "q", CPU)
    reference = AutoModelForCausalLM.from_pretrained(qc.write_float(folder, tmp_path / "ref", dequantized),
                                                     dtype=torch.float32).eval()
    token_ids = list(range(5, 29))
    torch.testing.assert_close(prefill_logits(model, config, token_ids),
                               reference(torch.tensor([token_ids])).logits[0], atol=LOGITS_ATOL, rtol=0)
    yaml = tmp_path / "config.yaml"
    yaml.write_text(f"models:\n  - name: m\n    source: {tmp_path / 'q'}\n    device: cpu\n")
    assert main(["check-config", str(yaml)]) == 0, capsys.readouterr().err


def test_check_config_refuses_a_group_size_that_does_not_divide(tiny_model, tmp_path, capsys):
    from appliance.cli import main

    folder = tmp_path / "gptq"
    folder.mkdir()
    hf = json.loads((Path(tiny_model("llama")) / "config.json").read_text())  # hidden size 64
    (folder / "config.json").write_text(json.dumps({**hf, "quantization_config": qc.gptq_config(4, 128, True, False)}))
    config = tmp_path / "config.yaml"
    config.write_text(f"models:\n  - name: m\n    source: {folder}\n    device: cpu\n")
    assert main(["check-config", str(config)]) == 1
    assert ("models[0].source: quantization_config.group_size = 128: the groups do not divide qkv_proj's 64 inputs"
            in capsys.readouterr().err)


def test_lora_adapters_on_a_quantized_base_match_peft_on_its_dequantized_weights(float_model, tmp_path):
    from test_lora import ADAPTERS, check_workload, lora_llm, make_adapter, peft_reference

    dequantized = write_format("awq-g64", float_model, tmp_path / "quantized")
    reference_folder = qc.write_float(float_model, tmp_path / "reference", dequantized)
    adapters = {name: make_adapter(reference_folder, tmp_path / name, seed=i, **ADAPTERS[name])
                for i, name in enumerate(("attn", "mlp"))}
    llm = lora_llm(str(tmp_path / "quantized"), adapters)
    prompt_ids = [llm.tokenizer.encode(text) for text in ("Hello there", "def fibonacci(n):")]
    references = {name: peft_reference(reference_folder, adapters.get(name), prompt_ids) for name in ("attn", "mlp")}
    check_workload(llm, [(0, "attn"), (1, "mlp"), (1, "attn")], prompt_ids, references)


@pytest.mark.parametrize("quantization", ["gptq-w4a16", "awq-w4a16", "fp8", "int8", "int8-asym"])
def test_dummy_weights_fill_every_format_at_a_realistic_spread(quantization):
    """`load_format: dummy` with a checkpoint's quantization_config (what the benchmarks run): packed tensors filled,
    processed like a real load, weights about as large as the float dummy's, finite logits, fewer bytes."""
    from bench.common import QUANTIZATIONS, SHAPES, shape_folder
    from engine.models.loader import weight_bytes

    base = {**SHAPES["tiny-llama"], **SHAPE, "num_hidden_layers": 1}
    models = {}
    for name, quantization_config in (("float", None), (quantization, QUANTIZATIONS[quantization])):
        folder = shape_folder("tiny-llama", {**base, "quantization_config": quantization_config})
        config = ModelConfig.from_pretrained(folder, dtype="float32")
        models[name] = (load_model(config, folder, CPU, "dummy"), config)
    (model, config), (float_model, _) = models[quantization], models["float"]
    assert model.quant_scheme is not None and weight_bytes(model) < weight_bytes(float_model)
    down = model.model.layers[0].mlp.down_proj
    weight = down.quant_method.apply(down, torch.eye(down.input_size), None)  # the dequantized weight, transposed
    float_std = float(float_model.model.layers[0].mlp.down_proj.weight.std())
    assert 0.5 < float(weight.std()) / float_std < 2, float(weight.std())
    assert torch.isfinite(prefill_logits(model, config, list(range(10)))).all()


def test_gptq_without_g_idx_loads_when_not_act_order(float_model, tmp_path):
    """Older GPTQ checkpoints save no g_idx without desc_act; act-order ones must have it."""
    from safetensors.torch import load_file, save_file

    for act_order in (False, True):
        folder = tmp_path / f"act{act_order}"
        qc.write_quantized(float_model, folder, qc.gptq_config(4, 32, True, act_order),
                           lambda w: qc.gptq_tensors(w, 4, 32, True, act_order))
        with_g_idx = load_model(ModelConfig.from_pretrained(folder, dtype="float32"), folder, CPU)
        tensors = load_file(folder / "model.safetensors")
        save_file({k: v for k, v in tensors.items() if not k.endswith("g_idx")}, folder / "model.safetensors")
        if act_order:
            with pytest.raises(ValueError, match="checkpoint is missing .*g_idx"):
                load_model(ModelConfig.from_pretrained(folder, dtype="float32"), folder, CPU)
            continue
        model = load_model(ModelConfig.from_pretrained(folder, dtype="float32"), folder, CPU)
        for got, want in zip(model.buffers(), with_g_idx.buffers()):
            assert torch.equal(got, want)
