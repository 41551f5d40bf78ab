"""BERT and RoBERTa / XLM-RoBERTa encoders (MiniLM, bge, e5, gte style) and their cross-encoder heads
(`*ForSequenceClassification`): bidirectional attention, learned absolute positions, token types, post-norm layers.

An encoder keeps no KV cache: the engine gives it each prompt whole in one step (it turns chunked prefill and prefix
caching off for encoders), so a forward sees every token of every sequence. The linears run on the flat,
padding-free batch. Attention on CUDA in half precision is FlashAttention's varlen kernel over the same flat batch
(`torch.nn.attention.varlen`); elsewhere it pads to [sequences, longest] with a key mask, in one SDPA call. The padded
SDPA on CUDA was host-bound: each step's new (sequences, longest) shape costs cuDNN a new plan.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from engine.models.attention import AttentionMetadata
from engine.models.config import ModelConfig
from engine.models.layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, default_weight_loader

_ACTIVATIONS = {"gelu": lambda x: F.gelu(x), "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
                "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"), "relu": F.relu}
# HF name part (after the "bert." / "roberta." prefix) -> (ours, shard id). Longest parts first: the first match wins.
_RENAMES = (
    ("attention.self.query", "qkv_proj", "q"), ("attention.self.key", "qkv_proj", "k"),
    ("attention.self.value", "qkv_proj", "v"), ("attention.output.LayerNorm", "attn_norm", None),
    ("attention.output.dense", "o_proj", None), ("intermediate.dense", "up_proj", None),
    ("output.LayerNorm", "mlp_norm", None), ("output.dense", "down_proj", None),
    ("encoder.layer.", "layers.", None),
)
# The cross-encoder head: BERT's pooler + classifier, RoBERTa's classifier.dense + classifier.out_proj.
_HEAD_NAMES = {"pooler.dense": "head.dense", "classifier.dense": "head.dense", "classifier.out_proj": "head.out_proj",
               "classifier": "head.out_proj"}
_PREFIXES = ("bert.", "roberta.")


@functools.cache
def _varlen_attn() -> Callable | None:
    """FlashAttention's varlen entry point, imported on first use: the module imports torch._dynamo (1.7 s on the
    CPU), which every engine paid at start-up through the model registry. None before torch 2.10."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


class EncoderBatch(NamedTuple):
    """The sequences of the flat batch: their boundaries for the varlen kernel, or where each flat token sits in the
    padded [num_seqs, max_len] attention batch and the key mask."""
    num_seqs: int
    max_len: int
    cu_seqlens: torch.Tensor | None = None  # [num_seqs + 1] int32, varlen only
    index: torch.Tensor | None = None  # [num_tokens] int64: seq * max_len + position in seq
    mask: torch.Tensor | None = None  # [num_seqs, 1, 1, max_len] bool: a real key

    @classmethod
    def from_metadata(cls, metadata: AttentionMetadata, num_tokens: int, varlen: bool) -> EncoderBatch:
        if varlen:
            return cls(metadata.query_start_loc.shape[0] - 1, metadata.max_query_len,
                       cu_seqlens=metadata.query_start_loc.int())
        starts = metadata.query_start_loc.long()
        lengths = starts[1:] - starts[:-1]
        num_seqs, max_len = lengths.shape[0], metadata.max_query_len
        seq = torch.repeat_interleave(torch.arange(num_seqs, device=starts.device), lengths, output_size=num_tokens)
        index = seq * max_len + torch.arange(num_tokens, device=starts.device) - starts[seq]
        mask = torch.arange(max_len, device=starts.device)[None, :] < lengths[:, None]
        return cls(num_seqs, max_len, index=index, mask=mask[:, None, None, :])


class BertLayer(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        hidden, eps = config.hidden_size, config.layer_norm_eps
        self.num_heads, self.head_size = config.num_heads, config.head_size
        self.qkv_proj = QKVParallelLinear(hidden, config.head_size, config.num_heads, config.num_heads, bias=True)
        self.o_proj = RowParallelLinear(hidden, hidden, bias=True)
        self.attn_norm = nn.LayerNorm(hidden, eps=eps)
        self.up_proj = ColumnParallelLinear(hidden, config.intermediate_size, bias=True)
        self.down_proj = RowParallelLinear(config.intermediate_size, hidden, bias=True)
        self.mlp_norm = nn.LayerNorm(hidden, eps=eps)
        if config.hidden_act not in _ACTIVATIONS:
            raise ValueError(f"unsupported hidden_act {config.hidden_act!r} for an encoder")
        self.act = _ACTIVATIONS[config.hidden_act]

    def forward(self, hidden: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        hidden = self.attn_norm(hidden + self.o_proj(self._attention(hidden, batch)))
        return self.mlp_norm(hidden + self.down_proj(self.act(self.up_proj(hidden))))

    def _attention(self, hidden: torch.Tensor, batch: EncoderBatch) -> torch.Tensor:
        width = self.num_heads * self.head_size
        qkv = self.qkv_proj(hidden)  # [num_tokens, 3 * width]
        if batch.cu_seqlens is not None:
            q, k, v = qkv.view(-1, 3, self.num_heads, self.head_size).unbind(1)
            cu, longest = batch.cu_seqlens, batch.max_len
            return _varlen_attn()(q, k, v, cu, cu, longest, longest).view(-1, width)
        padded = qkv.new_zeros(batch.num_seqs * batch.max_len, 3 * width).index_copy_(0, batch.index, qkv)
        # [3, num_seqs, heads, max_len, head_size]
        q, k, v = padded.view(batch.num_seqs, batch.max_len, 3, self.num_heads, self.head_size).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=batch.mask)  # [num_seqs, heads, max_len, head_size]
        return out.transpose(1, 2).reshape(-1, width).index_select(0, batch.index)  # [num_tokens, width]


class ClassifierHead(nn.Module):
    """dense + tanh over the first token, then the label projection (BERT's pooler + classifier, RoBERTa's head)."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.dense = ColumnParallelLinear(config.hidden_size, config.hidden_size, bias=True)
        self.out_proj = ColumnParallelLinear(config.hidden_size, config.num_labels, bias=True)

    def forward(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.out_proj(torch.tanh(self.dense(first_token)))


class BertEmbeddings(nn.Module):
    def __init__(self, config: ModelConfig):
        super().__init__()
        self.word_embeddings = nn.Embedding(config.vocab_size, config.hidden_size)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.token_type_embeddings = (nn.Embedding(config.type_vocab_size, config.hidden_size)
                                      if config.type_vocab_size else None)
        self.LayerNorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.position_offset = config.position_offset  # RoBERTa counts positions from padding_idx + 1

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor,
                token_type_ids: torch.Tensor | None) -> torch.Tensor:
        hidden = self.word_embeddings(input_ids) + self.position_embeddings(positions + self.position_offset)
        if self.token_type_embeddings is not None:
            if token_type_ids is None:
                hidden = hidden + self.token_type_embeddings.weight[0]
            else:
                hidden = hidden + self.token_type_embeddings(token_type_ids)
        return self.LayerNorm(hidden)


class BertModel(nn.Module):
    """The encoder; with `classify=True` also the cross-encoder head that `classify` applies to pooled CLS states."""

    is_encoder = True

    def __init__(self, config: ModelConfig, classify: bool = False):
        super().__init__()
        self.config = config
        self.embeddings = BertEmbeddings(config)
        self.layers = nn.ModuleList(BertLayer(config) for _ in range(config.num_layers))
        self.head = ClassifierHead(config) if classify else None

    @property
    def uses_token_types(self) -> bool:
        return self.embeddings.token_type_embeddings is not None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, metadata: AttentionMetadata,
                token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions [num_tokens] (each sequence whole, from position 0) -> hidden [num_tokens, hidden]."""
        hidden = self.embeddings(input_ids, positions, token_type_ids)
        batch = EncoderBatch.from_metadata(metadata, input_ids.shape[0], self._varlen(hidden))
        for layer in self.layers:
            hidden = layer(hidden, batch)
        return hidden

    def _varlen(self, hidden: torch.Tensor) -> bool:
        """Whether FlashAttention's varlen kernel takes this batch (CUDA, half precision, its head sizes)."""
        return (hidden.is_cuda and hidden.dtype in (torch.float16, torch.bfloat16) and self.config.head_size % 8 == 0
                and self.config.head_size <= 256 and _varlen_attn() is not None)

    def classify(self, first_token: torch.Tensor) -> torch.Tensor:
        return self.head(first_token)

    def attention_layers(self) -> list:
        return []  # no KV cache

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Every parameter filled exactly once; the checkpoint's pooler is skipped when embedding (unused)."""
        params = dict(self.named_parameters())
        loaded: set[tuple[str, object]] = set()
        for hf_name, tensor in weights:
            name, shard_id = _our_name(hf_name)
            if name.endswith("position_ids") or (self.head is None and name.startswith(("pooler.", "head."))):
                continue
            if name not in params:
                raise ValueError(f"unexpected tensor {hf_name!r} in checkpoint for {self.config.architecture}")
            param = params[name]
            try:
                getattr(param, "weight_loader", default_weight_loader)(param, tensor, shard_id)
            except ValueError as error:
                raise ValueError(f"cannot load {hf_name!r}: {error}") from error
            loaded.add((name, shard_id))
        expected = {(n, s) for n in params for s in (("q", "k", "v") if ".qkv_proj." in n else (None,))}
        if missing := expected - loaded:
            raise ValueError(f"checkpoint is missing {len(missing)} tensor(s) for {self.config.architecture}: "
                             + ", ".join(sorted(f"{n}[{s}]" if s else n for n, s in missing)))


class BertForSequenceClassification(BertModel):
    def __init__(self, config: ModelConfig):
        super().__init__(config, classify=True)


def _our_name(hf_name: str) -> tuple[str, object]:
    """bert.encoder.layer.0.attention.self.key.weight -> (layers.0.qkv_proj.weight, "k")."""
    name = next((hf_name[len(p):] for p in _PREFIXES if hf_name.startswith(p)), hf_name)
    module, _, leaf = name.rpartition(".")
    if module in _HEAD_NAMES:
        return f"{_HEAD_NAMES[module]}.{leaf}", None
    shard_id = None
    for hf_part, part, shard in _RENAMES:
        if hf_part in name:
            name, shard_id = name.replace(hf_part, part), shard_id or shard
    return name, shard_id
