"""The dashboard's speculative-decoding card: a model's draft acceptance, from its replicas' engine counters
(`SchedulerStats.spec_decoding`, vLLM's spec_decode counters) summed over them, since the engines started.

acceptance_rate: accepted / draft tokens; mean_accepted_length: tokens a verification step yields, 1 + accepted /
drafts (vLLM's "mean acceptance length"); per_position: the share of drafts whose i-th token was accepted. None for
a model served without speculative decoding; a rate is None until the model has verified a draft.
"""

from __future__ import annotations

from typing import Any

from engine.contract import SchedulerStats


def spec_decoding_snapshot(enabled: bool, stats: list[SchedulerStats]) -> dict[str, Any] | None:
    if not enabled:
        return None
    counters = [s.spec_decoding for s in stats if s.spec_decoding is not None]
    drafts = sum(c.num_drafts for c in counters)
    draft_tokens = sum(c.num_draft_tokens for c in counters)
    accepted = sum(c.num_accepted_tokens for c in counters)
    positions = max((len(c.num_accepted_tokens_per_pos) for c in counters), default=0)
    per_position = [sum(c.num_accepted_tokens_per_pos[i] for c in counters
                        if i < len(c.num_accepted_tokens_per_pos)) for i in range(positions)]
    return {
        "drafts": drafts,
        "draft_tokens": draft_tokens,
        "accepted_tokens": accepted,
        "acceptance_rate": accepted / draft_tokens if draft_tokens else None,
        "mean_accepted_length": 1 + accepted / drafts if drafts else None,
        "per_position": [n / drafts if drafts else None for n in per_position],
    }
