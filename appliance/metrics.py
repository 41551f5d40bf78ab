"""Prometheus metrics under vLLM's names and `model_name` label, so that vLLM's Grafana dashboards work unchanged.

Three sources: counters and histograms observed in the request path (`RequestMetrics`, one per engine request; with
an adapter also `kvbox:lora_prompt_tokens` and `kvbox:lora_generation_tokens`), gauges/counters read from each
replica's latest `SchedulerStats` when Prometheus scrapes (`_EngineStatsCollector`), and per LoRA adapter
(`kvbox:lora_*`, labelled `model_name` and `lora_name`, and vLLM's `vllm:lora_requests_info`), the adapter lists and
stats the replicas report (`_LoraCollector`).
Each app has its own `CollectorRegistry`: no global state, so several apps can live in one process.
"""

from __future__ import annotations

import time

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from appliance.supervisor import Supervisor
from engine.output_processor import RequestOutput
from engine.request import FinishReason

# vLLM's buckets, for comparable dashboards.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
                480.0, 960.0, 1920.0, 7680.0)


class Metrics:
    def __init__(self, supervisor: Supervisor):
        self.registry = CollectorRegistry()
        r, model = self.registry, ["model_name"]
        # prometheus_client appends `_total` to counter names: these are vLLM's `vllm:prompt_tokens_total` etc.
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of requests.", model, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", model, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished completions, by finish reason.",
                                       model + ["finished_reason"], registry=r)
        self.time_to_first_token = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", model,
                                             buckets=_TTFT_BUCKETS, registry=r)
        self.inter_token_latency = Histogram("vllm:inter_token_latency_seconds", "Time between output updates.",
                                             model, buckets=_ITL_BUCKETS, registry=r)
        self.e2e_request_latency = Histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to end.",
                                             model, buckets=_E2E_BUCKETS, registry=r)
        adapter = ["model_name", "lora_name"]
        self.lora_prompt_tokens = Counter("kvbox:lora_prompt_tokens", "Prompt tokens of requests with the LoRA "
                                          "adapter.", adapter, registry=r)
        self.lora_generation_tokens = Counter("kvbox:lora_generation_tokens", "Tokens generated with the LoRA "
                                              "adapter.", adapter, registry=r)
        r.register(_EngineStatsCollector(supervisor))
        r.register(_LoraCollector(supervisor))
        self._series: dict[tuple[str, str | None], _Series] = {}

    def request(self, model_name: str, lora_name: str | None = None) -> RequestMetrics:
        key = (model_name, lora_name)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = _Series(self, model_name, lora_name)
        return RequestMetrics(series)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Series:
    """One model's (and adapter's) labelled children, looked up once: `.labels()` costs more than observing."""

    def __init__(self, metrics: Metrics, model_name: str, lora_name: str | None):
        m = metrics
        self.time_to_first_token = m.time_to_first_token.labels(model_name)
        self.prompt_tokens = m.prompt_tokens.labels(model_name)
        self.inter_token_latency = m.inter_token_latency.labels(model_name)
        self.generation_tokens = m.generation_tokens.labels(model_name)
        self.e2e_request_latency = m.e2e_request_latency.labels(model_name)
        self.request_success = {reason.value: m.request_success.labels(model_name, reason.value)
                                for reason in FinishReason}
        self.lora_prompt_tokens = m.lora_prompt_tokens.labels(model_name, lora_name) if lora_name else None
        self.lora_generation_tokens = m.lora_generation_tokens.labels(model_name, lora_name) if lora_name else None


class RequestMetrics:
    """Observes one engine request's output snapshots as they arrive."""

    def __init__(self, series: _Series):
        self._series = series
        self._arrival = time.monotonic()
        self._last_token_time: float | None = None

    def observe(self, output: RequestOutput) -> None:
        series, now = self._series, time.monotonic()
        num_new_tokens = sum(len(c.delta_token_ids) for c in output.outputs)
        if num_new_tokens:
            if self._last_token_time is None:
                series.time_to_first_token.observe(now - self._arrival)
                series.prompt_tokens.inc(len(output.prompt_token_ids))
                if series.lora_prompt_tokens is not None:
                    series.lora_prompt_tokens.inc(len(output.prompt_token_ids))
            else:
                series.inter_token_latency.observe(now - self._last_token_time)
            self._last_token_time = now
            series.generation_tokens.inc(num_new_tokens)
            if series.lora_generation_tokens is not None:
                series.lora_generation_tokens.inc(num_new_tokens)
        if output.finished:
            series.e2e_request_latency.observe(now - self._arrival)
            for completion in output.outputs:
                series.request_success[completion.finish_reason].inc()


class _EngineStatsCollector:
    """Reads the replicas' latest scheduler stats at scrape time; sums over a model's replicas."""

    def __init__(self, supervisor: Supervisor):
        self._supervisor = supervisor

    def collect(self):
        labels = ["model_name"]
        running = GaugeMetricFamily("vllm:num_requests_running", "Requests in the running batch.", labels=labels)
        waiting = GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to run.", labels=labels)
        kv_usage = GaugeMetricFamily("vllm:kv_cache_usage_perc", "KV cache usage (1 = full).", labels=labels)
        # The name before vLLM 0.10; older dashboards still plot it.
        gpu_usage = GaugeMetricFamily("vllm:gpu_cache_usage_perc", "KV cache usage (1 = full).", labels=labels)
        preemptions = CounterMetricFamily("vllm:num_preemptions", "Preemptions.", labels=labels)
        queries = CounterMetricFamily("vllm:prefix_cache_queries", "Prefix cache queries, in tokens.", labels=labels)
        hits = CounterMetricFamily("vllm:prefix_cache_hits", "Prefix cache hits, in tokens.", labels=labels)
        step_seconds = CounterMetricFamily("kvbox:engine_step_seconds", "Seconds the engines spent in steps.",
                                           labels=labels)
        device_wait = CounterMetricFamily(
            "kvbox:engine_device_wait_seconds", "Of the step seconds, those the engines waited for the device: "
            "close to the step seconds, the device is the bottleneck; far below, host work leaves it idle.",
            labels=labels)
        for model in list(self._supervisor.models.values()):
            # (stats, block size) of each replica that has reported; a restarted replica's counters start over.
            reported = [(r.stats, r.info.block_size) for r in model.replicas if r.stats is not None and r.info]
            if not reported:
                continue
            name = [model.name]
            running.add_metric(name, sum(s.num_running for s, _ in reported))
            waiting.add_metric(name, sum(s.num_waiting for s, _ in reported))
            usage = sum(s.kv_usage for s, _ in reported) / len(reported)
            kv_usage.add_metric(name, usage)
            gpu_usage.add_metric(name, usage)
            preemptions.add_metric(name, sum(s.num_preemptions for s, _ in reported))
            queries.add_metric(name, sum(s.prefix_cache_queries * size for s, size in reported))
            hits.add_metric(name, sum(s.prefix_cache_hits * size for s, size in reported))
            step_seconds.add_metric(name, sum(s.step_seconds for s, _ in reported))
            device_wait.add_metric(name, sum(s.device_wait_seconds for s, _ in reported))
        yield from (running, waiting, kv_usage, gpu_usage, preemptions, queries, hits, step_seconds, device_wait)


class _LoraCollector:
    """Per-adapter requests, tokens, GPU slot loads and residency, from each replica's latest adapter list
    (`EngineClient.loras`: sent with every LoRA change and about once a second).

    An engine counts per adapter name from its start, across replacing and reloading the name. The exported
    counters add, at each scrape, what each engine counted since the previous scrape, and all of a new engine's
    counts (a restarted replica, or a reloaded model): so they never go back. What an engine counted after the last
    scrape that read it is lost when it is replaced.
    """

    def __init__(self, supervisor: Supervisor):
        self._supervisor = supervisor
        # model name -> adapter name -> [requests, tokens, slot loads] added up over the model's engines
        self._totals: dict[str, dict[str, list[int]]] = {}
        # (model name, replica index) -> (the engine client last read, its counts then by adapter name)
        self._seen: dict[tuple[str, int], tuple[object, dict[str, tuple[int, int, int]]]] = {}

    def collect(self):
        labels = ["model_name", "lora_name"]
        requests = CounterMetricFamily("kvbox:lora_requests", "Requests that used the LoRA adapter.", labels=labels)
        tokens = CounterMetricFamily("kvbox:lora_tokens", "Tokens computed with the LoRA adapter: prompt tokens "
                                     "(less prefix-cache hits), recomputed and generated ones.", labels=labels)
        slot_loads = CounterMetricFamily("kvbox:lora_slot_loads", "Copies of the LoRA adapter into a GPU slot.",
                                         labels=labels)
        residency = GaugeMetricFamily("kvbox:lora_adapter_residency", "Replicas holding the LoRA adapter in a GPU "
                                      "slot (location=gpu) or in host memory only (location=host).",
                                      labels=[*labels, "location"])
        # vLLM's: one sample per model whose labels name the adapters in use; its value is the time of the reading.
        requests_info = GaugeMetricFamily(
            "vllm:lora_requests_info", "Running and waiting LoRA adapters (comma-separated names).",
            labels=["model_name", "running_lora_adapters", "waiting_lora_adapters", "max_lora"])
        # Only the models and replicas there now are remembered: a model removed and added again starts over.
        all_totals, seen = {}, {}
        for name, model in list(self._supervisor.models.items()):
            if not model.spec.lora.enabled:
                continue
            totals = all_totals[name] = self._totals.get(name, {})
            resident: dict[str, dict[str, int]] = {}  # adapter name -> location -> replicas
            for replica in model.replicas:
                client, before = self._seen.get((name, replica.replica), (None, {}))
                if client is not replica:
                    before = {}
                now = {}
                for info in replica.loras:
                    counts = now[info.name] = (info.num_requests, info.num_tokens, info.num_slot_loads)
                    total = totals.setdefault(info.name, [0, 0, 0])
                    for i, (count, last) in enumerate(zip(counts, before.get(info.name, (0, 0, 0)))):
                        total[i] += count - last
                    if replica.live:
                        where = resident.setdefault(info.name, {"gpu": 0, "host": 0})
                        where["host" if info.slot is None else "gpu"] += 1
                # An adapter unloaded since keeps its last counts: loaded again, the engine goes on from them.
                seen[name, replica.replica] = (replica, {**before, **now})
            for adapter, (num_requests, num_tokens, num_slot_loads) in totals.items():
                requests.add_metric([name, adapter], num_requests)
                tokens.add_metric([name, adapter], num_tokens)
                slot_loads.add_metric([name, adapter], num_slot_loads)
            for adapter, where in resident.items():
                for location, num_replicas in where.items():
                    residency.add_metric([name, adapter, location], num_replicas)
            reported = [r.stats for r in model.replicas if r.stats is not None]
            if reported:
                running = sorted({a for stats in reported for a in stats.running_loras})
                waiting = sorted({a for stats in reported for a in stats.waiting_loras})
                requests_info.add_metric([name, ",".join(running), ",".join(waiting), str(model.spec.lora.max_loras)],
                                         time.time())
        self._totals, self._seen = all_totals, seen
        yield from (requests, tokens, slot_loads, residency, requests_info)


def metrics_route(path: str, metrics: Metrics) -> HTTPRouteHandler:
    @get(path, sync_to_thread=False, include_in_schema=False)
    def render_metrics() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE_LATEST)

    return render_metrics
