"""Maps a checkpoint's `architectures[0]` and the engine's task to the kvbox class that runs it; nothing else."""

from __future__ import annotations

from functools import partial

from torch import nn

from engine.config import ENCODER_ARCHITECTURES
from engine.models.bert import BertForSequenceClassification, BertModel
from engine.models.decoder_embed import DecoderEmbedding
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
# Decoders saved without an LM head (embedding checkpoints): task embed only.
_HEADLESS = {"LlamaModel": LlamaForCausalLM, "MistralModel": LlamaForCausalLM, "Qwen2Model": LlamaForCausalLM,
             "Qwen3Model": LlamaForCausalLM, "Gemma2Model": Gemma2ForCausalLM}
_ENCODERS: dict[str, type[nn.Module]] = {
    "BertModel": BertModel, "RobertaModel": BertModel, "XLMRobertaModel": BertModel,
}
_CROSS_ENCODERS: dict[str, type[nn.Module]] = {
    "BertForSequenceClassification": BertForSequenceClassification,
    "RobertaForSequenceClassification": BertForSequenceClassification,
    "XLMRobertaForSequenceClassification": BertForSequenceClassification,
}
_BY_TASK = {
    "generate": _MODELS,
    "embed": {**{a: partial(DecoderEmbedding, causal_cls=c) for a, c in {**_MODELS, **_HEADLESS}.items()},
              **_ENCODERS},
    "score": _CROSS_ENCODERS,
}
SUPPORTED_ARCHITECTURES = tuple(sorted({a for models in _BY_TASK.values() for a in models}))


def get_model_class(architecture: str, task: str = "generate") -> type[nn.Module]:
    models = _BY_TASK[task]
    if architecture not in models:
        serving = [t for t, m in _BY_TASK.items() if architecture in m]
        hint = (f"; it serves task {' or '.join(serving)}" if serving
                else f"; kvbox supports {', '.join(SUPPORTED_ARCHITECTURES)}")
        raise ValueError(f"architecture {architecture!r} cannot serve task {task!r}{hint}")
    return models[architecture]


def is_encoder(architecture: str) -> bool:
    return architecture in ENCODER_ARCHITECTURES
