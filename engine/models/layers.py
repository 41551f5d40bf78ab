"""Building blocks shared by the model files: tensor-parallel linears, embeddings, RMSNorm, RoPE, the gated MLP.
How a linear stores and multiplies its weight (float or quantized) is its linear method's (`engine.quantization`).

Every linear is written for tensor parallelism: it holds only its rank's shard (`tp_rank` of `tp_size`) and each of
its parameters carries a `weight_loader(param, loaded_weight, shard_id=None)` that cuts that shard out of a full HF
tensor, so merged weights (q/k/v, gate/up) load straight from HF's separate tensors. Their collectives run on the
tensor-parallel group of the rank's pipeline stage. The fused math goes through
`kernels.<op>`, the backend switch; attention itself lives in `attention.py`.
"""

from __future__ import annotations

import math
from typing import Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from engine import kernels
from engine.distributed.parallel_state import tp_group
from engine.distributed.progress import PROGRESS
from engine.quantization.base import replace_param
from engine.quantization.context import current_linear_method
from engine.quantization.gguf import gguf_type
from engine.quantization.producer_quant import QuantizedActivation
from engine.kernels import reference


def default_weight_loader(param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
    """Copies a whole, unsharded tensor (norm weights, replicated biases)."""
    _copy(param.data, loaded_weight)


def _copy(dst: torch.Tensor, src: torch.Tensor) -> None:
    # copy_ would broadcast a wrong-shaped tensor without complaint.
    if dst.shape != src.shape:
        raise ValueError(f"shape mismatch: checkpoint has {tuple(src.shape)}, parameter shard wants {tuple(dst.shape)}")
    dst.copy_(src)


def _scaled(features: int, extent: int, total: int) -> int:
    """`features` of `total` expressed along an axis of `extent` entries (packed or grouped)."""
    if features * extent % total:
        raise ValueError(f"{features} of {total} output features do not fall on a boundary of an axis of {extent} "
                         "(packing or group size does not divide the merged projections)")
    return features * extent // total


def _divide(numerator: int, denominator: int) -> int:
    if numerator % denominator:
        raise ValueError(f"{numerator} does not split evenly over tensor-parallel size {denominator}")
    return numerator // denominator


class _ParallelLinear(nn.Module):
    """A linear layer whose weight [output_size, input_size] is split along `shard_dim` (0: output, 1: input).

    Its parameters come from the model's linear method (`engine.quantization`: float, GPTQ, FP8...), chosen at load;
    `_part` says where each checkpoint tensor's output features go, and one weight_loader serves every format.
    """

    def __init__(self, input_size: int, output_size: int, bias: bool, shard_dim: int, tp_rank: int, tp_size: int):
        super().__init__()
        self.tp_rank, self.tp_size, self.shard_dim = tp_rank, tp_size, shard_dim
        self.input_size = input_size if shard_dim == 0 else _divide(input_size, tp_size)
        self.output_size = _divide(output_size, tp_size) if shard_dim == 0 else output_size
        self.params_dtype = torch.get_default_dtype()
        self.quant_method = current_linear_method()
        self.quant_method.create_weights(self, self.input_size, self.output_size, self.output_slices,
                                         self.params_dtype)
        if bias:
            self.bias = nn.Parameter(torch.zeros(self.output_size), requires_grad=False)
            # A row-parallel bias is not sharded: every rank holds all of it (and only rank 0 adds it).
            self.bias.output_dim, self.bias.input_dim, self.bias.per_part = 0, None, False
            self.bias.weight_loader = self.weight_loader if shard_dim == 0 else default_weight_loader
        else:
            self.register_parameter("bias", None)

    def _part(self, shard_id: Any) -> tuple[int, int, int, int]:
        """(merged part index, first output feature on this rank, feature count, index of the checkpoint's shard
        to take) for a checkpoint tensor of `shard_id`. Column-parallel: this rank's slice of the output."""
        return 0, 0, self.output_size, self.tp_rank if self.shard_dim == 0 else 0

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        part, offset, size, source = self._part(shard_id)
        if param.per_part:
            dst = param.data[part]
            _copy(dst, loaded_weight.reshape(dst.shape))
            return
        dst = param.data
        if param.output_dim is not None:
            # A packed axis holds features at a fixed ratio (AWQ: 8 per int32), so offsets scale by its extent.
            extent = dst.shape[param.output_dim]
            offset, size = _scaled(offset, extent, self.output_size), _scaled(size, extent, self.output_size)
            dst = dst.narrow(param.output_dim, offset, size)
            loaded_weight = loaded_weight.narrow(param.output_dim, source * size, size)
        if param.input_dim is not None and self.shard_dim == 1:
            extent = dst.shape[param.input_dim]
            loaded_weight = loaded_weight.narrow(param.input_dim, self.tp_rank * extent, extent)
        _copy(dst, loaded_weight)

    @property
    def output_slices(self) -> tuple[int, ...]:
        """This rank's output features of each merged part, in order (LoRA gives each part its own A and B)."""
        return (self.output_size,)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reduce(self.partial(x))

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """This rank's share of y before any sum across ranks (a LoRA wrapper adds its delta to it)."""
        # A row-parallel bias joins once, on rank 0, so the all-reduce does not add it tp_size times.
        return self.quant_method.apply(self, x, self.bias if self.shard_dim == 0 or self.tp_rank == 0 else None)

    def reduce(self, y: torch.Tensor) -> torch.Tensor:
        """y across ranks from each rank's `partial` (column-parallel: nothing to sum)."""
        if self.shard_dim == 1 and self.tp_size > 1:
            with PROGRESS.waiting():
                dist.all_reduce(y, group=tp_group())
        return y

    # ---- LoRA: an adapter's full A and B, cut as vLLM's column / row LoRA layers cut them ----
    @property
    def full_input_size(self) -> int:
        return self.input_size * self.tp_size if self.shard_dim == 1 else self.input_size

    @property
    def full_output_slices(self) -> tuple[int, ...]:
        """Each merged part's output features in the checkpoint, all ranks together."""
        return tuple(size * self.tp_size for size in self.output_slices) if self.shard_dim == 0 else self.output_slices

    def lora_shard(self, part: int, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's share of merged part `part`'s LoRA A [rank, full in] and B [full part out, rank].
        Column-parallel: A whole, B's outputs cut as the weight's. Row-parallel: A's inputs cut as the weight's, B
        whole; each rank's (x_r A_r^T) B^T joins its partial output, and the layer's all-reduce sums them."""
        if self.shard_dim == 1:
            return a.narrow(1, self.tp_rank * self.input_size, self.input_size), b
        size = self.output_slices[part]
        return a, b.narrow(0, self._lora_source(part) * size, size)

    def _lora_source(self, part: int) -> int:
        """Which of the checkpoint's equal output chunks of `part` this rank holds."""
        return self.tp_rank


class ColumnParallelLinear(_ParallelLinear):
    """Splits the output features: each rank computes its slice of y, no communication."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(input_size, output_size, bias, 0, tp_rank, tp_size)


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel linears on the same input in one weight (gate_proj + up_proj); shard_id is the index
    into `output_sizes`. Each rank holds its slice of every part, so the parts stay side by side per rank."""

    def __init__(self, input_size: int, output_sizes: list[int], bias: bool = False, tp_rank: int = 0,
                 tp_size: int = 1):
        self.output_sizes = output_sizes
        super().__init__(input_size, sum(output_sizes), bias, tp_rank, tp_size)

    def _part(self, shard_id: Any) -> tuple[int, int, int, int]:
        offset = _divide(sum(self.output_sizes[:shard_id]), self.tp_size)
        return shard_id, offset, _divide(self.output_sizes[shard_id], self.tp_size), self.tp_rank

    @property
    def output_slices(self) -> tuple[int, ...]:
        return tuple(_divide(size, self.tp_size) for size in self.output_sizes)


class QKVParallelLinear(ColumnParallelLinear):
    """q_proj, k_proj and v_proj in one weight [q_size + 2 * kv_size, hidden]; shard_id is "q", "k" or "v".

    With more ranks than KV heads, each rank keeps one KV head and neighbouring ranks share (replicate) it.
    """

    def __init__(self, hidden_size: int, head_size: int, num_heads: int, num_kv_heads: int, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        self.head_size = head_size
        self.num_heads = _divide(num_heads, tp_size)
        if tp_size >= num_kv_heads:
            self.num_kv_heads, self.num_kv_replicas = 1, _divide(tp_size, num_kv_heads)
        else:
            self.num_kv_heads, self.num_kv_replicas = _divide(num_kv_heads, tp_size), 1
        output_size = (self.num_heads + 2 * self.num_kv_heads) * head_size * tp_size
        super().__init__(hidden_size, output_size, bias, tp_rank, tp_size)

    @property
    def q_size(self) -> int:
        return self.num_heads * self.head_size

    @property
    def kv_size(self) -> int:
        return self.num_kv_heads * self.head_size

    def _part(self, shard_id: Any) -> tuple[int, int, int, int]:
        return {
            "q": (0, 0, self.q_size, self.tp_rank),
            "k": (1, self.q_size, self.kv_size, self.tp_rank // self.num_kv_replicas),
            "v": (2, self.q_size + self.kv_size, self.kv_size, self.tp_rank // self.num_kv_replicas),
        }[shard_id]

    @property
    def output_slices(self) -> tuple[int, ...]:
        return (self.q_size, self.kv_size, self.kv_size)

    @property
    def full_output_slices(self) -> tuple[int, ...]:
        full_kv = self.kv_size * self.tp_size // self.num_kv_replicas
        return (self.q_size * self.tp_size, full_kv, full_kv)

    def _lora_source(self, part: int) -> int:
        return self.tp_rank if part == 0 else self.tp_rank // self.num_kv_replicas


class RowParallelLinear(_ParallelLinear):
    """Splits the input features: each rank multiplies its slice and the partial sums are all-reduced."""

    def __init__(self, input_size: int, output_size: int, bias: bool = False, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(input_size, output_size, bias, 1, tp_rank, tp_size)


class VocabEmbedding(nn.Module):
    """Token embedding split by vocabulary rows: rank r holds rows [r * n, (r + 1) * n), zero-padded at the end.
    From a GGUF file of quantized blocks the rows stay packed (the weight carries `gguf_type`); a lookup dequantizes
    only the rows it reads, and a tied LMHead multiplies by the packed blocks."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        self.vocab_size, self.tp_rank, self.tp_size = vocab_size, tp_rank, tp_size
        self.num_rows = -(-vocab_size // tp_size)
        self.row_start = tp_rank * self.num_rows
        self.weight = nn.Parameter(torch.zeros(self.num_rows, hidden_size), requires_grad=False)
        self.weight.weight_loader = self.weight_loader
        self.dtype = self.weight.dtype

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any = None) -> None:
        shard = loaded_weight[self.row_start:self.row_start + self.num_rows]  # the last rank's shard may be short
        qtype = gguf_type(loaded_weight)
        if qtype is not None:
            # GGUF blocks stay packed, in the same Parameter object, so that a tied LMHead holds them too.
            param.data = torch.zeros(self.num_rows, shard.shape[1], dtype=torch.uint8, device=param.device)
            param.gguf_type = qtype
        _copy(param.data[:shard.shape[0]], shard)

    def _lookup(self, input_ids: torch.Tensor) -> torch.Tensor:
        qtype = gguf_type(self.weight)
        if qtype is None:
            return F.embedding(input_ids, self.weight)
        return reference.dequantize_gguf(self.weight[input_ids], qtype).to(self.dtype)  # only the rows looked up

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:  # [num_tokens] -> [num_tokens, hidden]
        if self.tp_size == 1:
            return self._lookup(input_ids)
        is_local = (input_ids >= self.row_start) & (input_ids < self.row_start + self.num_rows)
        hidden = self._lookup((input_ids - self.row_start) * is_local) * is_local[:, None]
        with PROGRESS.waiting():
            dist.all_reduce(hidden, group=tp_group())  # each token's row lives on exactly one rank
        return hidden


class LMHead(VocabEmbedding):
    """Hidden states -> logits over the vocabulary; shares VocabEmbedding's sharding so tied weights line up.

    On a CPU the head runs from its weight reordered once (`kernels.prepack_linear`), as the linears do: torch's
    bf16 matmul reorders the weight at every call, which took a SmolLM2 decode step's head 4.8 ms. A head tied to
    the embedding keeps the plain weight for the lookups and the reordered one beside it."""

    def __init__(self, vocab_size: int, hidden_size: int, tp_rank: int = 0, tp_size: int = 1):
        super().__init__(vocab_size, hidden_size, tp_rank, tp_size)
        self.register_buffer("packed", None, persistent=False)  # the reordered copy of a shared weight

    def pack(self, shared: bool) -> None:
        """After loading: the weight in oneDNN's layout where that is faster, in place unless `shared` (tied)."""
        packed = kernels.prepack_linear(self.weight.data) if gguf_type(self.weight) is None else None
        if packed is not None and shared:
            self.packed = packed
        elif packed is not None:
            replace_param(self, "weight", packed)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:  # [num_tokens, hidden] -> [num_tokens, vocab]
        qtype = gguf_type(self.weight)
        weight = self.packed if self.packed is not None else self.weight
        logits = (kernels.linear(hidden, weight) if qtype is None  # [num_tokens, num_rows]
                  else kernels.gguf_linear(hidden, self.weight, qtype))
        if self.tp_size == 1:
            return logits
        shards = [torch.empty_like(logits) for _ in range(self.tp_size)]
        with PROGRESS.waiting():
            dist.all_gather(shards, logits, group=tp_group())
        return torch.cat(shards, dim=-1)[:, :self.vocab_size]


class RMSNorm(nn.Module):
    """RMSNorm scaling by (weight + weight_offset); Gemma stores weight - 1, so it passes weight_offset=1.0.

    Given a residual, it adds it first (fused) and returns (normalized, new residual).
    """

    def __init__(self, hidden_size: int, eps: float, weight_offset: float = 0.0):
        super().__init__()
        self.eps, self.weight_offset = eps, weight_offset
        # Initialized to the identity scale, so a norm left unloaded (dummy weights) passes values through.
        self.weight = nn.Parameter(torch.full((hidden_size,), 1.0 - weight_offset), requires_grad=False)
        self.quantize_output: torch.dtype | None = None  # set by engine.quantization.producer_quant.arm

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if self.quantize_output is not None:
            return self._quantized(x, residual)
        if residual is None:
            return kernels.rms_norm(x, self.weight, self.eps, self.weight_offset)
        return kernels.fused_add_rms_norm(x, residual, self.weight, self.eps, self.weight_offset)

    def _quantized(self, x: torch.Tensor, residual: torch.Tensor | None):
        args = (self.weight, self.eps, self.weight_offset, self.quantize_output)
        if residual is None:
            return QuantizedActivation(*kernels.rms_norm_quant(x, *args), x.dtype)
        q, scale, residual = kernels.fused_add_rms_norm_quant(x, residual, *args)
        return QuantizedActivation(q, scale, x.dtype), residual


def rope_inv_freq(rotary_dim: int, base: float, scaling: dict[str, Any] | None) -> torch.Tensor:
    """Inverse frequencies [rotary_dim / 2] in float32, computed as transformers' ROPE_INIT_FUNCTIONS do."""
    exponents = torch.arange(0, rotary_dim, 2, dtype=torch.int64).to(torch.float32) / rotary_dim
    inv_freq = 1.0 / (base ** exponents)
    if scaling is None:
        return inv_freq
    if scaling["rope_type"] == "linear":
        return inv_freq / scaling["factor"]
    if scaling["rope_type"] == "llama3":
        return _llama3_inv_freq(inv_freq, **{k: v for k, v in scaling.items() if k != "rope_type"})
    raise ValueError(f"unsupported rope type {scaling['rope_type']!r}")


def _llama3_inv_freq(inv_freq: torch.Tensor, factor: float, low_freq_factor: float, high_freq_factor: float,
                     original_max_position_embeddings: int) -> torch.Tensor:
    """Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, the band between interpolated."""
    low_freq_wavelen = original_max_position_embeddings / low_freq_factor
    high_freq_wavelen = original_max_position_embeddings / high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    inv_freq = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (original_max_position_embeddings / wavelen - low_freq_factor) / (high_freq_factor - low_freq_factor)
    smoothed = (1 - smooth) * inv_freq / factor + smooth * inv_freq
    is_medium = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return torch.where(is_medium, smoothed, inv_freq)


class RotaryEmbedding(nn.Module):
    """The float32 cos/sin table that rotates q and k, in the neox (rotate-half) layout HF Llama uses; the attention
    layer applies it (`kernels.rotary_store_kv`) as it stores K/V."""

    def __init__(self, rotary_dim: int, max_position: int, base: float, scaling: dict[str, Any] | None = None):
        super().__init__()
        inv_freq = rope_inv_freq(rotary_dim, base, scaling)  # [rotary_dim / 2]
        positions = torch.arange(max_position, dtype=torch.float32)
        freqs = torch.outer(positions, inv_freq)  # [max_position, rotary_dim / 2]
        # [max_position, rotary_dim]: cos in the first half, sin in the second
        self.register_buffer("cos_sin_cache", torch.cat((freqs.cos(), freqs.sin()), dim=-1), persistent=False)
        self.is_neox = True


# hidden_act -> (the gated activation, the same writing its output quantized per token)
_ACT_AND_MUL: dict[str, tuple[Callable, Callable]] = {
    "silu": (kernels.silu_and_mul, kernels.silu_and_mul_quant),
    "gelu_pytorch_tanh": (kernels.gelu_tanh_and_mul, kernels.gelu_tanh_and_mul_quant),
}


class GatedMLP(nn.Module):
    """down(act(gate(x)) * up(x)), with gate and up merged into one column-parallel weight."""

    def __init__(self, hidden_size: int, intermediate_size: int, hidden_act: str, bias: bool = False,
                 tp_rank: int = 0, tp_size: int = 1):
        super().__init__()
        if hidden_act not in _ACT_AND_MUL:
            raise ValueError(f"unsupported hidden_act {hidden_act!r}; expected one of {', '.join(_ACT_AND_MUL)}")
        self.act_and_mul, self.act_and_mul_quant = _ACT_AND_MUL[hidden_act]
        self.gate_up_proj = MergedColumnParallelLinear(hidden_size, [intermediate_size] * 2, bias, tp_rank, tp_size)
        self.down_proj = RowParallelLinear(intermediate_size, hidden_size, bias, tp_rank, tp_size)
        self.quantize_output: torch.dtype | None = None  # the activation's: set by producer_quant.arm

    def forward(self, x: torch.Tensor | QuantizedActivation) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)  # [num_tokens, 2 * intermediate / tp]
        if self.quantize_output is not None:
            act = QuantizedActivation(*self.act_and_mul_quant(gate_up, self.quantize_output), gate_up.dtype)
            return self.down_proj(act)
        return self.down_proj(self.act_and_mul(gate_up))  # [num_tokens, hidden]
