"""The runner's pooling: a step's hidden states -> the finished requests' embeddings (or cross-encoder scores).

A pooling request produces nothing until its prompt is computed. Its prompt may take several steps (chunked prefill
on a decoder): mean pooling adds each chunk's sum to a running total, CLS keeps the first chunk's first state, last
pooling needs only the final chunk. Totals live here, keyed by request id, until the request finishes, is computed
again from position 0 (after a preemption) or is dropped (aborted). Results leave as float32 tensors on their way
to the host; `PooledOutput.to_bytes` turns them into the plain data the contract carries.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.contract import PoolerInfo
from engine.device import to_device
from engine.input_batch import ScheduledRow


class PooledOutput:
    """The step's finished requests and their vectors ([n, width], host-bound), each trimmed to its own length."""

    def __init__(self, req_ids: list[str], vectors: torch.Tensor, lengths: list[int]):
        self.req_ids, self.vectors, self.lengths = req_ids, vectors, lengths

    def to_bytes(self) -> dict[str, bytes]:
        rows = self.vectors.numpy()
        return {req_id: rows[i, :n].tobytes() for i, (req_id, n) in enumerate(zip(self.req_ids, self.lengths))}


class Pooler:
    def __init__(self, info: PoolerInfo, model: nn.Module, device: torch.device):
        self.info = info
        self.model = model
        self.device = device
        self._totals: dict[str, torch.Tensor] = {}  # req id -> its pooled state over the chunks so far

    def model_inputs(self, rows: list[ScheduledRow]) -> dict[str, torch.Tensor]:
        """Extra forward inputs: token types, for a model that has them and a step with a text pair."""
        if not getattr(self.model, "uses_token_types", False):
            return {}
        pairs = [row.state.pooling.token_type_ids if row.state.pooling else None for row in rows]
        if not any(pairs):
            return {}
        types = [t for (_, start, count), p in zip(rows, pairs) for t in (p[start:start + count] if p else [0] * count)]
        return {"token_type_ids": torch.tensor(types, dtype=torch.int64).to(self.device, non_blocking=True)}

    def pool(self, hidden: torch.Tensor, rows: list[ScheduledRow], finished_ids: list[str]) -> PooledOutput | None:
        for req_id in finished_ids:
            self._totals.pop(req_id, None)
        chunk = self._chunk_states(hidden, rows)  # [num_rows, hidden] float32
        done_ids, done, lengths = [], [], []
        for i, (state, start, count) in enumerate(rows):
            value = chunk[i]
            if start > 0 and self.info.pooling_type != "last":
                previous = self._totals.pop(state.req_id)
                value = previous + value if self.info.pooling_type == "mean" else previous
            if start + count < state.num_prompt_tokens:
                self._totals[state.req_id] = value
                continue
            if self.info.pooling_type == "mean":
                value = value / state.num_prompt_tokens
            done_ids.append(state.req_id)
            done.append(value)
            lengths.append(state.pooling.dimensions if state.pooling and state.pooling.dimensions else
                           self.info.hidden_size)
        if not done:
            return None
        vectors = self._finish(torch.stack(done), lengths)
        return PooledOutput(done_ids, vectors.to("cpu", non_blocking=True), lengths)

    def _chunk_states(self, hidden: torch.Tensor, rows: list[ScheduledRow]) -> torch.Tensor:
        """Each row's contribution from this step: its tokens' sum (mean), first token (cls) or last token."""
        counts = [row.count for row in rows]
        if self.info.pooling_type == "mean":
            num_tokens = sum(counts)
            seq = torch.repeat_interleave(torch.arange(len(rows), device=self.device),
                                          to_device(torch.tensor(counts), self.device), output_size=num_tokens)
            sums = torch.zeros(len(rows), hidden.shape[-1], dtype=torch.float32, device=self.device)
            return sums.index_add_(0, seq, hidden[:num_tokens].float())
        ends = torch.tensor(counts).cumsum(0)
        index = ends - torch.tensor(counts) if self.info.pooling_type == "cls" else ends - 1
        return hidden[to_device(index, self.device)].float()

    def _finish(self, pooled: torch.Tensor, lengths: list[int]) -> torch.Tensor:
        if self.info.task == "score":
            logits = self.model.classify(pooled.to(self.model.config.dtype)).float()
            return torch.sigmoid(logits)  # one label: sentence-transformers' CrossEncoder and vLLM's activation
        if not self.info.normalize:
            return pooled
        if all(n == pooled.shape[1] for n in lengths):
            return F.normalize(pooled, dim=-1)
        # Matryoshka: truncate, then normalize what is kept.
        out = torch.zeros_like(pooled)
        for i, n in enumerate(lengths):
            out[i, :n] = F.normalize(pooled[i, :n], dim=-1)
        return out
