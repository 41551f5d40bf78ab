"""`ModelConfig`: the one normalized, frozen view of a Hugging Face model folder's `config.json` (or of a GGUF
file's metadata, which `gguf.py` turns into the same kind of dict).

It reads configs written by transformers 4.x and 5.x alike (`rope_theta` + `rope_scaling` vs `rope_parameters`,
`torch_dtype` vs `dtype`, `type` vs `rope_type`) and resolves each family's quirks (which layers slide, which
projections carry a bias) into plain fields, so the model files never look at a raw HF dict. It owns no weights and
knows nothing of the KV cache or scheduling; which class runs an architecture is `registry.py`'s job.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.models.builtin import resolve_model_source
from engine.models.checkpoint_quantization import checkpoint_quantization_config
from engine.models.gguf import is_gguf, read_config

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3")

_DTYPES = {
    "float32": torch.float32, "float": torch.float32,
    "float16": torch.float16, "half": torch.float16,
    "bfloat16": torch.bfloat16,
}

# Families whose HF config class defaults tie_word_embeddings to True when config.json leaves it out.
_TIED_BY_DEFAULT = frozenset({"gemma2"})
# RoBERTa's learned positions start after its padding index.
_LEARNED_FROM_PADDING = frozenset({"roberta", "xlm-roberta"})


@dataclass(frozen=True)
class ModelConfig:
    architecture: str  # architectures[0], the registry key
    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_size: int
    rms_norm_eps: float
    rope_theta: float
    # None for plain RoPE; else {"rope_type": "linear", "factor"} or {"rope_type": "llama3", "factor",
    # "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"}.
    rope_scaling: dict[str, Any] | None
    partial_rotary_factor: float  # fraction of head_size that RoPE rotates
    max_position_embeddings: int
    max_model_len: int  # longest sequence (prompt + output) the engine will run
    tie_word_embeddings: bool
    qkv_bias: bool
    o_proj_bias: bool
    mlp_bias: bool
    qk_norm: bool  # Qwen3: RMSNorm over each head of q and k before RoPE
    layer_sliding_windows: tuple[int, ...]  # per layer; 0 = full attention
    attn_logit_softcapping: float  # 0 = none
    final_logit_softcapping: float  # 0 = none
    query_pre_attn_scalar: float | None  # Gemma 2: attention scale is its inverse square root
    hidden_act: str
    dtype: torch.dtype
    eos_token_ids: frozenset[int]
    bos_token_id: int | None
    pad_token_id: int | None
    # Encoders (BERT, RoBERTa): post-norm eps, token types, the first position's index, a cross-encoder's labels.
    layer_norm_eps: float = 1e-12
    type_vocab_size: int = 0
    position_offset: int = 0
    num_labels: int = 0
    # config.json's quantization_config (or older tools' quantize_config.json / quant_config.json) as written
    # (`engine.quantization.spec` reads it); None: float.
    quantization_config: dict[str, Any] | None = None

    @property
    def rotary_dim(self) -> int:
        return int(self.head_size * self.partial_rotary_factor)

    @property
    def attention_scale(self) -> float:
        return (self.query_pre_attn_scalar or self.head_size) ** -0.5

    @classmethod
    def from_pretrained(cls, path: str | Path, dtype: str | torch.dtype | None = None,
                        max_model_len: int | None = None) -> ModelConfig:
        """Reads `config.json` (with `quantize_config.json` or `quant_config.json` where it has no
        quantization_config) and, when present, `generation_config.json` from a model folder; or the metadata of a
        GGUF file. `path` may name a built-in model (`builtin:NAME`)."""
        source = resolve_model_source(path)
        if is_gguf(source):
            return cls.from_dict(read_config(source), dtype=dtype, max_model_len=max_model_len)
        folder = Path(source)
        config_file = folder / "config.json"
        if not config_file.is_file():
            raise FileNotFoundError(f"no config.json in model folder {folder}")
        generation_file = folder / "generation_config.json"
        generation = json.loads(generation_file.read_text()) if generation_file.is_file() else None
        hf = json.loads(config_file.read_text())
        hf["quantization_config"] = checkpoint_quantization_config(folder, hf)
        return cls.from_dict(hf, generation, dtype=dtype, max_model_len=max_model_len)

    @classmethod
    def from_dict(cls, hf: dict[str, Any], generation: dict[str, Any] | None = None, *,
                  dtype: str | torch.dtype | None = None, max_model_len: int | None = None) -> ModelConfig:
        generation = generation or {}
        model_type = hf["model_type"]
        num_layers = hf["num_hidden_layers"]
        num_heads = hf["num_attention_heads"]
        max_position_embeddings = hf["max_position_embeddings"]
        rope_theta, rope_scaling, partial_rotary_factor = _normalize_rope(hf, max_position_embeddings)
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            architecture=(hf.get("architectures") or [""])[0],
            model_type=model_type,
            vocab_size=hf["vocab_size"],
            hidden_size=hf["hidden_size"],
            intermediate_size=hf["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=hf.get("num_key_value_heads") or num_heads,
            # 4.x Llama configs may carry "head_dim": null.
            head_size=hf.get("head_dim") or hf["hidden_size"] // num_heads,
            rms_norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            partial_rotary_factor=partial_rotary_factor,
            max_position_embeddings=max_position_embeddings,
            max_model_len=_resolve_max_model_len(max_model_len, max_position_embeddings),
            tie_word_embeddings=bool(hf.get("tie_word_embeddings", model_type in _TIED_BY_DEFAULT)),
            # Qwen2 always has q/k/v biases (and never an o_proj bias); the others follow attention_bias.
            qkv_bias=attention_bias or model_type == "qwen2",
            o_proj_bias=attention_bias,
            mlp_bias=bool(hf.get("mlp_bias", False)),
            qk_norm=model_type == "qwen3",
            layer_sliding_windows=_layer_sliding_windows(hf, model_type, num_layers),
            attn_logit_softcapping=float(hf.get("attn_logit_softcapping") or 0.0),
            final_logit_softcapping=float(hf.get("final_logit_softcapping") or 0.0),
            query_pre_attn_scalar=hf.get("query_pre_attn_scalar"),
            # Gemma 2 names its activation hidden_activation; its hidden_act (4.x) is a leftover.
            hidden_act=hf.get("hidden_activation") or hf.get("hidden_act", "silu"),
            dtype=_resolve_dtype(dtype, hf.get("dtype") or hf.get("torch_dtype")),
            eos_token_ids=_token_ids(_first_set("eos_token_id", generation, hf)),
            bos_token_id=_first_set("bos_token_id", generation, hf),
            pad_token_id=_first_set("pad_token_id", generation, hf),
            layer_norm_eps=float(hf.get("layer_norm_eps", 1e-12)),
            type_vocab_size=int(hf.get("type_vocab_size", 0)),
            position_offset=hf.get("pad_token_id", 1) + 1 if model_type in _LEARNED_FROM_PADDING else 0,
            num_labels=len(hf["id2label"]) if hf.get("id2label") else int(hf.get("num_labels", 0)),
            quantization_config=hf.get("quantization_config"),
        )


def _normalize_rope(hf: dict[str, Any], max_position_embeddings: int) -> tuple[float, dict | None, float]:
    """(rope_theta, rope_scaling, partial_rotary_factor) from either `rope_parameters` (5.x) or the 4.x fields."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    if any(isinstance(value, dict) for value in params.values()):
        raise ValueError("per-layer-type rope_parameters are not supported by any kvbox model")
    rope_theta = float(params.get("rope_theta", hf.get("rope_theta", 10000.0)))
    partial_rotary_factor = float(params.get("partial_rotary_factor", hf.get("partial_rotary_factor", 1.0)))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return rope_theta, None, partial_rotary_factor
    if rope_type == "linear":
        return rope_theta, {"rope_type": "linear", "factor": float(params["factor"])}, partial_rotary_factor
    if rope_type == "llama3":
        scaling = {
            "rope_type": "llama3",
            "factor": float(params["factor"]),
            "low_freq_factor": float(params["low_freq_factor"]),
            "high_freq_factor": float(params["high_freq_factor"]),
            "original_max_position_embeddings": int(
                params.get("original_max_position_embeddings", max_position_embeddings)),
        }
        return rope_theta, scaling, partial_rotary_factor
    raise ValueError(f"unsupported rope type {rope_type!r}; kvbox supports {', '.join(SUPPORTED_ROPE_TYPES)}")


def _layer_sliding_windows(hf: dict[str, Any], model_type: str, num_layers: int) -> tuple[int, ...]:
    window = hf.get("sliding_window") or 0
    if model_type == "qwen2" or model_type == "qwen3":
        # Their config classes drop the window unless use_sliding_window, whatever layer_types says.
        window = window if hf.get("use_sliding_window", False) else 0
    if not window:
        return (0,) * num_layers
    if model_type == "mistral":
        # HF's Mistral applies its window to every layer and ignores layer_types.
        return (window,) * num_layers
    layer_types = hf.get("layer_types")
    if layer_types is None:
        layer_types = _default_layer_types(hf, model_type, num_layers)
    if len(layer_types) != num_layers:
        raise ValueError(f"layer_types has {len(layer_types)} entries for {num_layers} layers")
    return tuple(window if kind == "sliding_attention" else 0 for kind in layer_types)


def _default_layer_types(hf: dict[str, Any], model_type: str, num_layers: int) -> list[str]:
    """What each family's transformers config class fills in when config.json (4.x) has no layer_types."""
    if model_type == "gemma2":
        # Even layers slide (layer 0 included), odd layers see everything.
        return ["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(num_layers)]
    if model_type == "qwen2" or model_type == "qwen3":
        # The first max_window_layers layers use full attention; the layers above them slide.
        first_sliding = hf.get("max_window_layers", 28)
        return ["sliding_attention" if i >= first_sliding else "full_attention" for i in range(num_layers)]
    return ["sliding_attention"] * num_layers


def _resolve_max_model_len(requested: int | None, max_position_embeddings: int) -> int:
    if requested is None:
        return max_position_embeddings
    if requested <= 0:
        raise ValueError(f"max_model_len must be positive, got {requested}")
    if requested > max_position_embeddings:
        raise ValueError(
            f"max_model_len {requested} exceeds the model's max_position_embeddings {max_position_embeddings}")
    return requested


def _resolve_dtype(requested: str | torch.dtype | None, from_config: str | None) -> torch.dtype:
    name = requested if requested not in (None, "auto") else from_config
    if name is None:
        return torch.float32
    if isinstance(name, torch.dtype):
        return name
    if name.removeprefix("torch.") not in _DTYPES:
        raise ValueError(f"unsupported dtype {name!r}; expected one of auto, {', '.join(_DTYPES)}")
    return _DTYPES[name.removeprefix("torch.")]


def _first_set(key: str, *sources: dict[str, Any]) -> Any:
    """The first non-null value of `key`: generation_config.json is what generate() honours, so it wins."""
    return next((source[key] for source in sources if source.get(key) is not None), None)


def _token_ids(value: int | list[int] | None) -> frozenset[int]:
    if value is None:
        return frozenset()
    return frozenset([value] if isinstance(value, int) else value)
