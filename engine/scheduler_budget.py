"""One step's token budget, decode-first: `max_num_batched_tokens` in all and, while the step decodes, at most
`max_prefill_tokens_while_decoding` of prefill (prompt chunks, recomputes after preemption).

A step costs about its token count once it is compute bound, and every running stream waits for the whole step, so
a full budget of prompt chunks beside the decodes stretches their inter-token latency to a long prefill's time.
Decodes are scheduled first; the prefill cap then keeps such a step short. A step with no decodes has nothing to
delay and takes the whole budget, so a burst of arrivals still prefills at full width.

The cap grows with the decodes: `prefill_tokens_per_decode` per decoding stream when that is more. A decode step's
own cost grows with its streams (their attention, their sampling), so a flat cap makes prefill beside hundreds of
streams crawl: on an H200 (8B), 200 prompts of 1,024 tokens at once under a flat 512 kept 0.59 of the uncapped
throughput (11.9 s against 7.0 s: some 400 steps of 512, each paying ~12 ms of decodes besides). In proportion,
each step's prompt share of its time stays about the same however many streams run, and so does the streams'
slowdown.

On CUDA such capped steps replay mixed-step graphs whose token counts are multiples of `fill_multiple`
(engine.cuda_graphs): the cap is raised to fill the step up to the next multiple, so that what the graph computes
anyway is prompt, not padding.
"""

from __future__ import annotations

from engine.request import Request


def is_prefill(request: Request) -> bool:
    """More than its last token to compute: a prompt (or a preempted request's recompute) not yet caught up."""
    return request.num_scheduled_tokens - request.num_computed_tokens > 1


class StepBudget:
    __slots__ = ("left", "prefill_cap", "prefill_per_decode", "fill_multiple", "decode_tokens", "prefill_tokens")

    def __init__(self, max_num_batched_tokens: int, prefill_cap: int | None, prefill_per_decode: int = 0,
                 fill_multiple: int = 0):
        self.left = max_num_batched_tokens
        self.prefill_cap = prefill_cap  # None: prefill may take the whole budget beside decodes
        self.prefill_per_decode = prefill_per_decode
        self.fill_multiple = fill_multiple  # 0: none
        self.decode_tokens = 0
        self.prefill_tokens = 0

    def prefill_room(self) -> int:
        """Tokens the next prefill may take (a decode may take all that is `left`)."""
        if self.decode_tokens and self.prefill_cap is not None:
            cap = max(self.prefill_cap, self.prefill_per_decode * self.decode_tokens)
            if self.fill_multiple:
                step = -(-(self.decode_tokens + cap) // self.fill_multiple) * self.fill_multiple
                cap = step - self.decode_tokens
            return min(self.left, cap - self.prefill_tokens)
        return self.left

    def take(self, num_tokens: int, prefill: bool) -> None:
        """Spends `num_tokens`; a negative count gives a preempted request's share back."""
        self.left -= num_tokens
        if prefill:
            self.prefill_tokens += num_tokens
        else:
            self.decode_tokens += num_tokens
