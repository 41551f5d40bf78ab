"""A draft model under pipeline parallelism: the first stage drafts, the last stage verifies.

The first stage needs the drafts as input tokens and the last stage needs them (and, for a sampling request, their
q) to verify, while the stages between need neither. So the draft model runs on the first stage only, which sends
the step's drafts point-to-point to the rank of the same tensor-parallel shard in the last stage as soon as they are
drawn, before its own forward; the last stage receives them before its forward. Both stages know every size from
the step's plan alone (each drafting row's placeholder count, which requests are greedy), so only the values travel.
Running the draft on both stages instead would need their random draws to agree, but the last stage's sampling
consumes the same generators and the first stage's does not.

A seeded sampling request therefore draws its drafts from the first stage's copy of its generator and its verified
tokens from the last stage's: valid samples of the same distribution, not the single-stage engine's exact tokens.
"""

from __future__ import annotations

import torch

from engine.input_batch import ScheduledRow
from engine.distributed.pipeline import PipelineStage


def _drafting(rows: list[ScheduledRow]) -> list[ScheduledRow]:
    return [row for row in rows if row.state.spec_token_ids]


def send(stage: PipelineStage, rows: list[ScheduledRow], draft_probs: dict[str, torch.Tensor],
         device: torch.device) -> None:
    """After the first stage's `DraftModel.draft` filled the rows' drafts: the ids, then the sampling rows' q."""
    drafting = _drafting(rows)
    if not drafting:
        return
    ids = torch.tensor([token for row in drafting for token in row.state.spec_token_ids], dtype=torch.int64)
    stage.send_to_last(ids.to(device))
    sampled = [draft_probs[row.state.req_id] for row in drafting if row.state.req_id in draft_probs]
    if sampled:
        stage.send_to_last(torch.cat(sampled).float().contiguous())


def receive(stage: PipelineStage, rows: list[ScheduledRow], vocab_size: int,
            device: torch.device) -> dict[str, torch.Tensor]:
    """The last stage's side: replaces the rows' placeholder drafts with the first stage's; returns each sampling
    request's q ([drafts, vocab]), as `DraftModel.draft` does."""
    drafting = _drafting(rows)
    if not drafting:
        return {}
    counts = [len(row.state.spec_token_ids) for row in drafting]
    ids = stage.receive_from_first(torch.empty(sum(counts), dtype=torch.int64, device=device)).tolist()
    start = 0
    for row, count in zip(drafting, counts):
        row.state.spec_token_ids = ids[start:start + count]
        start += count
    sampling = [(row, count) for row, count in zip(drafting, counts) if not row.state.sampling_params.is_greedy]
    if not sampling:
        return {}
    probs = stage.receive_from_first(torch.empty(sum(c for _, c in sampling), vocab_size, dtype=torch.float32,
                                                 device=device))
    return dict(zip([row.state.req_id for row, _ in sampling], probs.split([c for _, c in sampling])))
