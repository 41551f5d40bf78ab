"""The dashboard's history: fixed-size rings of time buckets, at one resolution each (`Ring`), and the pair of them
every model and the host keep (`History`: one-second buckets for the recent minutes, ten-second ones for the hour).

Sums (tokens, steps, finished requests) add up within a bucket, and an amount that accrued over an interval (an
engine step's tokens over the step's duration) is spread over the buckets that interval covers in proportion, so a
slow engine's continuous work reads as a continuous rate, not as one bar per step with gaps between. Gauges (KV
usage, running requests, memory) are sampled once a second and a bucket reads their mean. A bucket in which nothing
was sampled reads null: the model was not there (not started yet, restarting, removed).
"""

from __future__ import annotations

import math
from collections import deque

FINE_S, FINE_BUCKETS = 1, 660  # one-second buckets: 11 minutes
COARSE_S, COARSE_BUCKETS = 10, 380  # ten-second buckets: over an hour
RANGES_S = (300, 600, 3600)  # the chart ranges the dashboard offers; the longest reads the coarse ring


class Ring:
    def __init__(self, sums: tuple[str, ...], gauges: tuple[str, ...], size: int, resolution_s: int):
        self.size, self.resolution_s = size, resolution_s
        self.bucket = [-1] * size  # which bucket (time // resolution) each slot holds
        self.sums = {name: [0.0] * size for name in sums}
        self.gauges = {name: [0.0] * size for name in gauges}
        self.samples = [0] * size  # gauge samples in the bucket: 0 = the model was not there

    def slot(self, bucket: int) -> int:
        i = bucket % self.size
        if self.bucket[i] != bucket:
            self.bucket[i] = bucket
            for values in (*self.sums.values(), *self.gauges.values()):
                values[i] = 0.0
            self.samples[i] = 0
        return i

    def add(self, name: str, t: float, amount: float, duration_s: float = 0.0) -> None:
        """Adds `amount` that accrued over the `duration_s` seconds up to `t`, spread in proportion."""
        res = self.resolution_s
        start = t - duration_s
        first, last = int(start // res), int(t // res)
        if first == last or duration_s <= 0:
            self.sums[name][self.slot(last)] += amount
            return
        first = max(first, last - self.size + 1)
        values, rate = self.sums[name], amount / duration_s
        for bucket in range(first, last + 1):
            overlap = min(t, (bucket + 1) * res) - max(start, bucket * res)
            if overlap > 0:
                values[self.slot(bucket)] += rate * overlap

    def sample(self, t: float, gauges: dict[str, float]) -> None:
        i = self.slot(int(t // self.resolution_s))
        n = self.samples[i]
        for name, value in gauges.items():
            values = self.gauges[name]
            values[i] = (values[i] * n + value) / (n + 1)  # the running mean
        self.samples[i] = n + 1

    def total(self, name: str, first_t: float, last_t: float) -> float:
        """The sum of `name` over the buckets holding times first_t..last_t."""
        res, values, buckets = self.resolution_s, self.sums[name], self.bucket
        return sum(values[b % self.size] for b in range(int(first_t // res), int(last_t // res) + 1)
                   if buckets[b % self.size] == b)

    def present(self, first: int, last: int, known_until: float = math.inf) -> list[int]:
        """The slot of each bucket first..last that was sampled (else -1); buckets past `known_until` (a step
        still running will add to them) read -1 too."""
        res, buckets, samples, size = self.resolution_s, self.bucket, self.samples, self.size
        slots = []
        for bucket in range(first, last + 1):
            i = bucket % size
            slots.append(i if buckets[i] == bucket and samples[i] and bucket * res < known_until else -1)
        return slots

    def series(self, name: str, slots: list[int], ndigits: int = 3) -> list[float | None]:
        """`name` in each slot of `present`: sums as a rate per second, gauges as their mean; None where -1."""
        if name in self.sums:
            values, scale = self.sums[name], 1 / self.resolution_s
        else:
            values, scale = self.gauges[name], 1.0
        return [round(values[i] * scale, ndigits) if i >= 0 else None for i in slots]


class History:
    """A fine and a coarse ring of the same series, written together."""

    def __init__(self, sums: tuple[str, ...], gauges: tuple[str, ...]):
        self.fine = Ring(sums, gauges, FINE_BUCKETS, FINE_S)
        self.coarse = Ring(sums, gauges, COARSE_BUCKETS, COARSE_S)

    def add(self, name: str, t: float, amount: float, duration_s: float = 0.0) -> None:
        self.fine.add(name, t, amount, duration_s)
        self.coarse.add(name, t, amount, duration_s)

    def sample(self, t: float, gauges: dict[str, float]) -> None:
        self.fine.sample(t, gauges)
        self.coarse.sample(t, gauges)

    def ring(self, range_s: int) -> Ring:
        return self.fine if range_s <= FINE_S * (FINE_BUCKETS - 60) else self.coarse

    def window(self, range_s: int, now: float) -> tuple[Ring, int, int]:
        """(the ring, first bucket, last bucket) charting `range_s` seconds up to `now`; the current bucket is
        partial and left out."""
        ring = self.ring(range_s)
        last = int(now // ring.resolution_s) - 1
        return ring, last - range_s // ring.resolution_s + 1, last


class Samples:
    """Recent samples (latencies, lengths) in arrival (so time) order, as two aligned deques capped at `maxlen`."""

    def __init__(self, maxlen: int):
        self.times: deque[float] = deque(maxlen=maxlen)
        self.values: deque[float] = deque(maxlen=maxlen)

    def add(self, time_: float, value: float) -> None:
        self.times.append(time_)
        self.values.append(value)

    def recent(self, since: float) -> list[float]:
        times, values = self.times, self.values
        while times and times[0] < since:  # the old ones are on the left
            times.popleft()
            values.popleft()
        return list(values)

    def percentiles(self, since: float) -> dict[str, float | int | None]:
        ordered = sorted(self.recent(since))
        if not ordered:
            return {"p50": None, "p90": None, "p99": None, "count": 0}
        last = len(ordered) - 1
        # Nearest rank: a percentile is always one of the samples.
        return {"p50": ordered[round(0.50 * last)], "p90": ordered[round(0.90 * last)],
                "p99": ordered[round(0.99 * last)], "count": len(ordered)}


class LengthCounts:
    """Recent lengths counted per power-of-two bin (0, [1, 2), [2, 4), ... up to `num_bins - 1` and beyond), kept
    up to date as they come and expire, so that reading the histogram costs nothing per sample."""

    def __init__(self, maxlen: int, num_bins: int):
        self.times: deque[float] = deque()
        self.bins: deque[int] = deque()
        self.counts = [0] * num_bins
        self.maxlen = maxlen

    def add(self, time_: float, length: int) -> None:
        b = min(int(length).bit_length(), len(self.counts) - 1)  # 0 -> 0, 1 -> 1, 2..3 -> 2, 4..7 -> 3, ...
        self.times.append(time_)
        self.bins.append(b)
        self.counts[b] += 1
        if len(self.times) > self.maxlen:
            self._drop()

    def histogram(self, since: float) -> list[int]:
        while self.times and self.times[0] < since:
            self._drop()
        return list(self.counts)

    def _drop(self) -> None:
        self.times.popleft()
        self.counts[self.bins.popleft()] -= 1
