"""Gemma 2 on top of the Llama decoder: what differs is the layer (four (1 + w) norms, a norm after each block),
the embedding scaled by sqrt(hidden_size) and the scale/soft-caps, which come from the config
(`attention_scale`, `attn_logit_softcapping`, `final_logit_softcapping`, alternating `layer_sliding_windows`).
"""

from __future__ import annotations

from typing import ClassVar

import torch
from torch import nn

from engine.distributed.pipeline import PipelineStage
from engine.models.attention import AttentionMetadata
from engine.models.config import ModelConfig
from engine.models.layers import GatedMLP, RMSNorm, RotaryEmbedding
from engine.models.llama import LlamaAttention, LlamaForCausalLM, LlamaModel

# Gemma stores its norm weights as (scale - 1).
_NORM_OFFSET = 1.0


class Gemma2DecoderLayer(nn.Module):
    """Pre- and post-norm around both blocks; the residual add is fused into the pre-norms."""

    smoothing_norms: ClassVar[dict[str, str]] = {"self_attn.qkv_proj": "input_layernorm",
                                                 "mlp.gate_up_proj": "pre_feedforward_layernorm"}

    def __init__(self, config: ModelConfig, layer_idx: int, rotary_emb: RotaryEmbedding,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.self_attn = LlamaAttention(config, layer_idx, rotary_emb, tp_rank, tp_size)
        self.mlp = GatedMLP(config.hidden_size, config.intermediate_size, config.hidden_act, config.mlp_bias,
                            tp_rank, tp_size)
        def norm() -> RMSNorm:
            return RMSNorm(config.hidden_size, config.rms_norm_eps, _NORM_OFFSET)

        self.input_layernorm = norm()
        self.post_attention_layernorm = norm()
        self.pre_feedforward_layernorm = norm()
        self.post_feedforward_layernorm = norm()

    def forward(self, positions: torch.Tensor, hidden: torch.Tensor, residual: torch.Tensor | None,
                metadata: AttentionMetadata) -> tuple[torch.Tensor, torch.Tensor]:
        if residual is None:
            hidden, residual = self.input_layernorm(hidden), hidden
        else:
            hidden, residual = self.input_layernorm(hidden, residual)
        hidden = self.post_attention_layernorm(self.self_attn(positions, hidden, metadata))
        hidden, residual = self.pre_feedforward_layernorm(hidden, residual)
        return self.post_feedforward_layernorm(self.mlp(hidden)), residual


class Gemma2Model(LlamaModel):
    decoder_layer_cls = Gemma2DecoderLayer
    norm_weight_offset = _NORM_OFFSET

    def __init__(self, config: ModelConfig, tp_rank: int = 0, tp_size: int = 1, stage: PipelineStage | None = None):
        super().__init__(config, tp_rank, tp_size, stage)
        # HF rounds sqrt(hidden_size) to the model dtype before scaling (sqrt(3072) becomes 55.5 in bfloat16).
        self.embed_scale = torch.tensor(config.hidden_size ** 0.5, dtype=config.dtype).item()

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.embed_tokens(input_ids) * self.embed_scale  # [num_tokens, hidden]


class Gemma2ForCausalLM(LlamaForCausalLM):
    model_cls = Gemma2Model
