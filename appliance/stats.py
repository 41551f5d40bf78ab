"""Live statistics for the dashboard and `GET /admin/stats`: what each model, its requests and the host are doing now
and over the last hour.

Three feeds, all pushed, never scraped from logs:
- the engines: every `StepOutputs` an engine client receives goes to `StatsHub.on_step`, which adds the step's
  prompt and generated tokens (or pooled inputs, `appliance.stats_pooling`), its batch and time to the model's
  history, spread over the seconds the step took (a slow engine's continuous work charts as a continuous rate), the
  prefix-cache counters' increments, and each finished engine request's queue, prefill and decode times;
- the request path: `StatsHub.begin()` gives a `RequestObserver` per API request (its row in the request table,
  `appliance.request_log`, and its TTFT, inter-token, end-to-end and length samples), and the HTTP layer reports
  every response's status (`on_http`);
- a sampler once a second (`run` / `tick`): each model's gauges from its replicas' latest reports (KV usage,
  running, waiting: carried over the seconds a long step leaves without a report), engine processes' memory and
  CPU, device memory, and the host's CPU and memory.

`snapshot(range_s)` turns that into plain data (the stats endpoint's JSON). Its cost does not grow with traffic or
time: histories are fixed rings (`appliance.stats_ring`), samples are capped (`MAX_LATENCY_SAMPLES` per model and
kind), the request table is bounded (`appliance.request_log`) and the block map is computed once per engine report.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import msgspec

from appliance.block_map import MAX_MAP_CELLS, block_map
from appliance.host_stats import HostSampler
from appliance.metrics import count_step_tokens
from appliance.request_log import RequestLog, RequestRecord
from appliance.stats_pooling import POOLING_SUMS, PoolingTotals
from appliance.stats_ring import RANGES_S, History, LengthCounts, Samples
from appliance.stats_specdec import spec_decoding_snapshot

if TYPE_CHECKING:
    from appliance.config import ModelSpec
    from appliance.ipc import StepOutputs
    from appliance.supervisor import ModelRuntime, Supervisor
    from engine.contract import SchedulerStats
    from engine.output_processor import RequestOutput

__all__ = ["MAX_LATENCY_SAMPLES", "MAX_MAP_CELLS", "RANGES_S", "StatsHub", "block_map"]

DEFAULT_RANGE_S = RANGES_S[0]
RATE_WINDOW_S = 5  # "now" rates (tokens/s, batch size) average over this many seconds
LATENCY_WINDOW_S = 300.0  # latency percentiles and length distributions cover the samples of this many seconds
HIT_RATE_WINDOW_S = 60  # the prefix cache's recent hit rate covers this many seconds
MAX_LATENCY_SAMPLES = 2048  # per model and kind: the most recent ones
LATENCY_KINDS = ("ttft", "itl", "e2e", "queue", "prefill", "decode")
LENGTH_EDGES = tuple(2 ** i for i in range(17))  # length histogram bins: [1, 2), [2, 4), ... [65536, inf); 0 first
FINISH_REASONS = ("stop", "length", "abort", "error")
MODEL_SUMS = ("prompt_tokens", "generation_tokens", "steps", "batch_seqs", "step_seconds", "prefix_queries",
              "prefix_hits", "requests", "e2e_sum", "ttft_sum", "ttft_count",
              *(f"finish_{reason}" for reason in FINISH_REASONS), *POOLING_SUMS)
MODEL_GAUGES = ("kv_usage", "running", "waiting", "rss", "cpu", "device_memory")
HTTP_CLASSES = ("2xx", "4xx", "429", "5xx", "503")
HOST_SUMS = tuple(f"http_{c}" for c in HTTP_CLASSES)
HOST_GAUGES = ("cpu", "ram_used", "server_rss")
_encoder = msgspec.json.Encoder()


class _Replica:
    """What the hub remembers of one replica between its reports."""

    def __init__(self):
        self.seen: set[str] = set()  # requests whose prompt was counted (at their first token)
        self.prefix = (0, 0)  # the last cumulative (queries, hits)
        self.spec = (0, 0)  # the last cumulative (draft tokens, accepted tokens), with speculative decoding
        self.map: tuple[object, dict] | None = None  # (the stats it was computed from, the block map)


class ModelStats:
    """One model's history, totals and samples (summed over its replicas)."""

    def __init__(self):
        self.history = History(MODEL_SUMS, MODEL_GAUGES)
        self.replicas: dict[int, _Replica] = {}
        self.num_prompt_tokens = self.num_generation_tokens = self.num_finished = self.num_steps = 0
        self.pooling = PoolingTotals()  # embed and score models' figures
        self.samples = {kind: Samples(MAX_LATENCY_SAMPLES) for kind in LATENCY_KINDS}
        self.lengths = {kind: LengthCounts(MAX_LATENCY_SAMPLES, len(LENGTH_EDGES) + 1) for kind in ("prompt", "output")}
        self.last_step_end = 0.0  # the clock when its last step's outputs arrived
        self.processes: dict[int, dict] = {}  # replica -> its process's latest reading

    def replica(self, index: int) -> _Replica:
        found = self.replicas.get(index)
        if found is None:
            found = self.replicas[index] = _Replica()
        return found


class RequestObserver:
    """One API request's outputs (one engine request per prompt): its row in the request table and its samples."""

    __slots__ = ("_hub", "_model", "_last", "record")

    def __init__(self, hub: StatsHub, model: ModelStats, record: RequestRecord, num_prompts: int):
        self._hub, self._model, self.record = hub, model, record
        self._last: list[float | None] = [None] * num_prompts  # per prompt: when its last tokens came

    def observe(self, index: int, output: RequestOutput) -> None:
        num_new = sum(len(c.delta_token_ids) for c in output.outputs)
        if not num_new:
            return
        now, samples, last = self._hub.clock(), self._model.samples, self._last[index]
        if last is None:
            samples["ttft"].add(now, now - self.record.arrival)
            self.record.on_first_token(now, len(output.prompt_token_ids))
        else:
            samples["itl"].add(now, now - last)
        self._last[index] = now
        self.record.on_tokens(num_new)

    def close(self, reasons: list[str], aborted: bool) -> None:
        """The request ended: `reasons` holds each sample's finish reason."""
        record, hub, model = self.record, self._hub, self._model
        if record.finished_at is not None:
            return
        now = hub.clock()
        record.finish(now, reasons, aborted)
        samples, history = model.samples, model.history
        e2e = now - record.arrival
        samples["e2e"].add(now, e2e)
        model.lengths["prompt"].add(now, record.prompt_tokens)
        model.lengths["output"].add(now, record.output_tokens)
        history.add("requests", now, 1)
        history.add("e2e_sum", now, e2e)
        if record.first_token is not None:
            history.add("ttft_sum", now, record.first_token - record.arrival)
            history.add("ttft_count", now, 1)
        for reason in reasons:
            if reason in FINISH_REASONS:
                history.add(f"finish_{reason}", now, 1)


class StatsHub:
    def __init__(self, supervisor: Supervisor, clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time, host: HostSampler | None = None):
        self.supervisor = supervisor
        self.clock, self.wall_clock = clock, wall_clock
        self.models: dict[str, ModelStats] = {}
        self.requests = RequestLog(clock, wall_clock)
        self.host_history = History(HOST_SUMS, HOST_GAUGES)
        self.host = host if host is not None else HostSampler()
        self.http_totals = dict.fromkeys(HTTP_CLASSES, 0)

    def model(self, name: str) -> ModelStats:
        found = self.models.get(name)
        if found is None:
            found = self.models[name] = ModelStats()
        return found

    # ---- the feeds ----
    def begin(self, request_id: str, model_name: str, adapter: str | None, num_prompts: int,
              prompt: str | None = None) -> RequestObserver:
        keep_prompt = self.supervisor.config.ui.show_prompts
        record = self.requests.begin(request_id, model_name, adapter, prompt if keep_prompt else None)
        return RequestObserver(self, self.model(model_name), record, num_prompts)

    def on_http(self, request_id: str, path: str, status: int, fields: dict) -> None:
        """Every HTTP response that ended (but the dashboard's own polling and scrapes that succeeded)."""
        self.requests.on_http(request_id, path, status, fields)
        classes = [f"{status // 100}xx"] + ([str(status)] if status in (429, 503) else [])
        now = self.clock()
        for name in classes:
            if name in self.http_totals:
                self.http_totals[name] += 1
                self.host_history.add(f"http_{name}", now, 1)

    def on_step(self, model_name: str, replica_index: int, message: StepOutputs) -> None:
        """Called by the engine client with every message of outputs (and sometimes stats) from one replica."""
        model = self.model(model_name)
        replica = model.replica(replica_index)
        history, now = model.history, self.clock()
        num_prompt, num_generated, num_finished = count_step_tokens(message.outputs, replica.seen)
        model.num_finished += num_finished
        duration = message.step_seconds
        if num_generated or num_prompt:
            history.add("generation_tokens", now, num_generated, duration)
            history.add("prompt_tokens", now, num_prompt, duration)
            model.num_generation_tokens += num_generated
            model.num_prompt_tokens += num_prompt
        model.pooling.on_step(history, message.outputs, now, duration)
        stats = message.stats
        if duration > 0:  # an engine step ran (aborts and idle reports have none)
            # The true batch size rides along with the stats; between them, the sequences that got a token.
            history.add("batch_seqs", now, stats.step_num_seqs if stats is not None else len(message.outputs),
                        duration)
            history.add("steps", now, 1, duration)
            history.add("step_seconds", now, duration, duration)
            model.num_steps += 1
            model.last_step_end = now
        for output in message.outputs:
            if output.timing is not None:
                self._on_timing(model, output.parent_id, output.timing, now)
        if stats is not None:
            self._on_prefix_counters(history, replica, stats, now)

    def _on_timing(self, model: ModelStats, parent_id: str, timing, now: float) -> None:
        samples = model.samples
        samples["queue"].add(now, timing.queued_s)
        samples["prefill"].add(now, timing.prefill_s)
        samples["decode"].add(now, timing.decode_s)
        self.requests.on_timing(parent_id, timing)

    @staticmethod
    def _on_prefix_counters(history: History, replica: _Replica, stats: SchedulerStats, now: float) -> None:
        queries, hits = stats.prefix_cache_queries, stats.prefix_cache_hits
        last_queries, last_hits = replica.prefix
        if queries < last_queries or hits < last_hits:  # a restarted engine counts from zero again
            last_queries = last_hits = 0
        history.add("prefix_queries", now, queries - last_queries)
        history.add("prefix_hits", now, hits - last_hits)
        replica.prefix = (queries, hits)

    # ---- the sampler ----
    async def run(self, interval_s: float = 1.0) -> None:
        """Samples once a second until cancelled (the app's lifespan runs it)."""
        while True:
            self.tick()
            await asyncio.sleep(interval_s - (self.clock() % interval_s) + 0.01)  # just past each second's start

    def tick(self) -> None:
        now, host = self.clock(), self.host
        self.host_history.sample(now, host.host())
        pids = set()
        for runtime in list(self.supervisor.models.values()):
            model = self.model(runtime.name)
            reported = [r for r in runtime.replicas if r.live and r.stats is not None]
            processes = {r.replica: {"pid": r.pid, **host.process(r.pid)} for r in runtime.replicas
                         if r.live and r.pid}
            model.processes = processes
            pids.update(p["pid"] for p in processes.values())
            if not reported:
                continue  # the model is not there: its gauges read null for this second
            stats = [r.stats for r in reported]
            num_blocks = sum(s.num_kv_blocks for s in stats)
            model.history.sample(now, {
                "kv_usage": sum(s.num_kv_blocks - s.num_free_blocks for s in stats) / max(num_blocks, 1),
                "running": sum(s.num_running for s in stats), "waiting": sum(s.num_waiting for s in stats),
                "rss": sum(p["rss"] for p in processes.values()), "cpu": sum(p["cpu"] for p in processes.values()),
                "device_memory": sum(s.device_memory_bytes for s in stats)})
        host.forget_others(pids)

    # ---- the snapshot ----
    def snapshot(self, range_s: int = DEFAULT_RANGE_S, charted: str | None = None) -> dict[str, Any]:
        """Everything, with the charts' series of `range_s` seconds for every model, or only for the model named
        `charted` (the dashboard draws the selected model's: a fraction of the cost with many models)."""
        now, wall = self.clock(), self.wall_clock()
        supervisor = self.supervisor
        ring, first, last = self.host_history.window(range_s, now)
        slots = ring.present(first, last)
        host = self.host
        return {
            "time": wall,
            "draining": supervisor.draining,
            "window_s": range_s,
            "ranges_s": list(RANGES_S),
            "resolution_s": ring.resolution_s,
            "rate_window_s": RATE_WINDOW_S,
            "latency_window_s": LATENCY_WINDOW_S,
            "hit_rate_window_s": HIT_RATE_WINDOW_S,
            "host": {"num_cpus": host.num_cpus, "ram_total": host.ram_total,
                     "http_totals": dict(self.http_totals),
                     "http": {c: ring.total(f"http_{c}", now - range_s, now) for c in HTTP_CLASSES},
                     "series": {name: ring.series(name, slots) for name in (*HOST_GAUGES, *HOST_SUMS)}},
            "models": [self._model_snapshot(m, now, wall, range_s if charted in (None, m.name) else 0)
                       for m in list(supervisor.models.values())],
            "requests": self.requests.snapshot(),
        }

    def snapshot_json(self, range_s: int = DEFAULT_RANGE_S, charted: str | None = None) -> bytes:
        return _encoder.encode(self.snapshot(range_s, charted))

    def _model_snapshot(self, runtime: ModelRuntime, now: float, wall: float, range_s: int) -> dict[str, Any]:
        spec, model = runtime.spec, self.model(runtime.name)
        live = [r for r in runtime.replicas if r.live]
        reported = [r for r in live if r.stats is not None]
        info = live[0].info if live else runtime.info
        stats = [r.stats for r in reported]
        return {
            "name": runtime.name,
            "task": spec.task,
            "status": runtime.status.value,
            "device": info.device if info else spec.device,
            "dtype": info.dtype if info else spec.dtype,
            "kernel_backend": info.kernel_backend if info else spec.kernel_backend,
            # Until the engine reports what it loaded, only the requested online method is known.
            "quantization": info.quantization if info else (spec.quantization or "none"),
            "kv_cache_dtype": spec.kv_cache.dtype,
            "parallelism": {key: getattr(spec.parallelism, key) for key in ("tensor", "pipeline", "data", "expert")},
            "max_model_len": info.max_model_len if info else None,
            "block_size": info.block_size if info else spec.kv_cache.block_size,
            "started_at": runtime.started_at,
            "uptime_s": max(wall - runtime.started_at, 0.0),
            "restarts": runtime.restarts,
            "num_inflight": runtime.num_inflight,
            "replicas": [{"replica": r.replica, "pid": r.pid, "alive": r.live,
                          **_process(model.processes.get(r.replica)),
                          "device_memory": r.stats.device_memory_bytes if r.stats is not None else None}
                         for r in runtime.replicas],
            "requests": {
                "running": sum(s.num_running for s in stats),
                "waiting": sum(s.num_waiting for s in stats),
                "preempted": sum(s.num_preempted_waiting for s in stats),
                "preemptions": sum(s.num_preemptions for s in stats),
            },
            "kv": self._kv_snapshot(model, reported),
            **_rates_snapshot(model, stats, now),
            "pooling": None if spec.task == "generate" else model.pooling.snapshot(
                model.history, now, int(now) - RATE_WINDOW_S + 1, range_s),
            "totals": {
                "prompt_tokens": model.num_prompt_tokens,
                "generation_tokens": model.num_generation_tokens,
                "finished_requests": model.num_finished,
                "steps": model.num_steps,
            },
            **_samples_snapshot(model, now),
            "finish_reasons": _finish_reasons(model, now, range_s or DEFAULT_RANGE_S),
            "series": _series_snapshot(model, now, range_s, stats) if range_s else None,
            "lora": {"enabled": spec.lora.enabled, "max_loras": spec.lora.max_loras,
                     "adapters": _adapters(runtime, spec)},
            "spec_decoding": spec_decoding_snapshot(spec.speculative is not None, stats),
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
            "maps": [_block_map(model.replica(r.replica), r.replica, r.stats) for r in reported],
        }


def _process(reading: dict | None) -> dict[str, Any]:
    return {"rss": reading["rss"], "cpu": reading["cpu"]} if reading else {"rss": None, "cpu": None}


def _rates_snapshot(model: ModelStats, stats: list[SchedulerStats], now: float) -> dict[str, Any]:
    """Throughput, batch size and prefix-cache hits over their windows (the fine ring's whole seconds)."""
    ring = model.history.fine
    first_rate = int(now) - RATE_WINDOW_S + 1
    # The current second is partial: rates divide by the time the window really spans.
    rate_span = max(now - first_rate, 1e-9)
    steps = ring.total("steps", first_rate, now)
    first_hit_rate = int(now) - HIT_RATE_WINDOW_S + 1
    window_queries = ring.total("prefix_queries", first_hit_rate, now)
    window_hits = ring.total("prefix_hits", first_hit_rate, now)
    queries = sum(s.prefix_cache_queries for s in stats)
    hits = sum(s.prefix_cache_hits for s in stats)
    return {
        "throughput": {
            "prompt_tokens_per_s": ring.total("prompt_tokens", first_rate, now) / rate_span,
            "generation_tokens_per_s": ring.total("generation_tokens", first_rate, now) / rate_span,
            "steps_per_s": steps / rate_span,
        },
        "batch": {
            "mean": ring.total("batch_seqs", first_rate, now) / steps if steps else 0.0,
            "last": sum(s.step_num_seqs for s in stats),
        },
        "prefix_cache": {
            "hit_rate": window_hits / window_queries if window_queries else None,  # HIT_RATE_WINDOW_S
            "lifetime_hit_rate": hits / queries if queries else None,
            "queries": queries,  # in blocks, since the replicas started
            "hits": hits,
        },
    }


def _samples_snapshot(model: ModelStats, now: float) -> dict[str, Any]:
    since, samples, lengths = now - LATENCY_WINDOW_S, model.samples, model.lengths
    return {"latency": {kind: samples[kind].percentiles(since) for kind in LATENCY_KINDS},
            "lengths": {"edges": [0, *LENGTH_EDGES], "prompt": lengths["prompt"].histogram(since),
                        "output": lengths["output"].histogram(since)}}


def _finish_reasons(model: ModelStats, now: float, range_s: int) -> dict[str, int]:
    ring = model.history.ring(range_s)
    return {r: round(ring.total(f"finish_{r}", now - range_s, now)) for r in FINISH_REASONS}


def _series_snapshot(model: ModelStats, now: float, range_s: int, stats: list[SchedulerStats]) -> dict[str, Any]:
    ring, first, last = model.history.window(range_s, now)
    slots = ring.present(first, last)
    # While requests run, the seconds after the last step's end are not over: a step still running adds to them.
    busy = any(s.num_running for s in stats)
    work = ring.present(first, last, known_until=model.last_step_end) if busy else slots
    batch_seqs, num_steps = ring.series("batch_seqs", work), ring.series("steps", work)
    requests, e2e = ring.series("requests", slots), ring.series("e2e_sum", slots)
    ttft, ttft_count = ring.series("ttft_sum", slots), ring.series("ttft_count", slots)
    return {
        "prompt_tokens_per_s": ring.series("prompt_tokens", work),
        "generation_tokens_per_s": ring.series("generation_tokens", work),
        "kv_usage": ring.series("kv_usage", slots),
        "running": ring.series("running", slots),
        "waiting": ring.series("waiting", slots),
        "batch_size": [None if b is None else round(b / n, 3) if n else 0
                       for b, n in zip(batch_seqs, num_steps, strict=True)],
        "requests_per_s": requests,
        "e2e_mean": [_ratio(s, n) for s, n in zip(e2e, requests, strict=True)],
        "ttft_mean": [_ratio(s, n) for s, n in zip(ttft, ttft_count, strict=True)],
        "rss": ring.series("rss", slots, 0),
        "cpu": ring.series("cpu", slots),
        "device_memory": ring.series("device_memory", slots, 0),
    }


def _ratio(total: float | None, count: float | None) -> float | None:
    """A mean per bucket; None where the model was not there or nothing was counted (a gap, not a zero)."""
    if total is None:
        return None
    return round(total / count, 4) if count else None


def _block_map(replica: _Replica, index: int, stats: SchedulerStats) -> dict[str, Any]:
    """The replica's block map, computed once per report."""
    if replica.map is not None and replica.map[0] is stats:
        return replica.map[1]
    result = block_map(stats)
    result["replica"] = index
    replica.map = (stats, result)
    return result


def _adapters(runtime: ModelRuntime, spec: ModelSpec) -> list[dict[str, Any]]:
    """The adapters the engines serve (first live replica's view: residency, usage), else the configured ones."""
    for replica in runtime.replicas:
        if replica.info is not None and replica.loras:
            return [{"name": a.name, "path": a.path, "rank": a.rank, "slot": a.slot, "requests": a.num_requests,
                     "tokens": a.num_tokens} for a in replica.loras]
    return [{"name": a.name, "path": a.path} for a in spec.lora.adapters]
