"""Live statistics for the dashboard and `GET /admin/stats`: what each model is doing now and over the last minutes.

Two feeds, both pushed, never scraped from logs:
- the engines: every `StepOutputs` an engine client receives goes to `StatsHub.on_step` (the `on_step` hook), which
  adds the step's prompt and generated tokens, its batch size and time to a per-second ring of the model, and,
  when the message carries `SchedulerStats` (a few times a second), the gauges (KV usage, running, waiting) and the
  prefix-cache counters' increments;
- the request path: `StatsHub.request(model)` gives a `RequestTimer` that sees each output snapshot of one engine
  request and records its time to first token and inter-token latencies.

`snapshot()` turns that plus each live replica's latest `SchedulerStats` into plain data (the stats endpoint's JSON).
Its cost does not grow with traffic: the rings are fixed-size (`WINDOW_S` seconds), latency samples are capped
(`MAX_LATENCY_SAMPLES` per model and kind), and the block map is at most `MAX_MAP_CELLS` cells, computed once per
engine report. Per step, `on_step` walks the step's outputs once (a few operations per running request).

This module owns the numbers only; the supervisor owns the models and their lifecycle, `ui/` the presentation.
"""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from appliance.metrics import count_step_tokens

if TYPE_CHECKING:
    from appliance.config import ModelSpec
    from appliance.ipc import StepOutputs
    from appliance.supervisor import ModelRuntime, Supervisor
    from engine.output_processor import RequestOutput
    from engine.contract import SchedulerStats

WINDOW_S = 180  # history kept and charted, in one-second buckets
RATE_WINDOW_S = 5  # "now" rates (tokens/s, batch size, hit rate) average over this many seconds
LATENCY_WINDOW_S = 60.0  # TTFT / ITL percentiles cover the samples of this many seconds
HIT_RATE_WINDOW_S = 60  # the prefix cache's recent hit rate covers this many seconds
MAX_LATENCY_SAMPLES = 2048  # per model and kind: the most recent ones
MAX_MAP_CELLS = 2048  # the block map's resolution; larger pools fold several blocks into a cell
REPORT_FRESH_S = 2.0  # a replica silent this long (dead, or gone with a reload) leaves the charted gauges

FREE, USED, CACHED = "0", "1", "2"  # block map cells, as `BlockPool.block_states()` numbers them
_STATE_CHARS = bytes.maketrans(b"\x00\x01\x02", b"012")
_encoder = msgspec.json.Encoder()


class _Ring:
    """One bucket per whole second of the monotonic clock, the last `size` seconds. Sums (tokens, steps, ...) add
    up within a second; gauges (KV usage, running, waiting) keep the second's last sample."""

    SUMS = ("prompt_tokens", "generation_tokens", "steps", "batch_seqs", "step_seconds", "prefix_queries",
            "prefix_hits", "draft_tokens", "accepted_tokens")
    GAUGES = ("kv_usage", "running", "waiting")

    def __init__(self, size: int):
        self.size = size
        self.second = [-1] * size
        self.sums = {name: [0] * size for name in self.SUMS}
        self.gauges = {name: [None] * size for name in self.GAUGES}

    def slot(self, second: int) -> int:
        i = second % self.size
        if self.second[i] != second:
            self.second[i] = second
            for values in self.sums.values():
                values[i] = 0
            for values in self.gauges.values():
                values[i] = None
        return i

    def total(self, name: str, first: int, last: int) -> float:
        """The sum of `name` over seconds first..last, both included."""
        values, seconds = self.sums[name], self.second
        return sum(values[s % self.size] for s in range(first, last + 1) if seconds[s % self.size] == s)

    def reported(self, first: int, last: int) -> list[int]:
        """For each second first..last, its bucket if a replica reported stats in it, else -1 (the model was not
        there: not started yet, or restarting)."""
        seconds, kv_usage, size = self.second, self.gauges["kv_usage"], self.size
        slots = []
        for second in range(first, last + 1):
            i = second % size
            slots.append(i if seconds[i] == second and kv_usage[i] is not None else -1)
        return slots

    def series(self, name: str, slots: list[int]) -> list:
        """`name` in each of `slots` (from `reported`); None where -1."""
        values = self.sums.get(name) or self.gauges[name]
        return [values[i] if i >= 0 else None for i in slots]


class _Samples:
    """Recent latency samples in arrival (so time) order, as two aligned deques capped at `maxlen`."""

    def __init__(self, maxlen: int):
        self.times: deque[float] = deque(maxlen=maxlen)
        self.values: deque[float] = deque(maxlen=maxlen)

    def add(self, time_: float, value: float) -> None:
        self.times.append(time_)
        self.values.append(value)

    def percentiles(self, since: float) -> dict[str, float | int | None]:
        times, values = self.times, self.values
        while times and times[0] < since:  # samples arrive in time order: the old ones are on the left
            times.popleft()
            values.popleft()
        if not values:
            return {"p50": None, "p90": None, "p99": None, "count": 0}
        ordered = sorted(values)
        last = len(ordered) - 1
        # Nearest rank: a percentile is always one of the samples.
        return {"p50": ordered[round(0.50 * last)], "p90": ordered[round(0.90 * last)],
                "p99": ordered[round(0.99 * last)], "count": len(ordered)}


class _Replica:
    """What the hub remembers of one replica between its reports."""

    def __init__(self):
        self.stats: SchedulerStats | None = None
        self.reported_at = 0.0  # the clock at its last stats
        self.seen: set[str] = set()  # requests whose prompt was counted (at their first token)
        self.prefix = (0, 0)  # the last cumulative (queries, hits)
        self.spec = (0, 0)  # the last cumulative (draft tokens, accepted tokens), with speculative decoding
        self.map: tuple[object, dict] | None = None  # (the stats it was computed from, the block map)


class ModelStats:
    """One model's rings, totals and latency samples (summed over its replicas)."""

    def __init__(self, window_s: int):
        self.ring = _Ring(max(window_s, HIT_RATE_WINDOW_S) + RATE_WINDOW_S + 1)
        self.replicas: dict[int, _Replica] = {}
        self.num_prompt_tokens = 0
        self.num_generation_tokens = 0
        self.num_finished = 0
        self.num_steps = 0
        self.ttft = _Samples(MAX_LATENCY_SAMPLES)
        self.itl = _Samples(MAX_LATENCY_SAMPLES)

    def replica(self, index: int) -> _Replica:
        found = self.replicas.get(index)
        if found is None:
            found = self.replicas[index] = _Replica()
        return found


class RequestTimer:
    """Observes one engine request's output snapshots (as `RequestMetrics` does) for TTFT and ITL samples."""

    __slots__ = ("_arrival", "_clock", "_last", "_model")

    def __init__(self, model: ModelStats, clock: Callable[[], float]):
        self._model, self._clock = model, clock
        self._arrival = clock()
        self._last: float | None = None

    def observe(self, output: RequestOutput) -> None:
        if not any(c.delta_token_ids for c in output.outputs):
            return
        now = self._clock()
        if self._last is None:
            self._model.ttft.add(now, now - self._arrival)
        else:
            self._model.itl.add(now, now - self._last)
        self._last = now


class StatsHub:
    def __init__(self, supervisor: Supervisor, window_s: int = WINDOW_S, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time):
        self.supervisor = supervisor
        self.window_s = window_s
        self.clock = clock
        self.wall_clock = wall_clock
        self.models: dict[str, ModelStats] = {}

    def model(self, name: str) -> ModelStats:
        found = self.models.get(name)
        if found is None:
            found = self.models[name] = ModelStats(self.window_s)
        return found

    # ---- the feeds ----
    def request(self, model_name: str) -> RequestTimer:
        return RequestTimer(self.model(model_name), self.clock)

    def on_step(self, model_name: str, replica_index: int, message: StepOutputs) -> None:
        """Called by the engine client with every message of outputs (and sometimes stats) from one replica."""
        model = self.model(model_name)
        replica = model.replica(replica_index)
        ring = model.ring
        now = self.clock()
        i = ring.slot(int(now))
        num_prompt, num_generated, num_finished = count_step_tokens(message.outputs, replica.seen)
        model.num_finished += num_finished
        sums = ring.sums
        if num_generated or num_prompt:
            sums["generation_tokens"][i] += num_generated
            sums["prompt_tokens"][i] += num_prompt
            model.num_generation_tokens += num_generated
            model.num_prompt_tokens += num_prompt
        stats = message.stats
        if message.step_seconds > 0:  # an engine step ran (aborts and idle reports have none)
            # The true batch size rides along with the stats; between them, the sequences that got a token.
            sums["batch_seqs"][i] += stats.step_num_seqs if stats is not None else len(message.outputs)
            sums["steps"][i] += 1
            sums["step_seconds"][i] += message.step_seconds
            model.num_steps += 1
        if stats is not None:
            replica.prefix = _add_growth(sums, i, ("prefix_queries", "prefix_hits"),
                                         (stats.prefix_cache_queries, stats.prefix_cache_hits), replica.prefix)
            if (spec := stats.spec_decoding) is not None:
                replica.spec = _add_growth(sums, i, ("draft_tokens", "accepted_tokens"),
                                           (spec.num_draft_tokens, spec.num_accepted_tokens), replica.spec)
            replica.stats, replica.reported_at = stats, now
            reported = [r.stats for r in model.replicas.values()
                        if r.stats is not None and now - r.reported_at < REPORT_FRESH_S]
            num_blocks = sum(s.num_kv_blocks for s in reported)
            gauges = ring.gauges
            gauges["kv_usage"][i] = sum(s.num_kv_blocks - s.num_free_blocks for s in reported) / max(num_blocks, 1)
            gauges["running"][i] = sum(s.num_running for s in reported)
            gauges["waiting"][i] = sum(s.num_waiting for s in reported)

    # ---- the snapshot ----
    def snapshot(self) -> dict[str, Any]:
        now, wall = self.clock(), self.wall_clock()
        supervisor = self.supervisor
        return {
            "time": wall,
            "draining": supervisor.draining,
            "window_s": self.window_s,
            "rate_window_s": RATE_WINDOW_S,
            "latency_window_s": LATENCY_WINDOW_S,
            "hit_rate_window_s": HIT_RATE_WINDOW_S,
            "models": [self._model_snapshot(m, now, wall) for m in list(supervisor.models.values())],
        }

    def snapshot_json(self) -> bytes:
        return _encoder.encode(self.snapshot())

    def _model_snapshot(self, runtime: ModelRuntime, now: float, wall: float) -> dict[str, Any]:
        spec, model = runtime.spec, self.model(runtime.name)
        live = [r for r in runtime.replicas if r.live]
        reported = [r for r in live if r.stats is not None]
        info = live[0].info if live else runtime.info
        stats = [r.stats for r in reported]
        parallelism = spec.parallelism
        return {
            "name": runtime.name,
            "status": runtime.status.value,
            "device": info.device if info else spec.device,
            "dtype": info.dtype if info else spec.dtype,
            "kernel_backend": info.kernel_backend if info else spec.kernel_backend,
            # Until the engine reports what it loaded, only the requested online method is known.
            "quantization": info.quantization if info else (spec.quantization or "none"),
            "parallelism": {"tensor": parallelism.tensor, "pipeline": parallelism.pipeline,
                            "data": parallelism.data, "expert": parallelism.expert},
            "max_model_len": info.max_model_len if info else None,
            "block_size": info.block_size if info else spec.kv_cache.block_size,
            "started_at": runtime.started_at,
            "uptime_s": max(wall - runtime.started_at, 0.0),
            "restarts": runtime.restarts,
            "num_inflight": runtime.num_inflight,
            "replicas": [{"replica": r.replica, "pid": r.pid, "alive": r.live} for r in runtime.replicas],
            "requests": {
                "running": sum(s.num_running for s in stats),
                "waiting": sum(s.num_waiting for s in stats),
                "preempted": sum(s.num_preempted_waiting for s in stats),
                "preemptions": sum(s.num_preemptions for s in stats),
            },
            "kv": self._kv_snapshot(model, reported),
            **self._rates_snapshot(model, stats, now),
            "totals": {
                "prompt_tokens": model.num_prompt_tokens,
                "generation_tokens": model.num_generation_tokens,
                "finished_requests": model.num_finished,
                "steps": model.num_steps,
            },
            "latency": {
                "ttft": model.ttft.percentiles(now - LATENCY_WINDOW_S),
                "itl": model.itl.percentiles(now - LATENCY_WINDOW_S),
            },
            "series": self._series_snapshot(model, now),
            "lora": {"enabled": spec.lora.enabled, "max_loras": spec.lora.max_loras,
                     "adapters": _adapters(runtime, spec)},
            "errors": [{"time": t, "message": message} for t, message in runtime.errors],
        }

    def _kv_snapshot(self, model: ModelStats, reported: list) -> dict[str, Any]:
        stats = [r.stats for r in reported]
        num_blocks = sum(s.num_kv_blocks for s in stats)
        num_free = sum(s.num_free_blocks for s in stats)
        return {
            "usage": (num_blocks - num_free) / num_blocks if num_blocks else 0.0,
            "num_blocks": num_blocks,
            "num_used_blocks": num_blocks - num_free,
            "num_free_blocks": num_free,  # as the engine counts them: the cached ones too
            "num_cached_free_blocks": sum(s.num_cached_free_blocks for s in stats),
            "maps": [self._block_map(model.replica(r.replica), r.replica, r.stats) for r in reported],
        }

    @staticmethod
    def _rates_snapshot(model: ModelStats, stats: list[SchedulerStats], now: float) -> dict[str, Any]:
        """Throughput, batch size and prefix-cache hits over their windows."""
        ring, current = model.ring, int(now)
        first_rate = current - RATE_WINDOW_S + 1
        # The current second is partial: rates divide by the time the window really spans.
        rate_span = max(now - first_rate, 1e-9)
        steps = ring.total("steps", first_rate, current)
        first_hit_rate = current - HIT_RATE_WINDOW_S + 1
        window_queries = ring.total("prefix_queries", first_hit_rate, current)
        window_hits = ring.total("prefix_hits", first_hit_rate, current)
        queries = sum(s.prefix_cache_queries for s in stats)
        hits = sum(s.prefix_cache_hits for s in stats)
        return {
            "throughput": {
                "prompt_tokens_per_s": ring.total("prompt_tokens", first_rate, current) / rate_span,
                "generation_tokens_per_s": ring.total("generation_tokens", first_rate, current) / rate_span,
                "steps_per_s": steps / rate_span,
            },
            "batch": {
                "mean": ring.total("batch_seqs", first_rate, current) / steps if steps else 0.0,
                "last": sum(s.step_num_seqs for s in stats),
            },
            "prefix_cache": {
                "hit_rate": window_hits / window_queries if window_queries else None,  # HIT_RATE_WINDOW_S
                "lifetime_hit_rate": hits / queries if queries else None,
                "queries": queries,  # in blocks, since the replicas started
                "hits": hits,
            },
            "spec_decode": _spec_snapshot(ring, stats, first_hit_rate, current),
        }

    def _series_snapshot(self, model: ModelStats, now: float) -> dict[str, Any]:
        ring, current = model.ring, int(now)
        first, last = current - self.window_s, current - 1  # charts show whole seconds only
        slots = ring.reported(first, last)  # seconds in which no replica reported read null
        batch_seqs, num_steps = ring.series("batch_seqs", slots), ring.series("steps", slots)
        return {
            "prompt_tokens_per_s": ring.series("prompt_tokens", slots),
            "generation_tokens_per_s": ring.series("generation_tokens", slots),
            "kv_usage": ring.series("kv_usage", slots),
            "running": ring.series("running", slots),
            "waiting": ring.series("waiting", slots),
            "batch_size": [None if n is None else b / n if n else 0
                           for b, n in zip(batch_seqs, num_steps, strict=True)],
        }

    def _block_map(self, replica: _Replica, index: int, stats: SchedulerStats) -> dict[str, Any]:
        """The replica's block pool as at most MAX_MAP_CELLS cells ('0' free, '1' in use, '2' cached), computed once
        per report. With the engine's per-block states (`SchedulerStats.block_states`, one byte a block, when the
        engine sends them) the cells are in block-id order; without, the counts are drawn in state order."""
        if replica.map is not None and replica.map[0] is stats:
            return replica.map[1]
        result = block_map(stats)
        result["replica"] = index
        replica.map = (stats, result)
        return result


def _add_growth(sums: dict, i: int, names: tuple[str, ...], values: tuple[int, ...],
                last: tuple[int, ...]) -> tuple[int, ...]:
    """Adds to second `i` how much cumulative counters grew since their last report; returns the new last values.
    A restarted engine counts from zero again: its first report adds, never subtracts."""
    if any(value < before for value, before in zip(values, last)):
        last = (0,) * len(values)
    for name, value, before in zip(names, values, last):
        sums[name][i] += value - before
    return values


def _spec_snapshot(ring, stats: list[SchedulerStats], first: int, current: int) -> dict[str, Any] | None:
    """Speculative decoding's draft acceptance over the hit-rate window and since start (None: not speculating)."""
    specs = [s.spec_decoding for s in stats if s.spec_decoding is not None]
    if not specs:
        return None
    drafted, accepted = ring.total("draft_tokens", first, current), ring.total("accepted_tokens", first, current)
    lifetime_drafted = sum(s.num_draft_tokens for s in specs)
    return {
        "acceptance_rate": accepted / drafted if drafted else None,
        "lifetime_acceptance_rate": sum(s.num_accepted_tokens for s in specs) / lifetime_drafted
        if lifetime_drafted else None,
        "drafts": sum(s.num_drafts for s in specs),
        "draft_tokens": lifetime_drafted,
        "accepted_tokens": sum(s.num_accepted_tokens for s in specs),
    }


def _adapters(runtime: ModelRuntime, spec: ModelSpec) -> list[dict[str, Any]]:
    """The adapters the engines serve (first live replica's view: residency, usage), else the configured ones."""
    for replica in runtime.replicas:
        if replica.info is not None and replica.loras:
            return [{"name": a.name, "path": a.path, "rank": a.rank, "slot": a.slot, "requests": a.num_requests,
                     "tokens": a.num_tokens} for a in replica.loras]
    return [{"name": a.name, "path": a.path} for a in spec.lora.adapters]


def block_map(stats: SchedulerStats) -> dict[str, Any]:
    num_blocks = stats.num_kv_blocks
    states = stats.block_states
    num_cells = min(num_blocks, MAX_MAP_CELLS)
    per_cell = max(1, math.ceil(num_blocks / max(num_cells, 1)))
    if states is not None and len(states) == num_blocks:
        states = bytes(states)
        if per_cell == 1:
            cells = states.translate(_STATE_CHARS).decode("ascii")
        else:  # each cell shows its blocks' most common state
            chunks = (states[i:i + per_cell] for i in range(0, num_blocks, per_cell))
            cells = "".join(_dominant(chunk) for chunk in chunks)
        return {"cells": cells, "blocks_per_cell": per_cell, "exact": True}
    num_cached = stats.num_cached_free_blocks
    num_used = num_blocks - stats.num_free_blocks
    num_free = num_blocks - num_used - num_cached
    used_cells, cached_cells = round(num_used / per_cell), round(num_cached / per_cell)
    if num_used and not used_cells:
        used_cells = 1  # a pool in use never shows as empty
    free_cells = max(0, math.ceil(num_blocks / per_cell) - used_cells - cached_cells)
    if num_free and not free_cells and used_cells + cached_cells > 1:
        free_cells = 1
    return {"cells": USED * used_cells + CACHED * cached_cells + FREE * free_cells, "blocks_per_cell": per_cell,
            "exact": False}


def _dominant(chunk: bytes) -> str:
    used, cached = chunk.count(1), chunk.count(2)
    free = len(chunk) - used - cached
    if used >= cached and used >= free:
        return USED
    return CACHED if cached >= free else FREE

