"""A decoder run as an embedding model (E5-Mistral, Qwen3-Embedding, gte-Qwen style): the family's stack without
its LM head, whichever way the checkpoint was saved (`*ForCausalLM` with `model.` names and an `lm_head`, or the bare
`*Model` without the prefix). Pooling happens in the runner (`engine.pooling`), over the paged engine's hidden states.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.models.attention import AttentionMetadata
from engine.models.config import ModelConfig


class DecoderEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, causal_cls: type[nn.Module]):
        super().__init__()
        self.config = config
        self.causal_cls = causal_cls
        self.model = causal_cls.model_cls(config)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def attention_layers(self) -> list:
        return self.causal_cls.attention_layers(self)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The causal class's loader checks that every parameter is filled; it skips lm_head only when tied.
        named = ((name if name.startswith("model.") else f"model.{name}", tensor)
                 for name, tensor in weights if not name.startswith("lm_head."))
        self.causal_cls.load_weights(self, named)
