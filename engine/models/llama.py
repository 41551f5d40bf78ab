"""The Llama decoder, which also runs Mistral, Qwen2 and Qwen3: their differences are config flags
(`qkv_bias`, `qk_norm`, `layer_sliding_windows`, `rope_scaling`), not code.

A forward pass takes one flat batch of tokens from many sequences (no batch dimension); `AttentionMetadata` says
which sequence each token belongs to and where its K/V goes. Also home of `load_weights`, the HF-name mapping every
model here shares. Under pipeline parallelism a model holds one stage's layers (`PipelineStage`): the embedding only
on the first stage, the final norm and LM head only on the last, and it loads only those weights.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import ClassVar

import torch
from torch import nn

from engine.distributed.pipeline import PipelineStage
from engine.models.attention import KV_SCALE_SUFFIXES, Attention, AttentionMetadata, load_kv_scale
from engine.models.config import ModelConfig
from engine.models.layers import (
    GatedMLP,
    LMHead,
    QKVParallelLinear,
    RMSNorm,
    RotaryEmbedding,
    RowParallelLinear,
    VocabEmbedding,
    default_weight_loader,
)

# HF tensor name part -> (our merged parameter name part, shard id for its weight_loader).
_MERGED_SHARDS = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Buffers some older checkpoints saved; we recompute them.
_IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class LlamaAttention(nn.Module):
    """q/k/v projection, optional per-head q/k RMSNorm, RoPE, paged attention, output projection."""

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.head_size = config.head_size
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_size, config.num_heads,
                                          config.num_kv_heads, config.qkv_bias, tp_rank, tp_size)
        self.o_proj = RowParallelLinear(config.num_heads * config.head_size, config.hidden_size,
                                        config.o_proj_bias, tp_rank, tp_size)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads  # this rank's
        # Kept here rather than read from qkv_proj in forward, which LoRA may wrap.
        self.qkv_sizes = list(self.qkv_proj.output_slices)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_size, config.rms_norm_eps)
            self.k_norm = RMSNorm(config.head_size, config.rms_norm_eps)
        self.qk_norm = config.qk_norm
        self.rotary_emb = rotary_emb  # one module shared by every layer: the cos/sin table exists once
        self.attn = Attention(self.num_heads, self.num_kv_heads, config.head_size, config.attention_scale,
                              config.layer_sliding_windows[layer_idx], config.attn_logit_softcapping)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        qkv = self.qkv_proj(hidden)  # [num_tokens, q_size + 2 * kv_size]; hidden may come quantized (producer_quant)
        num_tokens = qkv.shape[0]
        q, k, v = qkv.split(self.qkv_sizes, dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_size)  # [num_tokens, num_heads, head_size]
        k = k.view(num_tokens, self.num_kv_heads, self.head_size)  # [num_tokens, num_kv_heads, head_size]
        if self.qk_norm:
            # The norm runs over each head's head_size features: [num_tokens * heads, head_size] and back.
            q = self.q_norm(q.reshape(-1, self.head_size)).view(num_tokens, self.num_heads, self.head_size)
            k = self.k_norm(k.reshape(-1, self.head_size)).view(num_tokens, self.num_kv_heads, self.head_size)
        out = self.attn(q, k, v, metadata, positions, self.rotary_emb)  # [num_tokens, num_heads * head_size]
        return self.o_proj(out)  # [num_tokens, hidden]


class LlamaDecoderLayer(nn.Module):
    """Pre-norm attention and MLP blocks; the residual add is fused into the next norm."""

    # The norm whose output each linear reads (SmoothQuant folds its scales there: engine.quantization.smoothing).
    smoothing_norms: ClassVar[dict[str, str]] = {"self_attn.qkv_proj": "input_layernorm",
                                                 "mlp.gate_up_proj": "post_attention_layernorm"}

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, tp_rank, tp_size)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias,
                            tp_rank, tp_size)
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.self_attn(positions, hidden, metadata)
        hidden, residual = self.post_attention_layernorm(hidden, residual)
        return self.mlp(hidden), residual


class LlamaModel(nn.Module):
    """Embedding, decoder layers, final norm. Subclasses swap the layer class, norm offset and embedding scale."""

    decoder_layer_cls: type[nn.Module] = LlamaDecoderLayer
    norm_weight_offset = 0.0

    def __init__(self, config: ModelConfig, tp_rank: int = 0, tp_size: int = 1, stage: PipelineStage | None = None):
        super().__init__()
        self.stage = stage = stage or PipelineStage(range(config.num_layers))
        if stage.is_first:
            self.embed_tokens = VocabEmbedding(config.vocab_size, config.hidden_size, tp_rank, tp_size)
        # RoPE only needs positions below max_model_len, so the table stops there.
        self.rotary_emb = RotaryEmbedding(config.rotary_dim, config.max_model_len, config.rope_theta,
                                          config.rope_scaling)
        # Other stages' layers are weightless placeholders, so that every layer keeps its index and HF name.
        self.layers = nn.ModuleList(
            self.decoder_layer_cls(config, i, self.rotary_emb, tp_rank, tp_size) if i in stage.layers
            else nn.Identity() for i in range(config.num_layers))
        self.stage_layers = tuple(self.layers[i] for i in stage.layers)  # a plain tuple: iterated every step
        if stage.is_last:
            self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, self.norm_weight_offset)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids)  # [num_tokens, hidden]

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """-> hidden [num_tokens, hidden]; before the last pipeline stage, the hidden states and residual that the
        runner sends on (the stage's inbox holds its input: the runner received it, so that a graph captures none
        of the communication)."""
        if self.stage.is_first:
            hidden, residual = self.embed(input_ids), None
        else:
            hidden, residual = self.stage.inputs(input_ids.shape[0])
        for layer in self.stage_layers:
            hidden, residual = layer(positions, hidden, residual, metadata)
        if not self.stage.is_last:
            return hidden, residual
        hidden, _ = self.norm(hidden, residual)
        return hidden


class LlamaForCausalLM(nn.Module):
    """The served model: forward to hidden states, compute_logits for the rows the sampler needs."""

    model_cls: type[LlamaModel] = LlamaModel
    # Our linears that LoRA adapters may target -> the HF projections each one holds, in output order.
    lora_modules: ClassVar[dict[str, tuple[str, ...]]] = {
        "qkv_proj": ("q_proj", "k_proj", "v_proj"),
        "o_proj": ("o_proj",),
        "gate_up_proj": ("gate_proj", "up_proj"),
        "down_proj": ("down_proj",),
    }

    def __init__(self, config: ModelConfig, tp_rank: int = 0, tp_size: int = 1, stage: PipelineStage | None = None):
        super().__init__()
        self.config = config
        self.model = self.model_cls(config, tp_rank, tp_size, stage)
        stage = self.model.stage
        if stage.is_last:
            self.lm_head = LMHead(config.vocab_size, config.hidden_size, tp_rank, tp_size)
            # A last stage without the embedding loads the tied weight into its own head (`load_weights`).
            if config.tie_word_embeddings and stage.is_first:
                self.lm_head.weight = self.model.embed_tokens.weight

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                metadata: AttentionMetadata) -> torch.Tensor:
        """input_ids, positions [num_tokens] -> hidden [num_tokens, hidden]."""
        return self.model(input_ids, positions, metadata)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [n, hidden] -> float32 logits [n, vocab], soft-capped where the model asks for it (Gemma 2)."""
        logits = self.lm_head(hidden).float()
        cap = self.config.final_logit_softcapping
        return cap * torch.tanh(logits / cap) if cap > 0 else logits

    def attention_layers(self) -> list[Attention]:
        return [layer.self_attn.attn for layer in self.model.stage_layers]

    def holds_weight(self, hf_name: str) -> bool:
        """Whether this model's pipeline stage loads the checkpoint tensor `hf_name` (all of them without stages)."""
        return _stage_holds(self.model.stage, self.config.tie_word_embeddings, hf_name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Loads HF-named tensors through each parameter's weight_loader; every parameter (and every merged shard)
        must be filled exactly from the checkpoint, and every checkpoint tensor must land somewhere (but the all-zero
        biases older GPTQ tools saved beside packed linears that have none)."""
        params = dict(self.named_parameters())  # tied lm_head.weight is the same object, listed once
        loaded: set[tuple[str, object]] = set()
        tied = self.config.tie_word_embeddings
        for hf_name, tensor in weights:
            if (hf_name.endswith(_IGNORED_SUFFIXES) or (hf_name == "lm_head.weight" and tied)
                    or not _stage_holds(self.model.stage, tied, hf_name)):
                continue
            if hf_name.endswith(KV_SCALE_SUFFIXES):
                load_kv_scale(self, hf_name, tensor)
                continue
            name, shard_id = _our_name(hf_name)
            if tied and name == "model.embed_tokens.weight" and name not in params:
                name = "lm_head.weight"  # a last stage without the embedding
            if name.endswith(".bias") and name not in params and _packs_int_weights(self, name[:-len(".bias")]):
                # Older auto-gptq / GPTQ-for-LLaMa save a bias for every quantized linear, zeros where the model
                # has none; dropping any other would change the outputs.
                if torch.count_nonzero(tensor):
                    raise ValueError(f"{hf_name!r} in the checkpoint for {self.config.architecture} is a nonzero "
                                     f"bias (largest {float(tensor.abs().max()):g}) on a linear that config.json "
                                     "gives none (attention_bias / mlp_bias); ignoring it would change the outputs")
                continue
            if name not in params:
                raise ValueError(f"unexpected tensor {hf_name!r} in checkpoint for {self.config.architecture}")
            param = params[name]
            weight_loader = getattr(param, "weight_loader", default_weight_loader)
            try:
                weight_loader(param, tensor, shard_id)
            except ValueError as error:
                raise ValueError(f"cannot load {hf_name!r}: {error}") from error
            loaded.add((name, shard_id))
        missing = _expected_loads(params) - loaded
        if missing:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) for {self.config.architecture}: "
                             + ", ".join(sorted(_hf_name(name, shard) for name, shard in missing)))


def _stage_holds(stage: PipelineStage, tied: bool, hf_name: str) -> bool:
    parts = hf_name.split(".", 3)
    if parts[:2] == ["model", "layers"]:
        return int(parts[2]) in stage.layers
    if hf_name.startswith("model.embed_tokens."):
        return stage.is_first or (stage.is_last and tied)
    if hf_name.startswith(("model.norm.", "lm_head.")):
        return stage.is_last
    return True


def _packs_int_weights(model: nn.Module, module_name: str) -> bool:
    """Whether `module_name` is a linear running GPTQ's or AWQ's packed layout."""
    try:
        method = model.get_submodule(module_name).quant_method
    except AttributeError:
        return False
    scheme = getattr(method, "scheme", None)
    return scheme is not None and scheme.layout in ("gptq", "awq")


def _our_name(hf_name: str) -> tuple[str, object]:
    """model.layers.0.self_attn.k_proj.weight -> (model.layers.0.self_attn.qkv_proj.weight, "k")."""
    parts = hf_name.split(".")
    for i, part in enumerate(parts):
        if part in _MERGED_SHARDS:
            parts[i], shard_id = _MERGED_SHARDS[part]
            return ".".join(parts), shard_id
    return hf_name, None


def _hf_name(name: str, shard_id: object) -> str:
    """The inverse of _our_name, for error messages."""
    for hf_part, (part, shard) in _MERGED_SHARDS.items():
        if shard == shard_id and f".{part}." in name:
            return name.replace(f".{part}.", f".{hf_part}.")
    return name


def _expected_loads(params: dict[str, nn.Parameter]) -> set[tuple[str, object]]:
    """Every (parameter, shard id) pair a complete checkpoint fills."""
    shards_of = {}
    for part, shard_id in _MERGED_SHARDS.values():
        shards_of.setdefault(part, []).append(shard_id)
    expected = set()
    for name, param in params.items():
        if getattr(param, "optional", False):  # the format's loader has a default for it (GPTQ's plain g_idx)
            continue
        merged = next((part for part in shards_of if f".{part}." in name), None)
        expected.update((name, shard) for shard in (shards_of[merged] if merged else [None]))
    return expected
