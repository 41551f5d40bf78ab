"""GGUF checkpoints (llama.cpp's single-file format), read through the `gguf` package's own reader.

A GGUF file holds the hyper-parameters as `{arch}.*` metadata, the tokenizer and chat template as `tokenizer.*`
metadata, and the tensors under llama.cpp's names, quantized or not. This module turns the metadata into the
config.json-style dict that `ModelConfig.from_dict` normalizes, and the tensors into float32 tensors under Hugging
Face names for each model's `load_weights`, undoing what llama.cpp's converter (`convert_hf_to_gguf.py`) changed on
the way. Float tensors (F32, F16, BF16) load as float32; quantized blocks (`kernels.reference.GGUF_BLOCKS`) stay
packed, as uint8 [rows, row bytes] tensors tagged with their `gguf_type`, for `engine.quantization.gguf` and the
embedding, and the config then says `quant_method: gguf`. Other types are refused, naming the tensor. The tokenizer
is `tokenizer.py`'s job.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from gguf import GGMLQuantizationType, GGUFReader, LlamaFileType, ReaderTensor
from gguf.quants import dequantize

from engine.kernels.reference import GGUF_BLOCKS
from engine.quantization.spec import GGUF_FLOAT_TYPES, gguf_quantization_config

if TYPE_CHECKING:
    from engine.models.config import ModelConfig

GGUF_SUFFIX = ".gguf"

# general.architecture -> architectures[0]. llama.cpp converts Mistral checkpoints as "llama" (without their
# sliding window, which llama.cpp does not apply either).
_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
    "gemma2": "Gemma2ForCausalLM",
}
_HIDDEN_ACTS = {"gemma2": "gelu_pytorch_tanh"}  # the others use silu
# The model dtype "auto" means, for files whose weights are all float; quantized files default to float32.
_FILE_DTYPES = {LlamaFileType.ALL_F32: "float32", LlamaFileType.MOSTLY_F16: "float16",
                LlamaFileType.MOSTLY_BF16: "bfloat16"}
# Token ids that end generation: llama.cpp stops at each of them.
_EOS_KEYS = ("tokenizer.ggml.eos_token_id", "tokenizer.ggml.eot_token_id", "tokenizer.ggml.eom_token_id")

_GLOBAL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
# Gemma 2 norms both sides of each block, so llama.cpp's ffn_norm is its pre-feedforward norm.
_GEMMA2_BLOCK_NAMES = {
    **_BLOCK_NAMES,
    "post_attention_norm": "post_attention_layernorm",
    "ffn_norm": "pre_feedforward_layernorm",
    "post_ffw_norm": "post_feedforward_layernorm",
}
# Llama 3's rope scaling, stored as a tensor; read_config turns it back into rope parameters.
_ROPE_FREQS = "rope_freqs.weight"
_FLOAT_TYPES = tuple(GGMLQuantizationType[name] for name in GGUF_FLOAT_TYPES)


def is_gguf(path: str | Path) -> bool:
    return str(path).endswith(GGUF_SUFFIX)


def read_config(path: str | Path) -> dict[str, Any]:
    """The config.json-style dict (special token ids included) that describes a GGUF file's model."""
    reader = _open(path)
    arch = _field(reader, "general.architecture")
    if arch not in _ARCHITECTURES:
        raise ValueError(f"{path}: unsupported GGUF architecture {arch!r}; kvbox reads {', '.join(_ARCHITECTURES)}")

    quantization_config = _quantization_config(path, reader.tensors)  # first: it refuses types kvbox cannot run

    def get(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    tensors = {tensor.name: tensor for tensor in reader.tensors}
    num_layers, hidden_size, num_heads = get("block_count"), get("embedding_length"), get("attention.head_count")
    head_size = get("attention.key_length") or hidden_size // num_heads
    config = {
        "architectures": [_ARCHITECTURES[arch]],
        "model_type": arch,
        # GGUF lists dimensions innermost first: [hidden, vocab].
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "hidden_size": hidden_size,
        "intermediate_size": get("feed_forward_length"),
        "num_hidden_layers": num_layers,
        "num_attention_heads": num_heads,
        "num_key_value_heads": get("attention.head_count_kv", num_heads),
        "head_dim": head_size,
        "rms_norm_eps": get("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": get("context_length"),
        "rope_parameters": _rope_parameters(get, tensors.get(_ROPE_FREQS), head_size),
        # The converter leaves output.weight out when the checkpoint ties it to the embedding.
        "tie_word_embeddings": "output.weight" not in tensors,
        "sliding_window": get("attention.sliding_window"),
        "attn_logit_softcapping": get("attn_logit_softcapping"),
        "final_logit_softcapping": get("final_logit_softcapping"),
        "hidden_act": _HIDDEN_ACTS.get(arch, "silu"),
        "dtype": _FILE_DTYPES.get(_field(reader, "general.file_type")),
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": sorted({_field(reader, key) for key in _EOS_KEYS} - {None}) or None,
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
        "quantization_config": quantization_config,
    }
    if arch == "gemma2":
        # GGUF has no query_pre_attn_scalar; llama.cpp scales by head size, except for the 27B model (46 layers),
        # which Google scales by hidden_size / num_heads.
        config["query_pre_attn_scalar"] = hidden_size // num_heads if num_layers == 46 else head_size
    return config


def iter_gguf_tensors(path: str | Path, config: ModelConfig) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) pairs, one at a time: float32 (the weight loaders cast to the model dtype), or packed
    GGUF blocks tagged with their `gguf_type`."""
    reader = _open(path)
    block_names = _GEMMA2_BLOCK_NAMES if config.model_type == "gemma2" else _BLOCK_NAMES
    for tensor in reader.tensors:
        if tensor.name == _ROPE_FREQS:
            continue
        name = _hf_name(tensor.name, block_names)
        weights = _tensor(path, tensor)
        qtype = getattr(weights, "gguf_type", None)
        if config.model_type == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            weights = _unpermute_rotary(weights, config.num_heads)
        elif config.model_type == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            weights = _unpermute_rotary(weights, config.num_kv_heads)
        elif config.model_type == "gemma2" and name.endswith("norm.weight"):
            weights = weights - 1  # the converter stores Gemma's (1 + w) norm scales; our Gemma 2 adds the 1 back
        if qtype is not None:
            weights.gguf_type = qtype  # again: unpermuting the rows made a new tensor
        yield name, weights


def _quantization_config(path: str | Path, tensors: list[ReaderTensor]) -> dict[str, Any] | None:
    """`quant_method: gguf` and the block types' tensor counts when the file holds quantized blocks; None when it is
    all float."""
    for tensor in tensors:
        if tensor.tensor_type not in GGUF_BLOCKS and tensor.tensor_type not in _FLOAT_TYPES:
            kept = ", ".join(t.name for t in (*_FLOAT_TYPES, *map(GGMLQuantizationType, GGUF_BLOCKS)))
            raise ValueError(f"{path}: tensor {tensor.name!r} has GGUF type {tensor.tensor_type.name}, which kvbox "
                             f"does not run; supported types: {kept}")
    return gguf_quantization_config(tensor.tensor_type.name for tensor in tensors)


def _tensor(path: str | Path, tensor: ReaderTensor) -> torch.Tensor:
    if tensor.tensor_type in GGUF_BLOCKS:
        packed = torch.from_numpy(np.array(tensor.data))  # [rows, row bytes], copied out of the memory map
        packed.gguf_type = int(tensor.tensor_type)
        return packed
    try:
        array = dequantize(tensor.data, tensor.tensor_type)  # [rows, row length] float32
    except NotImplementedError as error:
        raise ValueError(f"{path}: cannot dequantize {tensor.name!r}: {error}") from error
    # The memmapped data of F32 tensors is read-only, and torch wants to own writable memory.
    return torch.from_numpy(np.require(array, requirements="W"))


def _open(path: str | Path) -> GGUFReader:
    if not Path(path).is_file():
        raise FileNotFoundError(f"no GGUF file at {path}")
    return GGUFReader(path)


def _field(reader: GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _rope_parameters(get: Callable[..., Any], rope_freqs: ReaderTensor | None, head_size: int) -> dict[str, Any]:
    params: dict[str, Any] = {"rope_theta": float(get("rope.freq_base", 10000.0))}
    rotary_dim = get("rope.dimension_count", head_size)
    if rotary_dim != head_size:
        params["partial_rotary_factor"] = rotary_dim / head_size
    scaling = get("rope.scaling.type", "none")
    if rope_freqs is not None:
        params.update(_llama3_rope_scaling(np.asarray(rope_freqs.data, dtype=np.float64), params["rope_theta"],
                                           rotary_dim))
    elif scaling == "linear":
        params.update(rope_type="linear", factor=float(get("rope.scaling.factor")))
    elif scaling != "none":
        raise ValueError(f"unsupported GGUF rope scaling {scaling!r}; kvbox supports linear and Llama 3's")
    return params


def _llama3_rope_scaling(divisors: np.ndarray, rope_theta: float, rotary_dim: int) -> dict[str, Any]:
    """Llama 3's rope parameters, recovered from the per-frequency divisors the converter stores instead of them.

    Short wavelengths keep their frequency (divisor 1), long ones are divided by `factor`, and in between
    1 / divisor = (1 - s) / factor + s, where s = original_len / (high - low) / wavelength - low / (high - low) is
    linear in 1 / wavelength: a line fit through that band gives its slope and intercept, which fix the parameters
    up to a common scale, chosen so that low_freq_factor is 1 as in every Llama 3 release.
    """
    factor = float(divisors.max())
    inv_freq = rope_theta ** -(np.arange(0, rotary_dim, 2, dtype=np.float64) / rotary_dim)
    band = (divisors > 1 + 1e-6) & (divisors < factor - 1e-6)
    if band.sum() < 2:
        raise ValueError("cannot recover Llama 3 rope scaling from rope_freqs.weight: under two interpolated "
                         "frequencies")
    smooth = (1 / divisors[band] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(inv_freq[band] / (2 * np.pi), smooth, 1)  # s = slope / wavelength + intercept
    original_len = round(slope / -intercept)
    return {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": -intercept * original_len / slope,
        "high_freq_factor": (1 - intercept) * original_len / slope,
        "original_max_position_embeddings": original_len,
    }


def _hf_name(gguf_name: str, block_names: dict[str, str]) -> str:
    """blk.3.attn_q.weight -> model.layers.3.self_attn.q_proj.weight; token_embd.weight -> model.embed_tokens..."""
    base, _, kind = gguf_name.rpartition(".")
    if base.startswith("blk."):
        _, layer, part = base.split(".", 2)
        hf_base = f"model.layers.{layer}.{block_names[part]}" if part in block_names else None
    else:
        hf_base = _GLOBAL_NAMES.get(base)
    if hf_base is None:
        raise ValueError(f"unexpected tensor {gguf_name!r} in GGUF checkpoint")
    return f"{hf_base}.{kind}"


def _unpermute_rotary(weights: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Undoes the converter's `LlamaModel.permute` of Llama's q/k rows: llama.cpp rotates adjacent pairs, HF (and
    we) rotate the two halves of each head, so the converter interleaved each head's halves."""
    shape = weights.shape
    # stored [num_heads, head_size / 2, 2, ...] -> ours [num_heads, 2, head_size / 2, ...]
    return weights.reshape(num_heads, shape[0] // num_heads // 2, 2, *shape[1:]).transpose(1, 2).reshape(shape)
