"""Offline metrics (`LLM.get_metrics()`): the engine's counters and gauges under vLLM's names, as vLLM's
`vllm.v1.metrics.reader` shapes them (Counter, Gauge, Vector), read from the scheduler's stats."""

from __future__ import annotations

from dataclasses import dataclass

from engine.contract import SchedulerStats


@dataclass
class Metric:
    name: str
    labels: dict[str, str]


@dataclass
class Counter(Metric):
    value: int


@dataclass
class Gauge(Metric):
    value: float


@dataclass
class Vector(Metric):
    values: list[int]


def read_metrics(stats: SchedulerStats, model_name: str, block_size: int, engine: int = 0) -> list[Metric]:
    labels = {"model_name": model_name, "engine": str(engine)}
    metrics: list[Metric] = [
        Gauge("vllm:num_requests_running", labels, stats.num_running),
        Gauge("vllm:num_requests_waiting", labels, stats.num_waiting),
        Gauge("vllm:kv_cache_usage_perc", labels, stats.kv_usage),
        Counter("vllm:num_preemptions", labels, stats.num_preemptions),
        Counter("vllm:prefix_cache_queries", labels, stats.prefix_cache_queries * block_size),
        Counter("vllm:prefix_cache_hits", labels, stats.prefix_cache_hits * block_size),
    ]
    if (spec := stats.spec_decoding) is not None:
        metrics += [
            Counter("vllm:spec_decode_num_drafts", labels, spec.num_drafts),
            Counter("vllm:spec_decode_num_draft_tokens", labels, spec.num_draft_tokens),
            Counter("vllm:spec_decode_num_accepted_tokens", labels, spec.num_accepted_tokens),
            Vector("vllm:spec_decode_num_accepted_tokens_per_pos", labels, list(spec.num_accepted_tokens_per_pos)),
        ]
    if (swap := stats.swap) is not None:
        metrics += [
            Gauge("vllm:num_requests_swapped", labels, swap.num_swapped_requests),
            Counter("kvbox:kv_swapped_out_blocks", labels, swap.num_swapped_out_blocks),
            Counter("kvbox:kv_swapped_in_blocks", labels, swap.num_swapped_in_blocks),
            Gauge("kvbox:kv_host_blocks_used", labels, swap.num_used_host_blocks),
        ]
    return metrics
