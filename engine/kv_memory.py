"""KV cache memory: how many blocks the engine can afford, and the cache tensors bound to the attention layers.

Owns the sizing rule (an explicit block count, else an explicit byte budget, else on the GPU what a profiling
forward of the largest step leaves under `gpu_memory_utilization`, else on the CPU enough for every sequence slot
within a fixed budget) and the allocation of one [2, num_blocks, block_size, num_kv_heads, head_size] tensor per
layer (with tensor parallelism, of this rank's KV heads; with pipeline parallelism, for this stage's layers only), in
the `kv_cache_dtype` (`engine.kv_dtype`), the copy of blocks within them (copy-on-write of a block that beams
shared), and with `host_swap_bytes` the host swap pool (one [num_host_blocks, 2, block_size, num_kv_heads, head_size]
tensor per layer, pinned on CUDA so the moves are asynchronous) and the moves of blocks to it and back. It does not
decide which blocks a request uses: that is the KV cache manager's job (`engine.kv_cache`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from engine.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from engine.contract import SchedulerOutput
from engine.kv_dtype import kv_cache_torch_dtype
from engine.models.config import ModelConfig
from engine.progress import progress


class KVMemory:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, model: nn.Module, device: torch.device,
                 draft: KVMemory | None = None):
        """`draft`: a draft model's KV memory, whose cache gets as many blocks as this one (the same block tables
        address both), so each block costs both."""
        self.config = config
        self.draft = draft
        self.model_config = model_config
        self.model = model
        self.device = device
        self.block_size = config.block_size
        self.max_blocks_per_seq = -(-model_config.max_model_len // self.block_size)
        self.num_blocks = 0
        self.dtype = kv_cache_torch_dtype(config.kv_cache_dtype, model_config.dtype)
        layers = model.attention_layers()
        # This stage's layers (all of them without pipeline parallelism); an encoder's count is bookkeeping only.
        self.num_layers = len(layers) or model_config.num_layers
        # This rank's shard of the heads (all of them without tensor parallelism); an encoder caches nothing.
        self.num_kv_heads, self.head_size = ((layers[0].num_kv_heads, layers[0].head_size) if layers
                                             else (model_config.num_kv_heads, model_config.head_size))
        # The host pool holds whole blocks (a draft's beside the target's), so the draft gets the target's count.
        # Pipeline stages must count the same blocks: the pool is sized on all the model's layers and each stage
        # holds its own layers' part of it.
        self.num_host_blocks = (config.host_swap_bytes or 0) // self._block_bytes(model_config.num_layers)
        if draft is not None:
            draft.num_host_blocks = self.num_host_blocks
        self.host_cache: list[torch.Tensor] | None = None

    @property
    def bytes_per_block(self) -> int:
        """A block's bytes on this rank (its stage's layers, its shard of the heads)."""
        return self._block_bytes(self.num_layers)

    def _block_bytes(self, num_layers: int) -> int:
        element_size = torch.empty((), dtype=self.dtype).element_size()
        own = 2 * num_layers * self.block_size * self.num_kv_heads * self.head_size * element_size
        return own + (self.draft.bytes_per_block if self.draft is not None else 0)

    def determine_num_blocks(self, run_largest_step: Callable[[list[int], list[list[int]]], None]) -> int:
        """`run_largest_step(lengths, block_tables)` runs the largest forward the scheduler can produce, one
        sequence of each length on its block table (the GPU profile)."""
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes // self.bytes_per_block
        if self.device.type == "cuda":
            return self._profile_gpu_budget(run_largest_step) // self.bytes_per_block
        # No device to profile: enough for every sequence slot at full length, within a fixed budget.
        useful = self.config.max_num_seqs * self.max_blocks_per_seq
        return min(useful, DEFAULT_CPU_KV_BYTES // self.bytes_per_block)

    def layer_shapes(self, num_blocks: int) -> list[tuple[tuple[int, ...], torch.dtype]]:
        """Each layer's cache (a draft's after this model's): what `allocate` takes, in its order."""
        own = [((2, num_blocks, self.block_size, self.num_kv_heads, self.head_size), self.dtype)]
        return own * len(self.model.attention_layers()) + (self.draft.layer_shapes(num_blocks) if self.draft else [])

    def allocate(self, num_blocks: int, show_progress: bool = True,
                 take: Callable[[tuple[int, ...], torch.dtype], torch.Tensor] | None = None) -> None:
        """`take(shape, dtype)`: where each layer's cache lives (a sleeping engine's fixed-address region); torch's
        allocator by default."""
        self.num_blocks = num_blocks
        layers = self.model.attention_layers()
        shape = (2, num_blocks, self.block_size, self.num_kv_heads, self.head_size)
        # The engine logs the cache's totals once it is allocated.
        for layer in progress(layers, "allocating the KV cache", "layer", len(layers)) if show_progress else layers:
            layer.kv_cache = (take(shape, self.dtype).zero_() if take is not None
                              else torch.zeros(shape, dtype=self.dtype, device=self.device))
        if self.draft is not None:
            self.draft.allocate(num_blocks, take=take)
        if self.num_host_blocks and self.host_cache is None:  # kept while asleep: host memory is not the GPU's
            self.host_cache = [torch.zeros((self.num_host_blocks, 2, self.block_size, self.num_kv_heads,
                                            self.head_size), dtype=self.dtype, pin_memory=self.device.type == "cuda")
                               for _ in layers]

    def move_blocks(self, out: SchedulerOutput) -> None:
        """The step's block moves, before its forward: swap-outs first (the blocks they free may be this step's
        copy or swap-in destinations), then copy-on-write copies, then swap-ins."""
        if out.blocks_to_swap_out:
            self.swap_out(out.blocks_to_swap_out)
        if out.blocks_to_copy:
            self.copy_blocks(out.blocks_to_copy)
        if out.blocks_to_swap_in:
            self.swap_in(out.blocks_to_swap_in)

    def swap_out(self, pairs: list[tuple[int, int]]) -> None:
        """Copies each (device, host) block's K and V on every layer to the host pool, queued on the stream."""
        pairs = sorted(pairs, key=lambda pair: pair[1])
        source = torch.tensor([d for d, _ in pairs], dtype=torch.int64, device=self.device)
        for layer, host in zip(self.model.attention_layers(), self.host_cache):
            gathered = layer.kv_cache.index_select(1, source).transpose(0, 1).contiguous()
            for start, end, first_host in _runs([h for _, h in pairs]):
                host[first_host:first_host + end - start].copy_(gathered[start:end], non_blocking=True)
        if self.draft is not None:
            self.draft.swap_out(pairs)

    def swap_in(self, pairs: list[tuple[int, int]]) -> None:
        """Copies each (host, device) block's K and V on every layer from the host pool, queued on the stream."""
        pairs = sorted(pairs)
        destination = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=self.device)
        for layer, host in zip(self.model.attention_layers(), self.host_cache):
            staged = torch.empty((len(pairs), *host.shape[1:]), dtype=host.dtype, device=self.device)
            for start, end, first_host in _runs([h for h, _ in pairs]):
                staged[start:end].copy_(host[first_host:first_host + end - start], non_blocking=True)
            layer.kv_cache.index_copy_(1, destination, staged.transpose(0, 1))
        if self.draft is not None:
            self.draft.swap_in(pairs)

    def copy_blocks(self, pairs: list[tuple[int, int]]) -> None:
        """Copies each (source, destination) block's K and V on every layer (copy-on-write of a shared block)."""
        source = torch.tensor([s for s, _ in pairs], dtype=torch.int64, device=self.device)
        destination = torch.tensor([d for _, d in pairs], dtype=torch.int64, device=self.device)
        for layer in self.model.attention_layers():
            layer.kv_cache.index_copy_(1, destination, layer.kv_cache.index_select(1, source))
        if self.draft is not None:
            self.draft.copy_blocks(pairs)

    def release(self) -> None:
        for layer in self.model.attention_layers():
            layer.kv_cache = None
        if self.draft is not None:
            self.draft.release()

    def _profile_shapes(self) -> tuple[list[int], list[list[int]]]:
        """The profiling step: `max_num_seqs` sequences (at most one per token) sharing `max_num_batched_tokens`
        tokens, each on blocks of its own and no longer than `max_model_len` (fewer tokens if the sequences cannot
        hold them: no step can schedule more); allocates a throwaway cache that holds them."""
        num_seqs = min(self.config.max_num_seqs, self.config.max_num_batched_tokens)
        num_tokens = min(self.config.max_num_batched_tokens, num_seqs * self.model_config.max_model_len)
        lengths = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        tables, start = [], 0
        for n in lengths:
            num_blocks = -(-n // self.block_size)
            tables.append(list(range(start, start + num_blocks)))
            start += num_blocks
        self.allocate(start, show_progress=False)
        return lengths, tables

    def _profile_gpu_budget(self, run_largest_step: Callable[[list[int], list[list[int]]], None]) -> int:
        """Runs the largest step on a throwaway cache and returns what memory is left for the KV cache under
        `gpu_memory_utilization`."""
        lengths, tables = self._profile_shapes()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        run_largest_step(lengths, tables)
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        self.release()
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * self.config.gpu_memory_utilization) - (total - free) - activation_peak
        if budget < self.bytes_per_block * self.max_blocks_per_seq:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache of one full-length sequence: {budget / 2**30:.2f} GiB left "
                f"after weights and activations; raise gpu_memory_utilization or lower max_model_len / "
                f"max_num_batched_tokens")
        return budget


def _runs(host_ids: list[int]) -> list[tuple[int, int, int]]:
    """Sorted host block ids as runs of consecutive ids, (start, end) positions in the list and the first id: one
    host <-> device copy each rather than one per block."""
    runs = []
    start = 0
    for i in range(1, len(host_ids) + 1):
        if i == len(host_ids) or host_ids[i] != host_ids[i - 1] + 1:
            runs.append((start, i, host_ids[start]))
            start = i
    return runs
