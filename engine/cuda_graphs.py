"""CUDA graphs of decode steps: which batch sizes get one, their capture at start-up, and their replay.

On CUDA, decode-only steps replay graphs captured at start-up, one per batch-size bucket: the batch is padded to
the bucket with one-token dummy sequences that write nowhere (slot -1) and read one cached token, so the graph's
shapes never change. Graphs remove the per-kernel launch cost that dominates small decode batches. The inputs live
in the `InputBatch`'s persistent device buffers, which every graph reads in place.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable

import torch

from engine.models.attention import AttentionMetadata


def graph_batch_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Fine steps where padding costs most relative to the batch, coarser ones where decode is bound by reading the
    weights anyway (a few padded rows cost little), so start-up captures few graphs."""
    largest = min(max_num_seqs, max_num_batched_tokens, 512)
    sizes = [1, 2, 4, *range(8, 64, 8), *range(64, 256, 16), *range(256, 513, 32)]
    return [s for s in sizes if s <= largest] + ([largest] if largest not in sizes else [])


class CudaGraphs:
    def __init__(self, batch_sizes: list[int]):
        self.batch_sizes = batch_sizes  # ascending
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._hidden: dict[int, torch.Tensor] = {}  # each graph's output buffer

    @torch.inference_mode()
    def capture(self, forward: Callable[[int, AttentionMetadata], torch.Tensor],
                pad_inputs: Callable[[int], AttentionMetadata], device: torch.device) -> None:
        """Captures one decode graph per bucket, largest first so that smaller ones reuse its memory pool.
        `pad_inputs(size)` fills the input buffers with `size` dummy decodes; `forward(size, metadata)` runs the
        model on the first `size` tokens of the input buffers."""
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.batch_sizes):
            metadata = pad_inputs(size)
            # Compiles the Triton kernels for this shape (and lets cuBLAS pick its kernels) outside the capture.
            forward(size, metadata)
            torch.cuda.synchronize(device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._hidden[size] = forward(size, metadata)
            self._graphs[size] = graph
        torch.cuda.synchronize(device)

    def bucket(self, num_tokens: int, num_reqs: int) -> int | None:
        """The bucket to replay for a step, or None to run it eagerly (prefill chunks, or no graphs)."""
        if not self._graphs or num_tokens != num_reqs:
            return None
        index = bisect.bisect_left(self.batch_sizes, num_tokens)
        return self.batch_sizes[index] if index < len(self.batch_sizes) else None

    def replay(self, size: int) -> torch.Tensor:
        """Runs the bucket's graph on what the input buffers hold; returns its hidden states (padded rows last)."""
        self._graphs[size].replay()
        return self._hidden[size]
