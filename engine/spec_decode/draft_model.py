"""The draft model's side of speculative decoding, in the runner: a smaller model with the target's tokenizer, its
own KV cache and its own input buffers, that drafts each step's tokens just before the target verifies them.

Its KV cache has the target's block count and is addressed through the target's block tables: every step it
computes, into the same slots, every position the target computes (the step's tokens before the drafts, then each
draft as it is drawn, the last one included). So whatever the scheduler does to the target's K/V applies to the
draft's as it is: prefix-cache hits, blocks shared between samples, rollback of rejected positions (they count as
not computed and are written again), preemption (the blocks are freed).

The scheduler reserves the draft positions (their ids arrive as `DRAFT_TOKEN_PLACEHOLDER`); `draft` fills them in.
A greedy request drafts the argmax; a sampling one draws from the draft's distribution under its temperature,
top-k, top-p and min-p (q), which rejection sampling needs beside the target's to keep the target's distribution.

With tensor parallelism every rank runs the whole draft, unsharded, with its whole KV cache (vLLM shards it like the
target instead). A draft is small: sharded, each of its k sequential forwards per step would wait on an all-reduce
per layer for little compute. Each rank computes the same drafts from the same weights, inputs and seeded
generators, as each samples the same tokens from the same logits, so no rank sends its drafts to the others. With
pipeline stages only the first stage's ranks hold the draft, and they send its drafts to the last stage
(`engine.spec_decode.stage_drafts`).

Where the target replays CUDA graphs, the draft's single-token forwards do too (`engine.cuda_graphs`, the target's
decode buckets): each of the k draws, and the first forward of a step whose rows all compute one known token (the
usual verify step: the token the target sampled last). A 1B draft's eager forward is launch-bound, several times
a replay, and is paid k + 1 times a step. Forwards over several known tokens (prefill chunks) stay eager. The
graphs read the draft's weights and cache where they were captured: the runner drops and captures them with the
target's (start-up, and a wake that did not keep the target's).
"""

from __future__ import annotations

import torch

from engine.config import EngineConfig
from engine.cuda_graphs import CudaGraphs, graph_sizes
from engine.device import to_device
from engine.input_batch import BatchRow, InputBatch, ScheduledRow
from engine.kv_memory import KVMemory
from engine.models.config import ModelConfig
from engine.models.loader import load_model
from engine.sampler import SamplingMetadata, sample_from, target_probs


class DraftModel:
    def __init__(self, config: EngineConfig, target: ModelConfig, device: torch.device):
        draft_path = config.speculative_config.model
        self.model_config = ModelConfig.from_pretrained(
            draft_path, dtype=None if config.dtype == "auto" else config.dtype, max_model_len=target.max_model_len)
        if self.model_config.vocab_size != target.vocab_size:  # a target that config.json did not describe
            raise ValueError(f"speculative_config.model: the draft's vocab_size is {self.model_config.vocab_size}, "
                             f"the target's {target.vocab_size}; they must be equal")
        self.device = device
        self.model = load_model(self.model_config, draft_path, device, config.load_format)
        self.kv_memory = KVMemory(config, self.model_config, self.model, device)
        self.batch = InputBatch(config.max_num_batched_tokens, config.max_num_seqs, self.kv_memory.max_blocks_per_seq,
                                config.block_size, device, with_lora=False)
        # Captured by the runner's `capture_cuda_graphs` only; without graphs `bucket` answers None (eager).
        self.cuda_graphs = CudaGraphs(graph_sizes(config.max_num_seqs, config.max_num_batched_tokens),
                                      self.model_config.max_model_len)

    def capture_cuda_graphs(self) -> None:
        self.cuda_graphs.capture(self._run, lambda shape: self.batch.fill([], pad_to=shape.num_seqs), self.device)

    @torch.inference_mode()
    def draft(self, rows: list[ScheduledRow]) -> dict[str, torch.Tensor]:
        """Computes the step's K/V and replaces each drafting row's placeholder drafts (`state.spec_token_ids`) with
        drawn ones. Returns each sampling (not greedy) drafting request's q ([drafts, vocab])."""
        batch_rows, drafting, last_rows, offset = [], [], [], 0
        for state, start, count in rows:
            known = count - len(state.spec_token_ids)
            batch_rows.append(BatchRow(state.token_ids[start:start + known], start, known, state.block_ids))
            offset += known
            if state.spec_token_ids:
                drafting.append((state, start + known - 1))  # the request's last known token, the drafts after it
                last_rows.append(offset - 1)
        hidden = self._forward(batch_rows)
        if not drafting:
            return {}
        logits = self.model.compute_logits(hidden[to_device(torch.tensor(last_rows), self.device)])
        num_drafts = [len(state.spec_token_ids) for state, _ in drafting]
        drafts: list[list[int]] = [[] for _ in drafting]
        probs: list[list[torch.Tensor]] = [[] for _ in drafting]
        live = list(range(len(drafting)))  # the requests that `logits` has a row for, in its order
        for j in range(max(num_drafts)):
            tokens, q = self._draw(logits, [drafting[i][0] for i in live])
            for k, (i, token) in enumerate(zip(live, tokens.tolist())):
                drafts[i].append(token)
                if q is not None:
                    probs[i].append(q[k])
            # Draft j's K/V (the target computes its position too), and from it the logits of draft j + 1.
            hidden = self._forward([BatchRow([drafts[i][j]], drafting[i][1] + j + 1, 1, drafting[i][0].block_ids)
                                    for i in live])
            keep = [k for k, i in enumerate(live) if num_drafts[i] > j + 1]
            live = [live[k] for k in keep]
            if live:
                logits = self.model.compute_logits(hidden[keep])
        for (state, _), tokens in zip(drafting, drafts):
            state.spec_token_ids = tokens
        return {state.req_id: torch.stack(q) for (state, _), q in zip(drafting, probs)
                if not state.sampling_params.is_greedy}

    def _draw(self, logits: torch.Tensor, states) -> tuple[torch.Tensor, torch.Tensor | None]:
        """One draft per row: the argmax for a greedy request, else a draw from q (returned, one row each)."""
        metadata = SamplingMetadata.from_rows([ScheduledRow(state, 0, 1) for state in states], self.device)
        if metadata.all_greedy:
            return logits.argmax(dim=-1), None
        probs = target_probs(logits, metadata)
        tokens = sample_from(probs.clone(), metadata.generators)
        if metadata.greedy_mask is not None:
            tokens = torch.where(metadata.greedy_mask, logits.argmax(dim=-1), tokens)
        return tokens, probs

    def _forward(self, rows: list[BatchRow]) -> torch.Tensor:
        """The rows' hidden states (a replayed graph's padded rows last)."""
        num_tokens = sum(row.count for row in rows)
        graph = self.cuda_graphs.bucket(num_tokens, rows)
        metadata = self.batch.fill(rows, pad_to=graph.num_seqs if graph is not None else None)
        self.batch.mark_copies_queued()
        return self.cuda_graphs.replay(graph) if graph is not None else self._run(num_tokens, metadata)

    def _run(self, num_tokens: int, metadata) -> torch.Tensor:
        return self.model(self.batch.input_ids.device[:num_tokens], self.batch.positions.device[:num_tokens],
                          metadata)
