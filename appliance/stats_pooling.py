"""The dashboard's embedding figures for embed and score models (`task: embed | score`): the pooled inputs and the
tokens they held, counted from the engines' pooled outputs (`EngineCoreOutput.pooled`, one per input when it is
done), as totals, "now" rates and chart series. `appliance.stats` keeps them in each model's history beside the
generation figures, which a pooling model leaves at zero."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from appliance.stats_ring import History
    from engine.contract import EngineCoreOutput

POOLING_SUMS = ("pooled_inputs", "pooled_tokens")


class PoolingTotals:
    """One model's pooled inputs and tokens since the server started."""

    __slots__ = ("num_inputs", "num_tokens")

    def __init__(self):
        self.num_inputs = self.num_tokens = 0

    def on_step(self, history: History, outputs: list[EngineCoreOutput], now: float, duration_s: float) -> None:
        # An engine serves one task: a generation step's outputs are never pooled, so its check ends at the first.
        if not outputs or outputs[0].pooled is None:
            return
        num_inputs = sum(1 for o in outputs if o.pooled is not None)
        num_tokens = sum(o.num_prompt_tokens for o in outputs if o.pooled is not None)
        history.add("pooled_inputs", now, num_inputs, duration_s)
        history.add("pooled_tokens", now, num_tokens, duration_s)
        self.num_inputs += num_inputs
        self.num_tokens += num_tokens

    def snapshot(self, history: History, now: float, first_rate: int, range_s: int) -> dict[str, Any]:
        """Rates over the fine ring's seconds from `first_rate` to `now`; series of `range_s` seconds (none at 0)."""
        ring, span = history.fine, max(now - first_rate, 1e-9)
        result = {"inputs_per_s": ring.total("pooled_inputs", first_rate, now) / span,
                  "tokens_per_s": ring.total("pooled_tokens", first_rate, now) / span,
                  "total_inputs": self.num_inputs, "total_tokens": self.num_tokens, "series": None}
        if range_s:
            ring, first, last = history.window(range_s, now)
            slots = ring.present(first, last)
            result["series"] = {"inputs_per_s": ring.series("pooled_inputs", slots),
                                "tokens_per_s": ring.series("pooled_tokens", slots)}
        return result
