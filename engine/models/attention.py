"""The attention layer and the per-step metadata that tells it where each token's K/V lives.

The model runner fills one `AttentionMetadata` per step (from persistent buffers) and binds each layer's KV cache
tensor once at start-up (`Attention.kv_cache`). A layer writes this step's K/V into the cache by slot, then attends
over the cache through the block tables, so prefill chunks and decodes share one code path. An fp8 cache holds
K / k_scale and V / v_scale, per-layer scales from the checkpoint (`load_kv_scale`), else calibrated at start-up
(`engine.quantization.kv_calibration`) or 1.0.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from engine import kernels
from engine.models.layers import RotaryEmbedding


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor  # [num_tokens] int64: block_id * block_size + offset; -1 for padding
    block_tables: torch.Tensor  # [num_seqs, max_blocks_per_seq] int32
    seq_lens: torch.Tensor  # [num_seqs] int32: cached tokens after this step
    query_start_loc: torch.Tensor  # [num_seqs + 1] int32
    max_query_len: int
    max_seq_len: int

    @property
    def num_seqs(self) -> int:
        return self.seq_lens.shape[0]


class Attention(nn.Module):
    """Paged attention over one layer's cache. Holds no weights: projections and the rotary table live in the
    model, which passes the table in so that one kernel rotates and stores."""

    def __init__(self, num_heads: int, num_kv_heads: int, head_size: int, scale: float,
                 sliding_window: int = 0, soft_cap: float = 0.0):
        super().__init__()
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_size = head_size
        self.scale = scale
        self.sliding_window = sliding_window
        self.soft_cap = soft_cap
        # [2, num_blocks, block_size, num_kv_heads, head_size], bound by the model runner after KV memory is sized.
        self.kv_cache: torch.Tensor | None = None
        # Used by an fp8 cache only; plain floats, so that CUDA graphs capture them as kernel arguments.
        self.k_scale = 1.0
        self.v_scale = 1.0
        self.kv_scales_from_checkpoint = False  # else `calculate_kv_scales` may calibrate them at start-up

    def forward(self, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, metadata: AttentionMetadata,
                positions: torch.Tensor | None = None, rotary_emb: RotaryEmbedding | None = None) -> torch.Tensor:
        """With `rotary_emb`, query and key are rotated (in place) at `positions` by the kernel that stores K/V."""
        num_tokens = query.shape[0]
        query = query.view(num_tokens, self.num_heads, self.head_size)
        key = key.view(num_tokens, self.num_kv_heads, self.head_size)
        value = value.view(num_tokens, self.num_kv_heads, self.head_size)
        key_cache, value_cache = self.kv_cache[0], self.kv_cache[1]
        if rotary_emb is not None:
            kernels.rotary_store_kv(positions, query, key, value, rotary_emb.cos_sin_cache, rotary_emb.is_neox,
                                    key_cache, value_cache, metadata.slot_mapping, self.k_scale, self.v_scale)
        else:
            kernels.store_kv(key, value, key_cache, value_cache, metadata.slot_mapping, self.k_scale, self.v_scale)
        out = kernels.paged_attention(
            query, key_cache, value_cache, metadata.block_tables, metadata.seq_lens, metadata.query_start_loc,
            self.scale, self.sliding_window, self.soft_cap, None, self.k_scale, self.v_scale,
        )
        return out.view(num_tokens, self.num_heads * self.head_size)


# The per-layer KV scales as the tools write them: `self_attn.k_scale` (vLLM, llm-compressor),
# `self_attn.k_proj.k_scale` (AutoFP8, ModelOpt), `self_attn.k_proj.output_scale` (older llm-compressor) and
# `self_attn.kv_scale` (vLLM's first fp8 checkpoints: one scale for K and V both).
KV_SCALE_SUFFIXES = (".k_scale", ".v_scale", ".k_proj.output_scale", ".v_proj.output_scale", ".kv_scale")


def load_kv_scale(model: nn.Module, hf_name: str, tensor: torch.Tensor) -> None:
    """`model.layers.N.self_attn.k_scale` (a scalar, or one value per tensor) -> that block's `Attention.k_scale`;
    a `kv_scale` sets k_scale and v_scale alike."""
    block_name, _, which = hf_name.rpartition(".")
    if block_name.endswith((".k_proj", ".v_proj")):  # the projection is merged into qkv_proj here: its block's
        block_name, _, projection = block_name.rpartition(".")
        which = f"{projection[0]}_scale"
    block = model.get_submodule(block_name)
    attention = next((m for m in block.modules() if isinstance(m, Attention)), None)
    if attention is None or tensor.numel() != 1:
        raise ValueError(f"unexpected KV scale {hf_name!r} of shape {tuple(tensor.shape)}: expected one value on an "
                         "attention block")
    for name in ("k_scale", "v_scale") if which == "kv_scale" else (which,):
        setattr(attention, name, float(tensor))
    attention.kv_scales_from_checkpoint = True
