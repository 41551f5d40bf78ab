"""Block-scaled FP8 checkpoints (compressed-tensors' FP8_BLOCK as llm-compressor writes it, and vLLM / DeepSeek-style
`quant_method: fp8` with `weight_block_size` and `weight_scale_inv`) against transformers on their dequantized float32
weights, and compressed-tensors FP8 with one weight scale per tensor against its fake-quantized reference.

kvbox runs block-scaled weights weight-only (the activations are not quantized), so they must match transformers on
the dequantized weights as the weight-only formats do: logits within LOGITS_ATOL, the same greedy tokens. The tiny
model's hidden size, 192, is no multiple of the 128 x 128 blocks: qkv and gate/up have a column of blocks cut short
(192 inputs), o and down a row of them (192 outputs); q 256, k / v 128 and gate / up 256 outputs are whole blocks,
as merged parts must be.
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from bench.perplexity import prompt_token_logprobs
from engine import LLM, SamplingParams
from engine.kernels.reference import dequantize_w8
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.quantization.spec import QuantizationConfigError, parse_quantization
from engine.tools import quantized_checkpoints as qc
from tests.test_quantization import LOGITS_ATOL, SHAPE, prefill_logits
from tests.test_quantization_w8a8 import TOKENS as RULE_TOKENS
from tests.test_quantization_w8a8 import TOLERANCE, ct_config, reference_logits, rule_ratio

CPU = torch.device("cpu")
BLOCK = (128, 128)
BLOCK_SHAPE = dict(hidden_size=192, intermediate_size=256, num_attention_heads=4, num_key_value_heads=2, head_dim=64)
TOKENS = list(range(5, 29))
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def block_model(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    return build_tiny_model("llama", tmp_path_factory.mktemp("float192"), **BLOCK_SHAPE)


def fp8_block_scheme():
    from compressed_tensors.quantization import QuantizationScheme
    from compressed_tensors.quantization.quant_scheme import PRESET_SCHEMES
    return QuantizationScheme(targets=["Linear"], **PRESET_SCHEMES["FP8_BLOCK"])


def fp8_block_config() -> dict:
    """config.json's quantization_config for llm-compressor's FP8_BLOCK preset, serialized by compressed-tensors."""
    from compressed_tensors.quantization import QuantizationConfig
    config = QuantizationConfig(config_groups={"group_0": fp8_block_scheme()}, format="float-quantized",
                                quantization_status="compressed", ignore=["lm_head"])
    return {"version": "0.0", "quant_method": "compressed-tensors", "sparsity_config": {}, "transform_config": {},
            **json.loads(config.model_dump_json(exclude=["quant_method"]))}


def fp8_block_writer(w: torch.Tensor):
    """What llm-compressor saves for one linear of a bfloat16 model: compressed-tensors' own block qparams (each
    128 x 128 block's, over the weight zero-padded to whole blocks as its quantizer pads it), bfloat16 scales
    [ceil(N / 128), ceil(K / 128)], the weight quantized by its compressor; and its own dequantization, in float32."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization.utils import calculate_qparams
    from compressed_tensors.quantization.utils.helpers import maybe_pad_tensor_for_block_quant
    scheme = fp8_block_scheme()
    padded = maybe_pad_tensor_for_block_quant(w, BLOCK)
    blocks = padded.reshape(padded.shape[0] // BLOCK[0], BLOCK[0], padded.shape[1] // BLOCK[1], BLOCK[1])
    scale, _ = calculate_qparams(blocks.amin((1, 3)), blocks.amax((1, 3)), scheme.weights)
    tensors = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale.to(torch.bfloat16)}, scheme)
    assert tensors["weight_scale"].shape == (-(-w.shape[0] // 128), -(-w.shape[1] // 128))
    as_float32 = {**tensors, "weight_scale": tensors["weight_scale"].float()}
    return tensors, FloatQuantizationCompressor.decompress(as_float32, scheme)["weight"]


def fp8_weight_block_writer(w: torch.Tensor):
    """vLLM's / DeepSeek's block-scaled fp8 layout, written here independently of compressed-tensors: each 128 x 128
    block's largest magnitude maps to 448; float32 `weight_scale_inv` [ceil(N / 128), ceil(K / 128)], multiplied to
    dequantize."""
    rows, cols = -(-w.shape[0] // BLOCK[0]), -(-w.shape[1] // BLOCK[1])
    scale = torch.empty(rows, cols)
    weight = torch.empty(w.shape, dtype=torch.float8_e4m3fn)
    dequantized = torch.empty_like(w)
    for i in range(rows):
        for j in range(cols):
            at = (slice(i * BLOCK[0], (i + 1) * BLOCK[0]), slice(j * BLOCK[1], (j + 1) * BLOCK[1]))
            scale[i, j] = w[at].abs().max() / 448.0
            weight[at] = (w[at] / scale[i, j]).clamp(-448, 448).to(torch.float8_e4m3fn)
            dequantized[at] = weight[at].float() * scale[i, j]
    return {"weight": weight, "weight_scale_inv": scale}, dequantized


FP8_WEIGHT_BLOCK_CONFIG = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                           "weight_block_size": list(BLOCK)}  # as DeepSeek-V3's and Qwen's FP8 releases


@pytest.mark.parametrize("config, writer, description", [
    (fp8_block_config(), fp8_block_writer, "compressed-tensors 8-bit, block 128x128, activations unquantized"),
    (FP8_WEIGHT_BLOCK_CONFIG, fp8_weight_block_writer, "fp8 8-bit, block 128x128, activations unquantized"),
], ids=["ct-fp8-block", "fp8-weight-block-size"])
@torch.inference_mode()
def test_block_scaled_fp8_matches_transformers_on_its_dequantized_weights(block_model, tmp_path, config, writer,
                                                                          description):
    dequantized = qc.write_quantized(block_model, tmp_path / "q", config, writer)
    model_config = ModelConfig.from_pretrained(tmp_path / "q", dtype="float32")
    model = load_model(model_config, tmp_path / "q", CPU)
    assert model.quant_scheme.describe() == description
    # kvbox's weights, cut-short blocks included, are the checkpoint's dequantized ones, merged parts in order.
    attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
    for module, parts in ((attn.qkv_proj, ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")),
                          (attn.o_proj, ("self_attn.o_proj",)), (mlp.gate_up_proj, ("mlp.gate_proj", "mlp.up_proj")),
                          (mlp.down_proj, ("mlp.down_proj",))):
        assert module.weight.dtype == torch.float8_e4m3fn
        want = torch.cat([dequantized[f"model.layers.0.{part}.weight"] for part in parts])
        assert torch.equal(dequantize_w8(module.weight, module.weight_scale, BLOCK), want)
    assert attn.qkv_proj.weight_scale.shape == (4, 2)  # 256 + 128 + 128 outputs; 192 inputs: 128 + 64
    assert attn.o_proj.weight_scale.shape == (2, 2)  # 192 outputs: 128 + 64; 256 inputs

    reference = AutoModelForCausalLM.from_pretrained(qc.write_float(block_model, tmp_path / "ref", dequantized),
                                                     dtype=torch.float32).eval()
    want_logprobs = reference(torch.tensor([TOKENS])).logits[0].log_softmax(-1)
    want_prompt = want_logprobs[:-1].gather(-1, torch.tensor(TOKENS[1:])[:, None])[:, 0]
    llm = LLM(str(tmp_path / "q"), dtype="float32", num_kv_blocks=32)
    got_prompt = torch.tensor(prompt_token_logprobs(llm, [TOKENS])[0])
    torch.testing.assert_close(got_prompt, want_prompt, atol=LOGITS_ATOL, rtol=0)
    [output] = llm.generate([TOKENS], SamplingParams(temperature=0.0, max_tokens=NEW_TOKENS, ignore_eos=True),
                            use_tqdm=False)
    expected = reference.generate(torch.tensor([TOKENS]), attention_mask=torch.ones(1, len(TOKENS), dtype=torch.long),
                                  do_sample=False, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS)
    assert list(output.outputs[0].token_ids) == expected[0, len(TOKENS):].tolist()


def test_block_dequantization_cuts_the_last_blocks_short():
    """192 x 200 in 128 x 128 blocks: rows 128 + 64, columns 128 + 72 (not 96 + 96, 100 + 100, as the shapes say)."""
    weight = torch.ones(192, 200).to(torch.float8_e4m3fn)
    scale = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    want = torch.ones(192, 200)
    want[:128, 128:], want[128:, :128], want[128:, 128:] = 2.0, 3.0, 4.0
    assert torch.equal(dequantize_w8(weight, scale, BLOCK), want)


def refusal(checkpoint) -> QuantizationConfigError:
    with pytest.raises(QuantizationConfigError) as error:
        parse_quantization(checkpoint, None)
    return error.value


def test_block_scaled_fp8_is_weight_only_and_runs_below_compute_capability_8_9(monkeypatch):
    from engine.models import loader

    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    for config in (fp8_block_config(), FP8_WEIGHT_BLOCK_CONFIG):
        scheme = parse_quantization(config, None)
        assert (scheme.layout, scheme.weight_strategy, scheme.block_size, scheme.activations) == ("fp8", "block",
                                                                                                 BLOCK, None)
        loader.check_device_runs(scheme, torch.device("cuda"), "m")


def test_fp8_block_settings_kvbox_cannot_run_are_refused():
    scheme = parse_quantization(fp8_block_config(), None)
    at = "quantization_config.config_groups.group_0."
    static = fp8_block_config()
    static["config_groups"]["group_0"]["input_activations"].update(dynamic=False, strategy="tensor", group_size=None)
    assert str(refusal(static)) == (f"{at}input_activations.dynamic = False: block-scaled weights run with dynamic "
                                    "activations only")
    odd = fp8_block_config()
    odd["config_groups"]["group_0"]["weights"]["block_structure"] = [128]
    assert str(refusal(odd)) == f"{at}weights.block_structure = [128]: expected [rows, columns]"
    int8 = fp8_block_config()
    int8["format"] = "int-quantized"
    int8["config_groups"]["group_0"]["weights"]["type"] = "int"
    assert str(refusal(int8)) == f"{at}weights.strategy = 'block': kvbox supports 'tensor', 'channel'"
    # Without input activations (a weight-only FP8_BLOCK recipe) the scheme runs the same.
    weight_only = fp8_block_config()
    weight_only["config_groups"]["group_0"]["input_activations"] = None
    assert parse_quantization(weight_only, None) == scheme


def test_merged_parts_must_be_whole_blocks():
    """k / v of 64 outputs end inside a 128-row block, and the next part's scales could not begin one of their own."""
    from engine.quantization.spec import check_linear_shapes

    for config, key in ((fp8_block_config(), "quantization_config.config_groups.group_0.weights.block_structure"),
                        (FP8_WEIGHT_BLOCK_CONFIG, "quantization_config.weight_block_size")):
        with pytest.raises(QuantizationConfigError) as error:
            check_linear_shapes(parse_quantization(config, None), 2, 192, 256, 256, 64)
        assert str(error.value) == (f"{key} = [128, 128]: the blocks do not divide qkv_proj's 192 inputs and 256, "
                                    "64, 64 outputs, which kvbox merges into one linear")
        check_linear_shapes(parse_quantization(config, None), 2, 192, 256, 256, 128)


@pytest.fixture(scope="module")
def float_model(tmp_path_factory):
    from engine.tools.tiny_model import build_tiny_model
    return build_tiny_model("llama", tmp_path_factory.mktemp("float"), **SHAPE)


def ct_fp8_tensor_writer(w: torch.Tensor):
    """What compressed-tensors' float-quantized compressor saves for FP8 with one weight scale per tensor: its own
    qparams over the whole weight, a bfloat16 `weight_scale` of shape [1]."""
    from compressed_tensors.compressors.naive_quantized.base import FloatQuantizationCompressor
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from compressed_tensors.quantization.utils import calculate_qparams
    scheme = QuantizationScheme(targets=["Linear"], weights=QuantizationArgs(num_bits=8, type="float", symmetric=True,
                                                                             strategy="tensor"))
    scale, _ = calculate_qparams(w.amin().reshape(1), w.amax().reshape(1), scheme.weights)
    tensors = FloatQuantizationCompressor.compress({"weight": w, "weight_scale": scale.to(torch.bfloat16)}, scheme)
    assert tensors["weight_scale"].shape == (1,)
    return tensors, tensors["weight"].float() * tensors["weight_scale"].float()


@torch.inference_mode()
def test_ct_fp8_per_tensor_scales_within_the_rule(float_model, tmp_path):
    """As tests/test_quantization_w8a8.py's per-channel compressed-tensors FP8: dynamic per-token fp8 activations,
    kvbox within the rule of the fake-quantized reference, and scales 25% off outside it."""
    config_dict = ct_config("float", "tensor", False)
    dequantized = qc.write_quantized(float_model, tmp_path / "q", config_dict, ct_fp8_tensor_writer)
    config = ModelConfig.from_pretrained(tmp_path / "q", dtype="float32")
    model = load_model(config, tmp_path / "q", CPU)
    assert model.quant_scheme.describe() == "compressed-tensors 8-bit, per-tensor, dynamic per-token activations"
    qkv = model.model.layers[0].self_attn.qkv_proj
    # Each part's one scale, spread over its rows.
    assert qkv.weight.dtype == torch.float8_e4m3fn and qkv.weight_scale.shape == (qkv.output_size,)
    assert qkv.weight_scale.unique().numel() == 3
    float_logits = reference_logits(float_model, None, None, None)
    fake = reference_logits(float_model, dequantized, torch.float8_e4m3fn, None)
    assert rule_ratio(prefill_logits(model, config, RULE_TOKENS), fake, float_logits) <= TOLERANCE

    qc.write_quantized(float_model, tmp_path / "off", config_dict, lambda w: (
        {k: v * 1.25 if k == "weight_scale" else v for k, v in ct_fp8_tensor_writer(w)[0].items()}, None))
    wrong = prefill_logits(load_model(config, tmp_path / "off", CPU), config, RULE_TOKENS)
    assert rule_ratio(wrong, fake, float_logits) > TOLERANCE
