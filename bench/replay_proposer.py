"""Bench-only draft proposer for speculative decoding's draft-free upper bound: it replays the target model's own
greedy continuation, recorded by earlier runs, so every draft is accepted (acceptance 1.0). What is measured is then
the cost of verifying k drafts per forward, with no draft model and no misses.

In bf16 the target's continuation depends on the steps' shapes (a verification's k + 1 query tokens round
differently from a decode step's one), so a continuation recorded without speculation stops applying at the first
flipped near-tie, and with no draft to propose the rest decodes a token a step. Each prompt therefore keeps every
continuation recorded so far, and drafts come from the one that agrees longest with what was generated: passes that
each add their own output extend what can be replayed until a pass reproduces one of its sources.
"""

from __future__ import annotations


class ReplayProposer:
    def __init__(self, sources: list[list[list[int]]], prompt_len: int):
        """`sources`: per prompt, its recorded sequences (prompt + greedy output), all prompts `prompt_len` tokens."""
        self._by_prompt: dict[tuple[int, ...], list[list[int]]] = {}
        for sequences in sources:
            for sequence in sequences:
                self._by_prompt.setdefault(tuple(sequence[:prompt_len]), []).append(sequence)
        self._prompt_len = prompt_len

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        n = len(token_ids)
        for sequence in self._by_prompt.get(tuple(token_ids[:self._prompt_len]), ()):
            if len(sequence) > n and sequence[:n] == token_ids:
                return sequence[n:n + max_drafts]
        return []
