"""The n-gram proposer (prompt lookup): drafts are the tokens that followed an earlier occurrence of the sequence's
last n tokens. It needs no model, only the request's tokens, so it runs on the scheduler's side on the host."""

from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view


class NgramProposer:
    def __init__(self, min_n: int, max_n: int):
        self.min_n, self.max_n = min_n, max_n

    def propose(self, token_ids: list[int], max_drafts: int) -> list[int]:
        """Up to `max_drafts` tokens: those after an earlier occurrence of the longest suffix n-gram (n from max_n
        down to min_n) that occurred before; [] when none did. Of its occurrences, the most recent one followed by
        `max_drafts` tokens (in the copy-heavy text this serves, edits of a given text or code, the latest context is
        the likeliest), else the earliest, which is followed by the most (a run of one repeated token or phrase
        still gets full drafts)."""
        tokens = np.asarray(token_ids)
        for n in range(min(self.max_n, len(tokens) - 1), self.min_n - 1, -1):
            # Windows that start before the suffix itself; each has at least one token after it.
            windows = sliding_window_view(tokens[:-1], n)
            matches = np.flatnonzero((windows == tokens[-n:]).all(axis=1))
            if len(matches):
                full = matches[matches + n + max_drafts <= len(tokens)]
                start = int(full[-1] if len(full) else matches[0]) + n
                return tokens[start:start + max_drafts].tolist()
        return []
