"""The model runner: turns a scheduled step into flat tensors, runs one forward and samples.

Every step is one flat batch of tokens from many requests (no padding between them): input ids, positions, the
slot of each token in the KV cache, each request's block table, sequence length and query offset. These live in
buffers allocated once at the largest size the scheduler can produce, so that CUDA graphs can capture them later;
each step writes a prefix of each buffer.

The runner also owns the KV cache tensors: it sizes them (after a profiling forward on the GPU) and binds one
[2, num_blocks, block_size, num_kv_heads, head_size] tensor to each attention layer.

With LoRA enabled, the model's targetable linears are wrapped (`engine.lora.layers`) and one more persistent buffer
gives each token its adapter's GPU slot (-1: none); the batch is ordered by adapter so that the LoRA kernel reads
each adapter's weights once per token block. Without LoRA nothing of this exists.

On CUDA, decode-only steps replay CUDA graphs captured at start-up, one per batch-size bucket: the batch is padded
to the bucket with one-token dummy sequences that write nowhere (slot -1) and read one cached token, so the graph's
shapes never change. Graphs remove the per-kernel launch cost that dominates small decode batches.
"""

from __future__ import annotations

import bisect

import numpy as np
import torch

import kernels
from engine.config import DEFAULT_CPU_KV_BYTES, EngineConfig
from engine.lora.layers import add_lora_layers
from engine.lora.manager import LoraManager
from engine.models.attention import AttentionMetadata
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.outputs import TokenLogprobs
from engine.sampler import LogprobsTensors, Sampler, SamplingMetadata, compute_prompt_logprobs
from engine.scheduler import ModelRunnerOutput, ScheduledRequest, SchedulerOutput


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device):
        self.config = config
        self.model_config = model_config
        self.device = device
        kernels.set_backend(kernels.resolve_backend(config.kernel_backend, device))
        self.model = load_model(model_config, config.model, device, config.load_format)
        self.sampler = Sampler()
        self.block_size = config.block_size

        max_tokens = config.max_num_batched_tokens
        max_seqs = config.max_num_seqs
        self.max_blocks_per_seq = -(-model_config.max_model_len // self.block_size)
        pin = device.type == "cuda"
        self.input_ids = StagedBuffer((max_tokens,), torch.int64, device, pin)
        self.positions = StagedBuffer((max_tokens,), torch.int64, device, pin)
        self.slot_mapping = StagedBuffer((max_tokens,), torch.int64, device, pin)
        self.seq_lens = StagedBuffer((max_seqs,), torch.int32, device, pin)
        self.query_start_loc = StagedBuffer((max_seqs + 1,), torch.int32, device, pin)
        self.block_tables = StagedBuffer((max_seqs, self.max_blocks_per_seq), torch.int32, device, pin)
        self.sample_rows = StagedBuffer((max_tokens,), torch.int64, device, pin)
        # Async scheduling: the previous step's sampled ids stay on the device and feed this step's pending tokens.
        self.pending_dst = StagedBuffer((max_seqs,), torch.int64, device, pin)
        self.pending_src = StagedBuffer((max_seqs,), torch.int64, device, pin)
        self._last_sampled = torch.zeros(0, dtype=torch.int64, device=device)
        self._last_sampled_rows: dict[str, int] = {}
        self.lora_slots: StagedBuffer | None = None
        self.lora: LoraManager | None = None
        if config.enable_lora:
            self.lora_slots = StagedBuffer((max_tokens,), torch.int32, device, pin)
            layers = add_lora_layers(self.model, config.max_loras, config.max_lora_rank, self.lora_slots.device)
            self.lora = LoraManager(layers, self.model.lora_modules, config)
        self._inputs_copied: torch.cuda.Event | None = None
        self.num_kv_blocks = 0
        self.use_cuda_graphs = (config.cuda_graphs and device.type == "cuda"
                                and kernels.backend_name() == "triton")
        self._graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self._graph_hidden: dict[int, torch.Tensor] = {}  # each graph's output buffer
        self._graph_sizes: list[int] = []  # ascending

    # ---- KV cache ----
    @property
    def kv_bytes_per_block(self) -> int:
        mc = self.model_config
        element_size = torch.empty((), dtype=mc.dtype).element_size()
        return 2 * mc.num_layers * self.block_size * mc.num_kv_heads * mc.head_size * element_size

    def determine_num_kv_blocks(self) -> int:
        if self.config.num_kv_blocks is not None:
            return self.config.num_kv_blocks
        if self.config.kv_cache_memory_bytes is not None:
            return self.config.kv_cache_memory_bytes // self.kv_bytes_per_block
        if self.device.type == "cuda":
            return self._profile_gpu_budget() // self.kv_bytes_per_block
        # No device to profile: enough for every sequence slot at full length, within a fixed budget.
        useful = self.config.max_num_seqs * self.max_blocks_per_seq
        return min(useful, DEFAULT_CPU_KV_BYTES // self.kv_bytes_per_block)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        mc = self.model_config
        self.num_kv_blocks = num_blocks
        for layer in self.model.attention_layers():
            layer.kv_cache = torch.zeros(
                (2, num_blocks, self.block_size, mc.num_kv_heads, mc.head_size), dtype=mc.dtype, device=self.device)

    @torch.inference_mode()
    def _profile_gpu_budget(self) -> int:
        """Runs the largest step the scheduler can produce on a throwaway cache and returns what memory is left
        for the KV cache under `gpu_memory_utilization`."""
        num_tokens = self.config.max_num_batched_tokens
        num_seqs = min(self.config.max_num_seqs, num_tokens)
        lengths = [num_tokens // num_seqs + (1 if i < num_tokens % num_seqs else 0) for i in range(num_seqs)]
        blocks_per_seq = [-(-n // self.block_size) for n in lengths]
        self.allocate_kv_cache(sum(blocks_per_seq))
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(self.device)
        metadata = self._fill_buffers([
            (np.zeros(n, dtype=np.int64), 0, n, list(range(start, start + b)))
            for n, b, start in zip(lengths, blocks_per_seq, np.cumsum([0] + blocks_per_seq[:-1]).tolist())
        ])
        hidden = self.model(self.input_ids.device[:num_tokens], self.positions.device[:num_tokens], metadata)
        self.model.compute_logits(hidden[:num_seqs])
        torch.cuda.synchronize(self.device)
        activation_peak = torch.cuda.max_memory_allocated(self.device) - torch.cuda.memory_allocated(self.device)
        for layer in self.model.attention_layers():
            layer.kv_cache = None
        del hidden
        torch.cuda.empty_cache()
        free, total = torch.cuda.mem_get_info(self.device)
        budget = int(total * self.config.gpu_memory_utilization) - (total - free) - activation_peak
        if budget < self.kv_bytes_per_block * self.max_blocks_per_seq:
            raise RuntimeError(
                f"not enough GPU memory for the KV cache of one full-length sequence: {budget / 2**30:.2f} GiB left "
                f"after weights and activations; raise gpu_memory_utilization or lower max_model_len / "
                f"max_num_batched_tokens")
        return budget

    # ---- CUDA graphs ----
    def graph_batch_sizes(self) -> list[int]:
        """Fine steps where padding costs most relative to the batch, coarser ones where decode is bound by reading
        the weights anyway (a few padded rows cost little), so start-up captures few graphs."""
        largest = min(self.config.max_num_seqs, self.config.max_num_batched_tokens, 512)
        sizes = [1, 2, 4, *range(8, 64, 8), *range(64, 256, 16), *range(256, 513, 32)]
        return [s for s in sizes if s <= largest] + ([largest] if largest not in sizes else [])

    @torch.inference_mode()
    def capture_cuda_graphs(self) -> None:
        """Captures one decode graph per bucket, largest first so that smaller ones reuse its memory pool."""
        if not self.use_cuda_graphs:
            return
        pool = torch.cuda.graph_pool_handle()
        for size in reversed(self.graph_batch_sizes()):
            metadata = self._fill_buffers([], pad_to=size)
            # Compiles the Triton kernels for this shape (and lets cuBLAS pick its kernels) outside the capture.
            self.model(self.input_ids.device[:size], self.positions.device[:size], metadata)
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self._graph_hidden[size] = self.model(self.input_ids.device[:size], self.positions.device[:size], metadata)
            self._graphs[size] = graph
        torch.cuda.synchronize(self.device)
        self._graph_sizes = sorted(self._graphs)

    def _graph_size(self, scheduler_output: SchedulerOutput) -> int | None:
        """The bucket to replay for this step, or None to run eagerly (prefill chunks, or no graphs)."""
        if not self._graphs or scheduler_output.num_tokens != len(scheduler_output.scheduled):
            return None
        index = bisect.bisect_left(self._graph_sizes, scheduler_output.num_tokens)
        return self._graph_sizes[index] if index < len(self._graph_sizes) else None

    # ---- one step ----
    def _fill_buffers(self, rows: list[tuple[np.ndarray | list[int], int, int, list[int]]],
                      pad_to: int | None = None, lora_slots: list[int] | None = None,
                      pending: list[tuple[int, int]] = ()) -> AttentionMetadata:
        """rows: (token ids to compute, position of the first, count, block table) per request. `pad_to` adds
        one-token dummy sequences up to that many (CUDA graph buckets; decode rows only). `lora_slots`: each row's
        adapter slot (with LoRA enabled; default none). `pending`: (token index, row of the previous step's
        sampled ids) for tokens whose id is still on the device."""
        if self._inputs_copied is not None:
            # The last step's asynchronous copies must have left the pinned buffers before we overwrite them.
            self._inputs_copied.synchronize()
        bs = self.block_size
        input_ids, positions, slot_mapping = self.input_ids.host, self.positions.host, self.slot_mapping.host
        seq_lens, query_start_loc, block_tables = self.seq_lens.host, self.query_start_loc.host, self.block_tables.host
        t = 0
        max_query_len = max_seq_len = 0
        for i, (token_ids, start, count, block_ids) in enumerate(rows):
            end = t + count
            input_ids[t:end] = token_ids
            if count == 1:  # decode: skip numpy's per-call overhead
                positions[t] = start
                slot_mapping[t] = block_ids[start // bs] * bs + start % bs
            else:
                token_positions = np.arange(start, start + count)
                positions[t:end] = token_positions
                table = np.asarray(block_ids, dtype=np.int64)
                slot_mapping[t:end] = table[token_positions // bs] * bs + token_positions % bs
            block_tables[i, :len(block_ids)] = block_ids
            seq_lens[i] = start + count
            query_start_loc[i + 1] = end
            max_query_len = max(max_query_len, count)
            max_seq_len = max(max_seq_len, start + count)
            if self.lora_slots is not None:
                self.lora_slots.host[t:end] = lora_slots[i] if lora_slots else -1
            t = end
        num_seqs = len(rows)
        if pad_to is not None and pad_to > num_seqs:
            # Dummy sequences: token 0 at position 0, written nowhere, reading one token of the block their
            # (stale but valid) block-table row starts with.
            input_ids[t:pad_to] = 0
            positions[t:pad_to] = 0
            slot_mapping[t:pad_to] = -1
            seq_lens[num_seqs:pad_to] = 1
            query_start_loc[num_seqs + 1:pad_to + 1] = np.arange(t + 1, pad_to + 1)
            if self.lora_slots is not None:
                self.lora_slots.host[t:pad_to] = -1
            t = num_seqs = pad_to
        for buffer, n in ((self.input_ids, t), (self.positions, t), (self.slot_mapping, t), (self.seq_lens, num_seqs),
                          (self.query_start_loc, num_seqs + 1), (self.block_tables, num_seqs)):
            buffer.copy_to_device(n)
        if self.lora_slots is not None:
            self.lora_slots.copy_to_device(t)
        if pending:
            self.pending_dst.host[:len(pending)], self.pending_src.host[:len(pending)] = zip(*pending)
            dst = self.pending_dst.copy_to_device(len(pending))
            src = self.pending_src.copy_to_device(len(pending))
            self.input_ids.device.index_copy_(0, dst, self._last_sampled.index_select(0, src))
        return AttentionMetadata(
            slot_mapping=self.slot_mapping.device[:t],
            block_tables=self.block_tables.device[:num_seqs],
            seq_lens=self.seq_lens.device[:num_seqs],
            query_start_loc=self.query_start_loc.device[:num_seqs + 1],
            max_query_len=max_query_len,
            max_seq_len=max_seq_len,
        )

    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> PendingRunnerOutput:
        """Queues the step's forward and sampling on the device and returns without waiting for them; the output's
        `get()` waits. A request whose last token is still pending from the previous step gets it on the device."""
        scheduled = scheduler_output.scheduled
        graph_size = self._graph_size(scheduler_output)
        lora_slots = None
        if self.lora is not None:
            scheduled = sorted(scheduled, key=lambda s: s.request.adapter_id or "")
            lora_slots = self._activate_loras(scheduled)
        rows = []
        pending = []  # (token index, row of the previous step's sampled ids)
        # Rows whose logits we need: the last token of each request that samples, then prompt positions whose
        # next-token logprobs were asked for.
        sample_rows, sampling_requests = [], []
        prompt_rows: list[tuple[str, int, list[int]]] = []  # (request id, k, target token ids)
        prompt_row_indices: list[int] = []
        offset = 0
        for s in scheduled:
            request, start, count = s.request, s.num_computed_before, s.num_new_tokens
            token_ids = request.all_token_ids[start:start + count]
            if len(token_ids) < count:  # its last token was sampled by the step in flight: the id is on the device
                pending.append((offset + count - 1, self._last_sampled_rows[request.request_id]))
                token_ids = [*token_ids, 0]
            rows.append((token_ids, start, count, s.block_ids))
            if s.samples:
                sample_rows.append(offset + count - 1)
                sampling_requests.append(request)
            if request.needs_prompt_logprobs:
                first = max(start, request.num_prompt_logprobs_done)
                last = min(start + count, request.num_prompt_tokens - 1)
                if last > first:
                    prompt_row_indices.extend(range(offset + first - start, offset + last - start))
                    prompt_rows.append((request.request_id, request.sampling_params.prompt_logprobs,
                                        request.all_token_ids[first + 1:last + 1]))
                    request.num_prompt_logprobs_done = last
            offset += count

        num_tokens = scheduler_output.num_tokens
        num_rows = len(sample_rows)
        metadata = self._fill_buffers(rows, pad_to=graph_size, lora_slots=lora_slots, pending=pending)
        if sample_rows and num_rows < num_tokens:
            self.sample_rows.host[:num_rows] = sample_rows
            self.sample_rows.copy_to_device(num_rows)
        if self.device.type == "cuda":
            # Every staged copy of this step is queued; the next step may refill the host buffers once they ran.
            self._inputs_copied = torch.cuda.Event()
            self._inputs_copied.record()
        if graph_size is not None:
            self._graphs[graph_size].replay()
            hidden = self._graph_hidden[graph_size]
        else:
            hidden = self.model(self.input_ids.device[:num_tokens], self.positions.device[:num_tokens], metadata)

        output = PendingRunnerOutput([r.request_id for r in sampling_requests])
        if sample_rows:
            # When every token samples (decode), its hidden states are the rows, in order.
            rows_hidden = hidden[:num_rows] if num_rows == num_tokens else hidden[self.sample_rows.device[:num_rows]]
            logits = self.model.compute_logits(rows_hidden)
            sampled = self.sampler(logits, SamplingMetadata.from_requests(sampling_requests, self.device))
            self._last_sampled = sampled.sampled_token_ids
            self._last_sampled_rows = {r.request_id: i for i, r in enumerate(sampling_requests)}
            output.sampled_token_ids = _to_host(sampled.sampled_token_ids)
            if sampled.logprobs is not None:
                output.logprobs = (_logprobs_to_host(sampled.logprobs),
                                   [r.sampling_params.logprobs or 0 for r in sampling_requests])
        if prompt_rows:
            logits = self.model.compute_logits(hidden[torch.tensor(prompt_row_indices, device=self.device)])
            targets = torch.tensor([t for _, _, ids in prompt_rows for t in ids], device=self.device)
            max_k = max(k for _, k, _ in prompt_rows)
            output.prompt_logprobs = (_logprobs_to_host(compute_prompt_logprobs(logits, targets, max_k)),
                                      [(request_id, k, len(ids)) for request_id, k, ids in prompt_rows])
        if self.device.type == "cuda":
            output.ready = torch.cuda.Event()
            output.ready.record()
        return output

    def _activate_loras(self, scheduled: list[ScheduledRequest]) -> list[int]:
        """Puts the step's adapters in GPU slots; returns each row's slot (-1: the base model)."""
        num_tokens: dict[str, int] = {}
        for s in scheduled:
            if s.request.adapter_id is not None:
                num_tokens[s.request.adapter_id] = num_tokens.get(s.request.adapter_id, 0) + s.num_new_tokens
        slot_of = self.lora.activate(num_tokens)
        return [slot_of.get(s.request.adapter_id, -1) for s in scheduled]


class PendingRunnerOutput:
    """A step's results on their way to the host: device-to-host copies queued behind the step, and an event
    that `get()` waits on, so the host can schedule the next step meanwhile."""

    def __init__(self, request_ids: list[str]):
        self.request_ids = request_ids
        self.sampled_token_ids: torch.Tensor | None = None
        self.logprobs: tuple[LogprobsTensors, list[int]] | None = None  # tensors, each row's k
        self.prompt_logprobs: tuple[LogprobsTensors, list[tuple[str, int, int]]] | None = None  # (id, k, count)
        self.ready: torch.cuda.Event | None = None

    def get(self) -> ModelRunnerOutput:
        if self.ready is not None:
            self.ready.synchronize()
        output = ModelRunnerOutput(self.request_ids, [])
        if self.sampled_token_ids is not None:
            output.sampled_token_ids = self.sampled_token_ids.tolist()
        if self.logprobs is not None:
            output.logprobs = _to_token_logprobs(*self.logprobs)
        if self.prompt_logprobs is not None:
            tensors, parts = self.prompt_logprobs
            flat = _to_token_logprobs(tensors, [k for _, k, count in parts for _ in range(count)])
            start = 0
            for request_id, _, count in parts:
                output.prompt_logprobs[request_id] = flat[start:start + count]
                start += count
        return output


def _to_host(tensor: torch.Tensor) -> torch.Tensor:
    # From CUDA, non_blocking lands in pinned memory and is ordered after the step's kernels.
    return tensor.to("cpu", non_blocking=True)


def _logprobs_to_host(tensors: LogprobsTensors) -> LogprobsTensors:
    return LogprobsTensors(_to_host(tensors.token_ids), _to_host(tensors.logprobs), _to_host(tensors.ranks))


def _to_token_logprobs(tensors: LogprobsTensors, ks: list[int]) -> list[TokenLogprobs]:
    """Splits batched logprob tensors into one entry per row, each keeping its own top-k."""
    token_ids = tensors.token_ids.tolist()
    logprobs = tensors.logprobs.tolist()
    ranks = tensors.ranks.tolist()
    return [TokenLogprobs(token_ids[i][:k + 1], logprobs[i][:k + 1], ranks[i]) for i, k in enumerate(ks)]


class StagedBuffer:
    """A device tensor with a host twin (pinned on CUDA, so the copy is asynchronous) that each step writes
    through numpy; the device side keeps its address for the life of the runner, as CUDA graphs require."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device, pin: bool):
        self._host = torch.zeros(shape, dtype=dtype, pin_memory=pin)
        self.host = self._host.numpy()
        self.device = torch.zeros(shape, dtype=dtype, device=device)

    def copy_to_device(self, n: int) -> torch.Tensor:
        """Copies the first n rows to the device and returns the device view of them."""
        self.device[:n].copy_(self._host[:n], non_blocking=True)
        return self.device[:n]
