"""The scheduler's side of speculative decoding: drafts for a request about to decode one token, within what the
step and the request leave room for, and the acceptance counters (vLLM's spec_decode metrics)."""

from __future__ import annotations

from typing import Protocol

from engine.config import SpeculativeConfig
from engine.contract import DRAFT_TOKEN_PLACEHOLDER, SpecDecodingStats
from engine.request import Request
from engine.spec_decode.ngram import NgramProposer


class Proposer(Protocol):
    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]: ...


class DraftModelSlots:
    """A draft model runs in the runner (`engine.spec_decode.draft_model`): here its drafts are only positions."""

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        return [DRAFT_TOKEN_PLACEHOLDER] * max_drafts


class Drafter:
    def __init__(self, config: SpeculativeConfig):
        self.num_speculative_tokens = config.num_speculative_tokens
        # The runner's draft model needs each request's latest token on the host, so no step is scheduled ahead.
        self.drafts_in_runner = config.method == "draft_model"
        # Replaceable (bench/latency.py installs a replay proposer for the draft-free upper bound).
        self.proposer: Proposer = (DraftModelSlots() if self.drafts_in_runner
                                   else NgramProposer(config.prompt_lookup_min, config.prompt_lookup_max))
        self.stats = SpecDecodingStats(num_accepted_tokens_per_pos=[0] * config.num_speculative_tokens)

    def drafts(self, request: Request, num_new: int, budget: int, max_model_len: int) -> list[int]:
        """Drafts to verify after the request's last token, when that is its only token left to compute (`num_new`)
        and its id is on the host (not pending on the device). At most as many as leave room, after the last token
        and the drafts, for the one more token the step always emits: within the step's token budget, the context
        and the request's max_tokens."""
        if num_new != 1 or request.num_pending_outputs:
            return []
        room = min(self.num_speculative_tokens, budget - 1, max_model_len - request.num_tokens - 1)
        if request.max_tokens is not None:
            room = min(room, request.max_tokens - request.num_output_tokens - 1)
        return self.proposer.propose(request.all_token_ids, room) if room > 0 else []

    def snapshot(self) -> SpecDecodingStats:
        stats = self.stats
        return SpecDecodingStats(stats.num_drafts, stats.num_draft_tokens, stats.num_accepted_tokens,
                                 list(stats.num_accepted_tokens_per_pos))

    def record(self, num_drafts: int, num_accepted: int) -> None:
        stats = self.stats
        stats.num_drafts += 1
        stats.num_draft_tokens += num_drafts
        stats.num_accepted_tokens += num_accepted
        for i in range(num_accepted):
            stats.num_accepted_tokens_per_pos[i] += 1
