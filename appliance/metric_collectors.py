"""What Prometheus reads at scrape time, under vLLM's names where vLLM has the metric.

`EngineStatsCollector`: gauges and counters from each replica's latest `SchedulerStats` (summed over a model's
replicas; speculative decoding's `vllm:spec_decode_*` and the host swap pool's `kvbox:kv_swapped_*` /
`kvbox:kv_host_blocks_used` for models served with them) and `vllm:cache_config_info`; `LoraCollector`: per LoRA
adapter (`kvbox:lora_*`, labelled `model_name` and `lora_name`, and vLLM's `vllm:lora_requests_info`), from the
adapter lists and stats the replicas report.
"""

from __future__ import annotations

import time

from prometheus_client.metrics_core import CounterMetricFamily, GaugeMetricFamily

from appliance.supervisor import Supervisor


class EngineStatsCollector:
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
            "kvbox:engine_device_wait_seconds", "Of the step seconds, those spent waiting for the forward pass's "
            "results. On a GPU: close to the step seconds, the GPU is the bottleneck; far below, host work "
            "(scheduling, sampling bookkeeping) leaves it idle. On a CPU engine the forward runs on the host itself, "
            "so this is the compute time and the rest is the engine's own overhead.", labels=labels)
        # vLLM 0's names for the host swap pool (kv_cache.host_swap_bytes); 0 for a model without one.
        swapped = GaugeMetricFamily("vllm:num_requests_swapped", "Preempted requests whose KV blocks wait in host "
                                    "memory.", labels=labels)
        cpu_usage = GaugeMetricFamily("vllm:cpu_cache_usage_perc", "Host KV swap pool usage (1 = full).",
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
            swaps = [s.swap for s, _ in reported if s.swap is not None]
            swapped.add_metric(name, sum(w.num_swapped_requests for w in swaps))
            cpu_usage.add_metric(name, sum(w.num_used_host_blocks / w.num_host_blocks for w in swaps) / len(reported))
        yield from (running, waiting, kv_usage, gpu_usage, preemptions, queries, hits, step_seconds, device_wait,
                    swapped, cpu_usage, self._cache_config_info())
        yield from self._spec_decoding()
        yield from self._swap()

    def _swap(self):
        """The host swap pool's block moves and use, for models served with one (summed over replicas)."""
        labels = ["model_name"]
        swapped_out = CounterMetricFamily("kvbox:kv_swapped_out_blocks", "KV blocks of preempted requests moved "
                                          "to host memory.", labels=labels)
        swapped_in = CounterMetricFamily("kvbox:kv_swapped_in_blocks", "KV blocks moved back from host memory to "
                                         "the device.", labels=labels)
        used = GaugeMetricFamily("kvbox:kv_host_blocks_used", "Host swap pool blocks in use.", labels=labels)
        for model in list(self._supervisor.models.values()):
            swaps = [r.stats.swap for r in model.replicas if r.stats is not None and r.stats.swap is not None]
            if not swaps:
                continue
            swapped_out.add_metric([model.name], sum(w.num_swapped_out_blocks for w in swaps))
            swapped_in.add_metric([model.name], sum(w.num_swapped_in_blocks for w in swaps))
            used.add_metric([model.name], sum(w.num_used_host_blocks for w in swaps))
        yield from (swapped_out, swapped_in, used)

    def _spec_decoding(self):
        """vLLM's speculative decoding counters, for models served with it (summed over replicas)."""
        labels = ["model_name"]
        families = {name: CounterMetricFamily(f"vllm:spec_decode_{name}", documentation, labels=labels)
                    for name, documentation in (("num_drafts", "Verifications of drafts (one per request and step)."),
                                                ("num_draft_tokens", "Draft tokens proposed."),
                                                ("num_accepted_tokens", "Draft tokens accepted."))}
        per_pos = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos", "Draft tokens accepted at "
                                      "each position of the drafts.", labels=[*labels, "position"])
        for model in list(self._supervisor.models.values()):
            reported = [r.stats.spec_decoding for r in model.replicas
                        if r.stats is not None and r.stats.spec_decoding is not None]
            if not reported:
                continue
            for name, family in families.items():
                family.add_metric([model.name], sum(getattr(s, name) for s in reported))
            for position, counts in enumerate(zip(*(s.num_accepted_tokens_per_pos for s in reported))):
                per_pos.add_metric([model.name, str(position)], sum(counts))
        yield from (*families.values(), per_pos)

    def _cache_config_info(self) -> GaugeMetricFamily:
        """vLLM's info gauge (always 1) whose labels are each replica's KV cache configuration."""
        names = ["model_name", "engine", "block_size", "num_gpu_blocks", "num_cpu_blocks", "cache_dtype",
                 "enable_prefix_caching", "gpu_memory_utilization", "device"]
        info = GaugeMetricFamily("vllm:cache_config_info", "The KV cache configuration of each engine.",
                                 labels=names)
        for model in list(self._supervisor.models.values()):
            for replica in model.replicas:
                if replica.info is None:
                    continue
                config = replica.plan.engine_config
                swap = replica.stats.swap if replica.stats is not None else None
                info.add_metric([model.name, str(replica.replica), str(replica.info.block_size),
                                 str(replica.info.num_kv_blocks), str(swap.num_host_blocks if swap else 0),
                                 replica.info.dtype,
                                 str(config.enable_prefix_caching), str(config.gpu_memory_utilization),
                                 replica.info.device], 1)
        return info


class LoraCollector:
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
