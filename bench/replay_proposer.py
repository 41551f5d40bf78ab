"""Bench-only draft proposer for speculative decoding's draft-free upper bound: it replays the target model's own
greedy continuation, recorded by a run without speculation, so every draft is accepted (acceptance 1.0). What is
measured is then the cost of verifying k drafts per forward, with no draft model and no misses."""

from __future__ import annotations


class ReplayProposer:
    def __init__(self, sequences: list[list[int]], prompt_len: int):
        """`sequences`: prompt + greedy output of each prompt, all prompts `prompt_len` tokens long."""
        self._by_prompt = {tuple(seq[:prompt_len]): seq for seq in sequences}
        self._prompt_len = prompt_len

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        sequence = self._by_prompt.get(tuple(token_ids[:self._prompt_len]), [])
        n = len(token_ids)
        return sequence[n:n + max_drafts] if sequence[:n] == token_ids else []
