"""Maps a checkpoint's `architectures[0]` to the kvbox class that runs it; nothing else."""

from __future__ import annotations

from torch import nn

from engine.models.gemma2 import Gemma2ForCausalLM
from engine.models.llama import LlamaForCausalLM

# Mistral, Qwen2 and Qwen3 are the Llama decoder with config flags (sliding window, qkv bias, qk norm).
_MODELS: dict[str, type[nn.Module]] = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "MistralForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": LlamaForCausalLM,
    "Qwen3ForCausalLM": LlamaForCausalLM,
    "Gemma2ForCausalLM": Gemma2ForCausalLM,
}
SUPPORTED_ARCHITECTURES = tuple(_MODELS)


def get_model_class(architecture: str) -> type[nn.Module]:
    if architecture not in _MODELS:
        raise ValueError(f"unsupported architecture {architecture!r}; kvbox supports "
                         + ", ".join(SUPPORTED_ARCHITECTURES))
    return _MODELS[architecture]
