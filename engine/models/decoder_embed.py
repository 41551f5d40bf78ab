"""A decoder run as an embedding model (E5-Mistral, Qwen3-Embedding, gte-Qwen style): the family's stack without
its LM head, whichever way the checkpoint was saved (`*ForCausalLM` with `model.` names and an `lm_head`, or the bare
`*Model` without the prefix). Pooling happens in the runner (`engine.pooling`), over the paged engine's hidden states.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn

from engine.distributed.pipeline import PipelineStage
from engine.models.attention import AttentionMetadata
from engine.models.config import ModelConfig


class DecoderEmbedding(nn.Module):
    def __init__(self, config: ModelConfig, tp_rank: int = 0, tp_size: int = 1, stage: PipelineStage | None = None, *,
                 causal_cls: type[nn.Module]):
        super().__init__()
        self.config = config
        self.causal_cls = causal_cls
        self.model = causal_cls.model_cls(config, tp_rank, tp_size, stage)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata) -> torch.Tensor:
        return self.model(input_ids, positions, metadata)

    def attention_layers(self) -> list:
        return self.causal_cls.attention_layers(self)

    def holds_weight(self, hf_name: str) -> bool:
        """Whether this model's pipeline stage loads the checkpoint tensor `hf_name`: never the LM head, the embedding
        on the first stage only (no head ties it to the last)."""
        if hf_name.startswith("lm_head."):
            return False
        name = _prefixed(hf_name)
        if name.startswith("model.embed_tokens."):
            return self.model.stage.is_first
        return self.causal_cls.holds_weight(self, name)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        # The causal class's loader checks that every parameter is filled.
        self.causal_cls.load_weights(self, ((_prefixed(name), tensor) for name, tensor in weights
                                            if self.holds_weight(name)))


def _prefixed(hf_name: str) -> str:
    """A bare `*Model` checkpoint's names without the `model.` prefix get it."""
    return hf_name if hf_name.startswith("model.") else f"model.{hf_name}"
