"""CUDA graphs of decode and verify steps: which batch shapes get one, their capture at start-up, and their replay.

On CUDA, decode steps (one token a sequence) and, with speculative decoding, verify steps (1 + k tokens a sequence:
the last known token and k drafts) replay graphs captured at start-up, one per batch-size bucket. The batch is
padded to the bucket with dummy sequences of as many tokens, which write nowhere (slot -1) and read the first cached
tokens of block 0, so the graph's shapes never change. Graphs remove the per-kernel launch cost that
dominates small decode batches. The inputs live in the `InputBatch`'s persistent device buffers, which every graph
reads in place; the attention kernel finds each sequence's queries from `query_start_loc` on the device, so one
graph serves any context lengths.

Mixed verify steps (n-gram drafting: sequences with fewer than k drafts, or none, beside full ones) replay the
verify graph too while it stays small: each sequence is padded to 1 + k query tokens after its own
(`InputBatch.fill`). Its seq_len counts the padding, so the kernels place its real queries at their true positions
and causal masking hides the padding from them; padding writes no K/V (slot -1) and the sampler reads only real
rows.

Other steps with prompt chunks (beside decodes, or alone) replay *mixed* graphs while they are small enough: one per
multiple of `MIXED_GRAPH_TOKENS` up to the largest step the prefill cap allows beside decodes, each over
`max_num_seqs` sequences (or as many as it has tokens). The step's rows take its first tokens and sequences; the
sequences after them are empty and the tokens after them belong to none (written nowhere, their attention rows
untouched, their outputs unread), so any split of the tokens among the sequences replays one graph. Eager, such steps
kept the host busier than the device: serving an 8B model on an H200 with prompt chunks capped at 512 beside 64
streams, the engine waited for the device 9% of its step time and lost a quarter of the throughput
(bench/RESULTS.md, tenth session). The scheduler fills a capped step up to the next multiple
(engine.scheduler_budget), so the padding is mostly prompt tokens, not waste.
"""

from __future__ import annotations

import bisect
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from engine.input_batch import ScheduledRow
from engine.models.attention import AttentionMetadata


class GraphShape(NamedTuple):
    num_seqs: int
    query_len: int  # tokens per sequence: 1 (decode) or 1 + k (verifying k drafts); 0: a mixed step
    mixed_tokens: int = 0  # a mixed step's tokens, however its sequences share them

    @property
    def num_tokens(self) -> int:
        return self.mixed_tokens if self.query_len == 0 else self.num_seqs * self.query_len


def graph_batch_sizes(max_num_seqs: int, max_num_batched_tokens: int) -> list[int]:
    """Fine steps where padding costs most relative to the batch, coarser ones where decode is bound by reading the
    weights anyway (a few padded rows cost little), so start-up captures few graphs."""
    largest = min(max_num_seqs, max_num_batched_tokens, 512)
    sizes = [1, 2, 4, *range(8, 64, 8), *range(64, 256, 16), *range(256, 513, 32)]
    return [s for s in sizes if s <= largest] + ([largest] if largest not in sizes else [])


def graph_sizes(max_num_seqs: int, max_num_batched_tokens: int,
                num_speculative_tokens: int = 0) -> dict[int, list[int]]:
    """The batch sizes captured for each query length: decode's, and with k drafts those of verify steps (1 + k
    tokens a sequence), bucketed alike within the step's token budget."""
    sizes = {1: graph_batch_sizes(max_num_seqs, max_num_batched_tokens)}
    verify = 1 + num_speculative_tokens
    if num_speculative_tokens and max_num_batched_tokens >= verify:
        sizes[verify] = graph_batch_sizes(max_num_seqs, max_num_batched_tokens // verify)
    return sizes


# Mixed graphs compute multiples of this many tokens: from here up, a step is compute bound (the H200's bf16 ridge is
# near 200 FLOP per weight byte), so one graph per 256 tokens keeps the start-up's captures few.
MIXED_GRAPH_TOKENS = 256


def mixed_graph_shapes(max_num_seqs: int, max_num_batched_tokens: int, prefill_cap: int | None,
                       prefill_tokens_per_decode: int) -> list[GraphShape]:
    """The mixed-step graphs, fewest tokens first: up to the largest step that decodes `max_num_seqs` streams beside
    the prefill cap they allow. Without a cap, prompt chunks fill whole budgets beside decodes: such steps are
    device bound and run eagerly."""
    if prefill_cap is None:
        return []
    largest = max(prefill_cap, prefill_tokens_per_decode * max_num_seqs) + max_num_seqs
    largest = min(max_num_batched_tokens, -(-largest // MIXED_GRAPH_TOKENS) * MIXED_GRAPH_TOKENS)
    sizes = [*range(MIXED_GRAPH_TOKENS, largest, MIXED_GRAPH_TOKENS), largest]
    return [GraphShape(min(max_num_seqs, size), 0, size) for size in sizes]


# A mixed step pads to the verify graph while that computes at most this many tokens: up to there a forward costs
# about what a decode step costs (reading the weights dominates: the H200's bf16 ridge is near 200 FLOP per weight
# byte, i.e. about 200 tokens), so the padding is nearly free next to the launches an eager step pays.
MIXED_STEP_MAX_TOKENS = 256


def graph_shape(sizes: dict[int, list[int]], num_tokens: int, rows: Sequence[ScheduledRow], max_model_len: int,
                mixed: Sequence[GraphShape] = ()) -> GraphShape | None:
    """The captured shape a step of `rows` (`num_tokens` in all) pads to, or None to run it eagerly: decode and
    verify graphs first (`padded_rows_shape`), else the smallest of the `mixed` graphs that holds the step."""
    shape = padded_rows_shape(sizes, num_tokens, rows, max_model_len)
    if shape is None:
        shape = next((m for m in mixed if m.mixed_tokens >= num_tokens and m.num_seqs >= len(rows)), None)
    return shape


def padded_rows_shape(sizes: dict[int, list[int]], num_tokens: int, rows: Sequence[ScheduledRow],
                      max_model_len: int) -> GraphShape | None:
    """The decode or verify shape a step pads each row to, or None: prefill chunks longer than 1 + k, mixed steps
    whose padded graph would compute over `MIXED_STEP_MAX_TOKENS`, or whose padding would reach past
    `max_model_len`, a batch beyond the largest bucket."""
    num_seqs = len(rows)
    # Decode (one token each) is implied by num_tokens == num_seqs; any other step can only pad to 1 + k a sequence.
    query_len = 1 if num_tokens == num_seqs else max(sizes)
    if not num_seqs or num_tokens > num_seqs * query_len:
        return None  # a row longer than 1 + k (or than 1, without speculation)
    buckets = sizes[query_len]
    index = bisect.bisect_left(buckets, num_seqs)
    if index == len(buckets):
        return None
    shape = GraphShape(buckets[index], query_len)
    if num_tokens == num_seqs * query_len:  # decode, or a uniform verify step unless some row is longer
        return shape if query_len == 1 or all(row.count == query_len for row in rows) else None
    if shape.num_tokens > MIXED_STEP_MAX_TOKENS:
        return None  # a mixed step the padding would make dearer than eager
    fits = all(row.count <= query_len and row.start + query_len <= max_model_len for row in rows)
    return shape if fits else None  # else a prefill chunk, or padding past the model's length


class CudaGraphs:
    def __init__(self, sizes: dict[int, list[int]], max_model_len: int, mixed: Sequence[GraphShape] = ()):
        self.sizes = sizes  # query length -> ascending batch sizes (`graph_sizes`)
        self.max_model_len = max_model_len
        self.mixed = list(mixed)  # `mixed_graph_shapes`
        self._graphs: dict[GraphShape, torch.cuda.CUDAGraph] = {}
        # Each graph's output buffers: the hidden states, or before the last pipeline stage, hidden and residual.
        self._hidden: dict[GraphShape, torch.Tensor | tuple[torch.Tensor, torch.Tensor]] = {}

    @torch.inference_mode()
    def capture(self, forward: Callable[[int, AttentionMetadata], torch.Tensor],
                pad_inputs: Callable[[GraphShape], AttentionMetadata], device: torch.device) -> None:
        """Captures one graph per shape, most tokens first so that smaller ones reuse its memory pool.
        `pad_inputs(shape)` fills the input buffers with the shape's dummy sequences; `forward(n, metadata)` runs
        the model on the first n tokens of the input buffers."""
        pool, stream = torch.cuda.graph_pool_handle(), torch.cuda.Stream(device)
        shapes = [GraphShape(size, query_len) for query_len, sizes in self.sizes.items() for size in sizes]
        shapes += self.mixed
        for shape in sorted(shapes, key=lambda shape: shape.num_tokens, reverse=True):
            metadata = pad_inputs(shape)
            # Compiles the Triton kernels for this shape (and lets cuBLAS pick its kernels) outside the capture.
            forward(shape.num_tokens, metadata)
            torch.cuda.synchronize(device)
            # What `torch.cuda.graph` does, less the device and pinned host caches it empties before each capture:
            # back to back, every capture gave the warm-up's blocks back to the driver for the next to take again,
            # and a sleeping engine's first wake (which captures) freed the pinned host copy its next sleep reuses.
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.stream(stream):
                graph.capture_begin(pool=pool)
                try:
                    self._hidden[shape] = forward(shape.num_tokens, metadata)
                finally:
                    graph.capture_end()
            self._graphs[shape] = graph
        torch.cuda.synchronize(device)

    def release(self) -> None:
        """Drops every graph (their memory pool goes with them); `capture` makes them again."""
        self._graphs.clear()
        self._hidden.clear()

    def bucket(self, num_tokens: int, rows: Sequence[ScheduledRow]) -> GraphShape | None:
        """The graph to replay for a step, or None to run it eagerly."""
        return graph_shape(self.sizes, num_tokens, rows, self.max_model_len, self.mixed) if self._graphs else None

    def replay(self, shape: GraphShape) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """Runs the shape's graph on what the input buffers hold; returns its output (padded rows last)."""
        self._graphs[shape].replay()
        return self._hidden[shape]
