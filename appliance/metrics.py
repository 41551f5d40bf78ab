"""Prometheus metrics under vLLM's names, types, buckets and `model_name` label, so that vLLM's Grafana dashboards
work unchanged (`docs/grafana-kvbox.json` is ours, with kvbox's extras).

Three sources:
- the request path (`RequestMetrics`, one per engine request): tokens, TTFT, inter-token latency, end-to-end latency,
  finish reasons (a client that disconnects counts as `abort`), the request's `n` and `max_tokens`, prompt and
  generation lengths; with an adapter also `kvbox:lora_prompt_tokens` and `kvbox:lora_generation_tokens`;
- every engine step message (`Metrics.on_step`): tokens per iteration, and each finished request's queue, prefill,
  decode and inference times, which the engine measures (`EngineCoreOutput.timing`);
- scrape time (`appliance.metric_collectors`): gauges and counters from each replica's latest `SchedulerStats`,
  `vllm:cache_config_info`, and per-LoRA-adapter series.
Each app has its own `CollectorRegistry`: no global state, so several apps can live in one process.
"""

from __future__ import annotations

import time

from litestar import Response, get
from litestar.handlers import HTTPRouteHandler
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from appliance.metric_collectors import EngineStatsCollector, LoraCollector
from appliance.supervisor import Supervisor
from engine.contract import EngineCoreOutput, StepOutputs
from engine.output_processor import RequestOutput
from engine.request import FinishReason
from engine.sampling_params import SamplingParams

# vLLM's buckets, for comparable dashboards.
_TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
                 40.0, 80.0, 160.0, 640.0, 2560.0)
_ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0,
                80.0)
_REQUEST_TIME_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0,
                         240.0, 480.0, 960.0, 1920.0, 7680.0)
_PREFILL_TOKEN_BUCKETS = (0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0)
_ITERATION_BUCKETS = (1, 8, 16, 32, 64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384)
_N_BUCKETS = (1, 2, 5, 10, 20)
# vLLM runs its 1-2-5 series up to the one model's max_model_len; one registry serves every model here, and a
# histogram's buckets are fixed per name, so the series runs to a million tokens.
_TOKEN_BUCKETS = tuple(m * 10 ** e for e in range(6) for m in (1, 2, 5)) + (1_000_000,)


def count_step_tokens(outputs: list[EngineCoreOutput], prefilled: set[str]) -> tuple[int, int, int]:
    """(prompt tokens, generated tokens, finished samples) of one step's outputs. A prompt counts once, at its first
    token (vLLM's rule), and n sibling samples share it; `prefilled` remembers the requests already counted."""
    num_prompt = num_generated = num_finished = 0
    for output in outputs:
        if output.new_token_ids:
            num_generated += len(output.new_token_ids)
            if output.index == 0 and output.request_id not in prefilled:
                prefilled.add(output.request_id)
                num_prompt += output.num_prompt_tokens
        if output.finish_reason is not None:
            num_finished += 1
            prefilled.discard(output.request_id)
    if len(prefilled) > 100_000:  # requests lost with a dead engine never report their end
        prefilled.clear()
    return num_prompt, num_generated, num_finished


class Metrics:
    def __init__(self, supervisor: Supervisor):
        self.registry = CollectorRegistry()
        r, model = self.registry, ["model_name"]

        def histogram(name: str, documentation: str, buckets: tuple) -> Histogram:
            return Histogram(name, documentation, model, buckets=buckets, registry=r)

        # prometheus_client appends `_total` to counter names: these are vLLM's `vllm:prompt_tokens_total` etc.
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prompt tokens of requests.", model, registry=r)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generated tokens.", model, registry=r)
        self.request_success = Counter("vllm:request_success", "Finished completions, by finish reason (abort: "
                                       "the client went away).", model + ["finished_reason"], registry=r)
        self.time_to_first_token = histogram("vllm:time_to_first_token_seconds", "Time to first token.",
                                             _TTFT_BUCKETS)
        self.inter_token_latency = histogram("vllm:inter_token_latency_seconds", "Time between output updates.",
                                             _ITL_BUCKETS)
        # vLLM's name for the same samples before 0.10; its example Grafana dashboard plots this one.
        self.time_per_output_token = histogram("vllm:time_per_output_token_seconds", "Time between output updates "
                                               "(the name before vLLM 0.10).", _ITL_BUCKETS)
        self.request_time_per_output_token = histogram(
            "vllm:request_time_per_output_token_seconds", "Per request: decode time / (generated tokens - 1).",
            _ITL_BUCKETS)
        self.e2e_request_latency = histogram("vllm:e2e_request_latency_seconds", "Request latency, arrival to end.",
                                             _REQUEST_TIME_BUCKETS)
        self.request_queue_time = histogram("vllm:request_queue_time_seconds", "Time waiting in the engine's "
                                            "queue before first scheduled.", _REQUEST_TIME_BUCKETS)
        self.request_prefill_time = histogram("vllm:request_prefill_time_seconds", "Time from first scheduled to "
                                              "the first token.", _REQUEST_TIME_BUCKETS)
        self.request_decode_time = histogram("vllm:request_decode_time_seconds", "Time from the first token to the "
                                             "last.", _REQUEST_TIME_BUCKETS)
        self.request_inference_time = histogram("vllm:request_inference_time_seconds", "Time from first scheduled "
                                                "to the last token (prefill + decode).", _REQUEST_TIME_BUCKETS)
        self.time_per_prefill_token = histogram("vllm:time_per_prefill_token_request_seconds", "Per request: "
                                                "prefill time / prompt tokens.", _PREFILL_TOKEN_BUCKETS)
        self.iteration_tokens = histogram("vllm:iteration_tokens_total", "Tokens per engine step (prompts at their "
                                          "first token, plus generated tokens).", _ITERATION_BUCKETS)
        self.request_prompt_tokens = histogram("vllm:request_prompt_tokens", "Prompt tokens per finished request.",
                                               _TOKEN_BUCKETS)
        self.request_generation_tokens = histogram("vllm:request_generation_tokens", "Generated tokens per "
                                                   "finished request.", _TOKEN_BUCKETS)
        self.request_max_num_generation_tokens = histogram(
            "vllm:request_max_num_generation_tokens", "Per request, the most tokens one of its n samples generated.",
            _TOKEN_BUCKETS)
        self.request_params_n = histogram("vllm:request_params_n", "The n request parameter.", _N_BUCKETS)
        self.request_params_max_tokens = histogram("vllm:request_params_max_tokens", "The max_tokens request "
                                                   "parameter (requests that set it).", _TOKEN_BUCKETS)
        adapter = ["model_name", "lora_name"]
        self.lora_prompt_tokens = Counter("kvbox:lora_prompt_tokens", "Prompt tokens of requests with the LoRA "
                                          "adapter.", adapter, registry=r)
        self.lora_generation_tokens = Counter("kvbox:lora_generation_tokens", "Tokens generated with the LoRA "
                                              "adapter.", adapter, registry=r)
        r.register(EngineStatsCollector(supervisor))
        r.register(LoraCollector(supervisor))
        self._series: dict[tuple[str, str | None], _Series] = {}
        self._prefilled: dict[tuple[str, int], set[str]] = {}  # (model, replica) -> requests whose prompt counted

    def series(self, model_name: str, lora_name: str | None = None) -> _Series:
        key = (model_name, lora_name)
        found = self._series.get(key)
        if found is None:
            found = self._series[key] = _Series(self, model_name, lora_name)
        return found

    def request(self, model_name: str, lora_name: str | None = None,
                params: SamplingParams | None = None) -> RequestMetrics:
        return RequestMetrics(self.series(model_name, lora_name), params)

    def on_step(self, model_name: str, replica_index: int, message: StepOutputs) -> None:
        """Called with every step message of every replica (the supervisor's `on_step` hook)."""
        series = self.series(model_name)
        prefilled = self._prefilled.setdefault((model_name, replica_index), set())
        num_prompt, num_generated, _ = count_step_tokens(message.outputs, prefilled)
        if message.step_seconds > 0:  # an engine step ran (aborts and idle reports have none)
            series.iteration_tokens.observe(num_prompt + num_generated)
        for output in message.outputs:
            timing = output.timing
            if timing is None:
                continue
            series.request_queue_time.observe(timing.queued_s)
            series.request_prefill_time.observe(timing.prefill_s)
            series.request_decode_time.observe(timing.decode_s)
            series.request_inference_time.observe(timing.prefill_s + timing.decode_s)
            if output.num_prompt_tokens:
                series.time_per_prefill_token.observe(timing.prefill_s / output.num_prompt_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _Series:
    """One model's (and adapter's) labelled children, looked up once: `.labels()` costs more than observing."""

    _PER_MODEL = ("time_to_first_token", "prompt_tokens", "inter_token_latency", "time_per_output_token",
                  "request_time_per_output_token", "generation_tokens", "e2e_request_latency", "request_queue_time",
                  "request_prefill_time", "request_decode_time", "request_inference_time", "time_per_prefill_token",
                  "iteration_tokens", "request_prompt_tokens", "request_generation_tokens",
                  "request_max_num_generation_tokens", "request_params_n", "request_params_max_tokens")

    def __init__(self, metrics: Metrics, model_name: str, lora_name: str | None):
        for name in self._PER_MODEL:
            setattr(self, name, getattr(metrics, name).labels(model_name))
        self.request_success = {reason.value: metrics.request_success.labels(model_name, reason.value)
                                for reason in FinishReason}
        self.lora_prompt_tokens = metrics.lora_prompt_tokens.labels(model_name, lora_name) if lora_name else None
        self.lora_generation_tokens = (metrics.lora_generation_tokens.labels(model_name, lora_name) if lora_name
                                       else None)


class RequestMetrics:
    """Observes one engine request's output snapshots as they arrive, and its abort if its client goes away."""

    def __init__(self, series: _Series, params: SamplingParams | None = None):
        self._series = series
        self._params = params
        self._arrival = time.monotonic()
        self._first_token_time: float | None = None
        self._last_token_time: float | None = None
        self._num_prompt_tokens = 0
        self._done = False

    def observe(self, output: RequestOutput) -> None:
        series, now = self._series, time.monotonic()
        num_new_tokens = sum(len(c.delta_token_ids) for c in output.outputs)
        if num_new_tokens:
            if self._last_token_time is None:
                self._first_token_time = now
                self._num_prompt_tokens = len(output.prompt_token_ids)
                series.time_to_first_token.observe(now - self._arrival)
                series.prompt_tokens.inc(self._num_prompt_tokens)
                if series.lora_prompt_tokens is not None:
                    series.lora_prompt_tokens.inc(self._num_prompt_tokens)
            else:
                series.inter_token_latency.observe(now - self._last_token_time)
                series.time_per_output_token.observe(now - self._last_token_time)
            self._last_token_time = now
            series.generation_tokens.inc(num_new_tokens)
            if series.lora_generation_tokens is not None:
                series.lora_generation_tokens.inc(num_new_tokens)
        if output.finished:
            self._finish(now, [c.finish_reason for c in output.outputs], [len(c.token_ids) for c in output.outputs],
                         len(output.prompt_token_ids))

    def aborted(self) -> None:
        """Its client went away before it finished: each of its samples ends as `abort`."""
        if not self._done:
            n = self._params.n if self._params is not None else 1
            self._finish(time.monotonic(), [FinishReason.ABORT.value] * n, [], self._num_prompt_tokens)

    def _finish(self, now: float, reasons: list[str], lengths: list[int], num_prompt_tokens: int) -> None:
        series, self._done = self._series, True
        series.e2e_request_latency.observe(now - self._arrival)
        for reason in reasons:
            series.request_success[reason].inc()
        for length in lengths:
            series.request_prompt_tokens.observe(num_prompt_tokens)
            series.request_generation_tokens.observe(length)
        if lengths:
            series.request_max_num_generation_tokens.observe(max(lengths))
            generated = max(lengths)
            if generated > 1 and self._first_token_time is not None:
                series.request_time_per_output_token.observe(
                    (self._last_token_time - self._first_token_time) / (generated - 1))
        if self._params is not None:
            series.request_params_n.observe(self._params.n)
            if self._params.max_tokens is not None:
                series.request_params_max_tokens.observe(self._params.max_tokens)


def metrics_route(path: str, metrics: Metrics) -> HTTPRouteHandler:
    @get(path, sync_to_thread=False, include_in_schema=False)
    def render_metrics() -> Response:
        # litestar appends the charset to text/* itself; prometheus_client's CONTENT_TYPE_LATEST already has one.
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    return render_metrics
