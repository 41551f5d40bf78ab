"""The model runner: one step of the model, from the scheduler's plain-data `SchedulerOutput` to sampled tokens.

Owns the step: it applies the step's diffs to its copies of the requests (`engine.input_batch.RequestStates`),
writes the batch into the persistent `InputBatch`, runs the forward (eagerly, or by replaying a CUDA graph of
`engine.cuda_graphs`) and samples. It builds the model and its KV cache (sized by `engine.kv_memory`) at start-up.
What it returns is plain data too (`ModelRunnerOutput`, through `PendingRunnerOutput.get`), so the same runner
serves in-process or in a worker process.

With LoRA enabled, the model's targetable linears are wrapped (`engine.lora.layers`) and each token gets its
adapter's GPU slot (-1: none); the batch is ordered by adapter so that the LoRA kernel reads each adapter's weights
once per token block. Without LoRA nothing of this exists.

Under pipeline parallelism the runner holds one stage of the model; every stage applies the same steps, and only
the last one samples (the others return an empty output).

A pooling engine (task embed or score, `pooler_info` given) samples nothing: a request whose prompt the step
completes gets its pooled vector (`engine.pooling.pooler`) instead of a token.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import numpy as np
import torch

from engine import cpu_heap, kernels
from engine.config import EngineConfig
from engine.contract import ModelRunnerOutput, PoolerInfo, SchedulerOutput, TokenLogprobs
from engine.cuda_graphs import (MIXED_GRAPH_TOKENS, CudaGraphs, GraphShape, graph_batch_sizes, graph_sizes,
                               mixed_graph_shapes)
from engine.device import to_device
from engine.distributed.pipeline import PipelineStage
from engine.distributed.progress import PROGRESS
from engine.kernels import cpu_native
from engine.input_batch import BatchRow, InputBatch, RequestStates, ScheduledRow
from engine.kv_dtype import check_kv_cache_dtype
from engine.kv_memory import KVMemory
from engine.lora.layers import add_lora_layers, other_stage_twins
from engine.lora.manager import LoraManager
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.pooling.pooler import PooledOutput, Pooler
from engine.quantization.kv_calibration import calibrate_kv_scales
from engine.quantization import producer_quant
from engine.sampler import LogprobsTensors, Sampler, SamplingMetadata, compute_prompt_logprobs, grammar_bitmask
from engine.spec_decode import stage_drafts
from engine.spec_decode.draft_model import DraftModel
from engine.spec_decode.verify import split_verified, stacked_draft_probs, verification_rows


class ModelRunner:
    def __init__(self, config: EngineConfig, model_config: ModelConfig, device: torch.device,
                 pooler_info: PoolerInfo | None = None, tp_rank: int = 0, pp_rank: int = 0):
        """`tp_rank`: which shard of the model this runner holds (of `config.tensor_parallel_size`); `pp_rank`: which
        pipeline stage (of `config.pipeline_parallel_size`)."""
        self.config = config
        self.model_config = model_config
        self.device = device
        kernels.set_backend(kernels.resolve_backend(config.kernel_backend, device))
        check_kv_cache_dtype(config.kv_cache_dtype, device, kernels.backend_name())
        if device.type == "cpu":
            cpu_heap.keep_freed_memory()
        stage = (PipelineStage.of(config, model_config.num_layers, pp_rank) if config.pipeline_parallel_size > 1
                 else None)
        self.stage = stage
        self.is_last_stage = stage is None or stage.is_last
        if stage is not None:
            stage.allocate_inbox(config.max_num_batched_tokens, model_config.hidden_size, model_config.dtype, device)
        self.model = load_model(model_config, config.model, device, config.load_format, config.task,
                                config.quantization, tp_rank, config.tensor_parallel_size, stage,
                                _gguf_dequantize(config.gguf_dequantize, device),
                                None if config.enable_lora else config.smoothquant_alpha, config.tokenizer,
                                config.outlier_fraction)
        self.pooler = (Pooler(pooler_info, self.model, device) if pooler_info is not None and self.is_last_stage
                       else None)  # an earlier stage runs its layers and hands the activations on
        self.sampler = Sampler()
        spec = config.speculative_config
        # With pipeline stages the first drafts and the last verifies (engine.spec_decode.stage_drafts).
        self.draft_model = (DraftModel(config, model_config, device)
                            if spec is not None and spec.model is not None and (stage is None or stage.is_first)
                            else None)
        self.kv_memory = KVMemory(config, model_config, self.model, device,
                                  self.draft_model.kv_memory if self.draft_model is not None else None)
        self.batch = InputBatch(config.max_num_batched_tokens, config.max_num_seqs, self.kv_memory.max_blocks_per_seq,
                                config.block_size, device, with_lora=config.enable_lora)
        self.requests = RequestStates()
        self.fixed_memory = None  # engine.sleep_rank.FixedMemory: the weights and cache after a first wake
        self.lora: LoraManager | None = None
        if config.enable_lora:
            layers = add_lora_layers(self.model, config.max_loras, config.max_lora_rank, self.batch.lora_slots.device)
            remote = other_stage_twins(layers, model_config.num_layers, stage.layers) if stage is not None else None
            self.lora = LoraManager(layers, self.model.lora_modules, config, remote)
        producer_quant.arm(self.model)  # after LoRA: its wrapped linears take float input only
        # Async scheduling: the latest step's sampled ids, on the device, and the row of each request among them.
        self._last_sampled = torch.zeros(0, dtype=torch.int64, device=device)
        self._last_sampled_rows: dict[str, int] = {}
        self.use_cuda_graphs = (config.cuda_graphs and device.type == "cuda" and self.pooler is None
                                and kernels.backend_name() == "triton")
        cap = config.max_prefill_tokens_while_decoding if config.enable_chunked_prefill else None
        self.cuda_graphs = CudaGraphs(graph_sizes(config.max_num_seqs, config.max_num_batched_tokens,
                                                  spec.num_speculative_tokens if spec is not None else 0),
                                      model_config.max_model_len,
                                      mixed_graph_shapes(config.max_num_seqs, config.max_num_batched_tokens, cap,
                                                         config.prefill_tokens_per_decode))

    # ---- start-up ----
    def determine_num_kv_blocks(self) -> int:
        return self.kv_memory.determine_num_blocks(self._run_profile_step)

    def allocate_kv_cache(self, num_blocks: int) -> None:
        self.kv_memory.allocate(num_blocks)
        if self.config.calculate_kv_scales and self.config.kv_cache_dtype != "auto":
            calibrate_kv_scales(self.model.attention_layers(), self.kv_memory.dtype,
                                self.config.tokenizer or self.config.model,
                                min(self.model_config.max_model_len, self.config.max_num_batched_tokens,
                                    num_blocks * self.config.block_size), self._run_prompt)

    def graph_batch_sizes(self) -> list[int]:
        return graph_batch_sizes(self.config.max_num_seqs, self.config.max_num_batched_tokens)

    @property
    def mixed_graph_tokens(self) -> int:
        """The token multiple of the mixed-step graphs this runner replays (0: none), which the scheduler fills."""
        return MIXED_GRAPH_TOKENS if self.use_cuda_graphs and self.cuda_graphs.mixed else 0

    def capture_cuda_graphs(self) -> None:
        if self.use_cuda_graphs:
            self.cuda_graphs.capture(
                self._forward, lambda shape: self.batch.fill([], pad_to=shape.num_seqs, pad_query_len=shape.query_len
                                                             or 1, pad_tokens=shape.mixed_tokens), self.device)
            if self.draft_model is not None:
                self.draft_model.capture_cuda_graphs()

    def release_cuda_graphs(self) -> None:
        """Drops the target's graphs and the draft model's; `capture_cuda_graphs` makes them again."""
        self.cuda_graphs.release()
        if self.draft_model is not None:
            self.draft_model.cuda_graphs.release()

    @torch.inference_mode()
    def _run_profile_step(self, lengths: list[int], block_tables: list[list[int]]) -> None:
        metadata = self.batch.fill([BatchRow(np.zeros(n, dtype=np.int64), 0, n, table)
                                    for n, table in zip(lengths, block_tables)])
        hidden = self._stage_forward(sum(lengths), metadata)
        if self.pooler is None and self.is_last_stage:
            self.model.compute_logits(hidden[:len(lengths)])

    @torch.inference_mode()
    def _run_prompt(self, token_ids: list[int]) -> None:
        """One prompt through the model on the cache's first blocks, its output unused (KV-scale calibration)."""
        table = list(range(-(-len(token_ids) // self.config.block_size)))
        self._stage_forward(len(token_ids),
                            self.batch.fill([BatchRow(np.array(token_ids), 0, len(token_ids), table)]))

    def _forward(self, num_tokens: int, metadata, **extra_inputs):
        """The model on the input buffers' first `num_tokens`; what a graph captures (no pipeline communication)."""
        return self.model(self.batch.input_ids.device[:num_tokens], self.batch.positions.device[:num_tokens], metadata,
                          **extra_inputs)

    def _stage_forward(self, num_tokens: int, metadata, graph: GraphShape | None = None, rows: int | None = None,
                       **extra_inputs):
        """The forward (eager, or the `graph` replayed) between a pipeline stage's receiving the step's activations
        from the stage before and its sending them on: the first `rows` (default `num_tokens`; a verify graph's
        rows hold each sequence's tokens padded to 1 + k, so its real tokens reach past `num_tokens`)."""
        stage, rows = self.stage, rows or num_tokens
        if stage is not None and not stage.is_first:
            stage.receive(rows)
        out = self.cuda_graphs.replay(graph) if graph is not None else self._forward(num_tokens, metadata,
                                                                                    **extra_inputs)
        if stage is not None and not stage.is_last:
            hidden, residual = (t[:rows] for t in out)
            stage.send(*((hidden.clone(), residual.clone()) if graph is not None else (hidden, residual)))
        return out

    # ---- one step ----
    @torch.inference_mode()
    def execute(self, scheduler_output: SchedulerOutput) -> PendingRunnerOutput:
        """Queues the step's forward and sampling on the device and returns without waiting for them; the output's
        `get()` waits. A request whose last token is still pending from the previous step gets it on the device."""
        rows = self.requests.apply(scheduler_output)
        self.kv_memory.move_blocks(scheduler_output)  # swaps and copy-on-write, before either model writes
        draft_probs = self._drafts(rows)
        lora_slots = None
        if self.lora is not None:
            rows.sort(key=lambda row: row.state.adapter_id or "")
            lora_slots = self._activate_loras(rows)
        num_tokens = scheduler_output.num_tokens
        graph = self.cuda_graphs.bucket(num_tokens, rows) if self.use_cuda_graphs else None
        pad_to, pad_query_len, pad_tokens = graph if graph is not None else (None, 1, 0)
        pad_query_len = pad_query_len or 1  # a mixed graph pads the step, not its rows
        # A verify graph gives every row 1 + k tokens, those of a row with fewer padded after its own.
        batch_rows, pending, sampling, draft_ids = self._batch_rows(rows, pad_query_len)
        metadata = self.batch.fill(batch_rows, pad_to=pad_to, lora_slots=lora_slots, pending=pending,
                                   last_sampled=self._last_sampled, pad_query_len=pad_query_len,
                                   pad_tokens=pad_tokens)
        rows_tokens = max(num_tokens, len(rows) * pad_query_len)  # the rows' tokens in the batch, padding included
        sample_rows = [index for index, _ in sampling]
        if sample_rows and len(sample_rows) < rows_tokens:
            self.batch.set_sample_rows(sample_rows)
        prompt_rows = self._prompt_logprob_rows(rows, scheduler_output.prompt_logprob_spans, pad_query_len)
        self.batch.mark_copies_queued()
        if self.pooler is not None:
            hidden = self._stage_forward(num_tokens, metadata, **self.pooler.model_inputs(rows))
            return self._pool(hidden, rows, scheduler_output.finished_ids)
        hidden = self._stage_forward(num_tokens, metadata, graph, rows_tokens)
        if not self.is_last_stage:  # the last stage samples and answers rank 0
            return PendingRunnerOutput([])
        output = PendingRunnerOutput([row.state.req_id for _, row in sampling])
        finish = functools.partial(self._finish_step, hidden, rows_tokens, sampling, output, scheduler_output,
                                   draft_ids, draft_probs, prompt_rows)
        if scheduler_output.structured_req_ids and scheduler_output.grammar_bitmask is None:
            output.awaits_bitmask = finish  # the engine core calls it once the matchers have the step before's tokens
        else:
            finish(scheduler_output.grammar_bitmask)
        return output

    def _drafts(self, rows: list[ScheduledRow]) -> dict[str, torch.Tensor]:
        """Fills the drafting rows' drafts from the draft model (here, or on the first stage); returns each sampling
        request's q."""
        spec = self.config.speculative_config
        if spec is None or spec.model is None:
            return {}
        if self.draft_model is None:  # a later stage: only the last one needs the drafts
            return (stage_drafts.receive(self.stage, rows, self.model_config.vocab_size, self.device)
                    if self.is_last_stage else {})
        draft_probs = self.draft_model.draft(rows)
        if self.stage is not None:
            stage_drafts.send(self.stage, rows, draft_probs, self.device)
        return draft_probs

    def _finish_step(self, hidden: torch.Tensor, num_tokens: int, sampling: list[tuple[int, ScheduledRow]],
                     output: PendingRunnerOutput, scheduler_output: SchedulerOutput, draft_ids: list[int] | None,
                     draft_probs: dict[str, torch.Tensor], prompt_rows: tuple, bitmask: bytes | None) -> None:
        """Queues the step's sampling (under the grammar `bitmask`), prompt logprobs and the copies to the host."""
        output.awaits_bitmask = None
        if sampling:
            self._sample(hidden, num_tokens, [row for _, row in sampling], output, scheduler_output, draft_ids,
                         draft_probs, bitmask)
        if prompt_rows[0]:
            self._prompt_logprobs(hidden, *prompt_rows, output)
        if self.device.type == "cuda":
            output.ready = torch.cuda.Event()
            output.ready.record()

    def _pool(self, hidden: torch.Tensor, rows: list[ScheduledRow], finished_ids: list[str]) -> PendingRunnerOutput:
        output = PendingRunnerOutput([])
        output.pooled = self.pooler.pool(hidden, rows, finished_ids)
        if self.device.type == "cuda":
            output.ready = torch.cuda.Event()
            output.ready.record()
        return output

    def _batch_rows(self, rows: list[ScheduledRow], row_len: int) -> tuple[
            list[BatchRow], list[tuple[int, int]], list[tuple[int, ScheduledRow]], list[int] | None]:
        """The input rows, the tokens whose id is pending on the device (token index, row of the last sampled
        ids), the rows that sample with the index of their last token, and with speculative drafts in the step,
        the draft each sampling row verifies (-1: none). A row takes at least `row_len` tokens of the batch (a
        verify graph's padding)."""
        batch_rows, pending, sampling = [], [], []
        draft_ids = None
        offset = 0
        for row in rows:
            state, start, count = row
            if state.spec_token_ids:
                draft_ids = draft_ids if draft_ids is not None else [-1] * len(sampling)
                token_ids = [*state.token_ids[start:], *state.spec_token_ids]
                verifying, drafts = verification_rows(row, offset + count - 1, self.device)
                sampling += verifying
                draft_ids += drafts
                batch_rows.append(BatchRow(token_ids, start, count, state.block_ids))
                offset += count if count >= row_len else row_len
                continue
            token_ids = state.token_ids[start:start + count]
            if len(token_ids) < count:  # its last token was sampled by the step in flight: the id is on the device
                pending.append((offset + count - 1, self._last_sampled_rows[state.req_id]))
                token_ids = [*token_ids, 0]
            batch_rows.append(BatchRow(token_ids, start, count, state.block_ids))
            if row.samples:
                sampling.append((offset + count - 1, row))
                if draft_ids is not None:
                    draft_ids.append(-1)
            offset += count if count >= row_len else row_len
        return batch_rows, pending, sampling, draft_ids

    def _prompt_logprob_rows(self, rows: list[ScheduledRow], spans: dict[str, tuple[int, int]],
                             row_len: int) -> tuple[list[int], list[tuple[str, int, list[int]]]]:
        """Token indices whose next-token logprobs were asked for, and per request (id, k, target token ids); a
        row takes at least `row_len` tokens of the batch."""
        indices, targets = [], []
        if not spans:
            return indices, targets
        offset = 0
        for state, start, count in rows:
            if (span := spans.get(state.req_id)) is not None:
                first, last = span
                indices.extend(range(offset + first - start, offset + last - start))
                targets.append((state.req_id, state.sampling_params.prompt_logprobs, state.token_ids[first + 1:last + 1]))
            offset += count if count >= row_len else row_len
        return indices, targets

    def _sample(self, hidden: torch.Tensor, num_tokens: int, rows: list[ScheduledRow],
                output: PendingRunnerOutput, scheduler_output: SchedulerOutput, draft_ids: list[int] | None,
                draft_probs: dict[str, torch.Tensor], bitmask: bytes | None) -> None:
        num_rows = len(rows)
        # When every token samples (decode), its hidden states are the rows, in order.
        rows_hidden = (hidden[:num_rows] if num_rows == num_tokens
                       else hidden[self.batch.sample_rows.device[:num_rows]])
        logits = self.model.compute_logits(rows_hidden)
        metadata = SamplingMetadata.from_rows(rows, self.device)
        if bitmask is not None:
            metadata.grammar_bitmask = grammar_bitmask(scheduler_output.structured_req_ids, bitmask, rows, self.device)
        if draft_ids is not None:
            sampled = self.sampler(logits, metadata, to_device(torch.tensor(draft_ids), self.device),
                                   stacked_draft_probs(rows, draft_probs))
            output.accepted = _to_host(sampled.accepted)
        else:
            sampled = self.sampler(logits, metadata)
        self._last_sampled = sampled.sampled_token_ids
        self._last_sampled_rows = {row.state.req_id: i for i, row in enumerate(rows)}
        output.sampled_token_ids = _to_host(sampled.sampled_token_ids)
        if sampled.logprobs is not None:
            output.logprobs = (_logprobs_to_host(sampled.logprobs),
                               [row.state.sampling_params.logprobs or 0 for row in rows])

    def _prompt_logprobs(self, hidden: torch.Tensor, indices: list[int], targets: list[tuple[str, int, list[int]]],
                         output: PendingRunnerOutput) -> None:
        logits = self.model.compute_logits(hidden[to_device(torch.tensor(indices), self.device)])
        target_ids = to_device(torch.tensor([t for _, _, ids in targets for t in ids]), self.device)
        max_k = max(k for _, k, _ in targets)
        output.prompt_logprobs = (_logprobs_to_host(compute_prompt_logprobs(logits, target_ids, max_k)),
                                  [(req_id, k, len(ids)) for req_id, k, ids in targets])

    def _activate_loras(self, rows: list[ScheduledRow]) -> list[int]:
        """Puts the step's adapters in GPU slots; returns each row's slot (-1: the base model)."""
        num_tokens: dict[str, int] = {}
        for state, _, count in rows:
            if state.adapter_id is not None:
                num_tokens[state.adapter_id] = num_tokens.get(state.adapter_id, 0) + count
        slot_of = self.lora.activate(num_tokens)
        return [slot_of.get(row.state.adapter_id, -1) for row in rows]


class PendingRunnerOutput:
    """A step's results on their way to the host: device-to-host copies queued behind the step, and an event
    that `get()` waits on, so the host can schedule the next step meanwhile."""

    def __init__(self, request_ids: list[str]):
        self.request_ids = request_ids
        self.sampled_token_ids: torch.Tensor | None = None
        self.logprobs: tuple[LogprobsTensors, list[int]] | None = None  # tensors, each row's k
        self.prompt_logprobs: tuple[LogprobsTensors, list[tuple[str, int, int]]] | None = None  # (id, k, count)
        self.pooled: PooledOutput | None = None
        self.accepted: torch.Tensor | None = None  # verifying drafts: each sampling row's draft was accepted
        # A step whose grammar bitmask comes late: call with the packed bitmask to queue its sampling.
        self.awaits_bitmask: Callable[[bytes], None] | None = None
        self.ready: torch.cuda.Event | None = None

    def get(self) -> ModelRunnerOutput:
        if self.ready is not None:
            with PROGRESS.waiting():  # on the other ranks too, with tensor parallelism (its collectives are queued)
                self.ready.synchronize()
        output = ModelRunnerOutput(self.request_ids, [])
        if self.sampled_token_ids is not None:
            output.sampled_token_ids = self.sampled_token_ids.tolist()
        if self.logprobs is not None:
            output.logprobs = _to_token_logprobs(*self.logprobs)
        if self.accepted is not None:
            split_verified(output, self.accepted.tolist())
        if self.pooled is not None:
            output.pooled = self.pooled.to_bytes()
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


def _gguf_dequantize(option: str, device: torch.device) -> str:
    """`auto` keeps the blocks packed where the matmul dequantizes them fast: a Triton kernel (CUDA), or C on the
    CPU; a CPU without the C kernels (no compiler, as in the container image, or KVBOX_CPU_NATIVE=0) would run the
    torch reference, a few percent of the float model's speed, so there they are dequantized at load."""
    if option != "auto":
        return option
    return "matmul" if device.type != "cpu" or cpu_native.gguf_available() else "load"
