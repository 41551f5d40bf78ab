"""bench/serve.py's comparisons in one call: the same prompts on servers launched one after the other with one option
changed, and the two runs' figures side by side.

--compare-prefill-cap: prompt chunks filling the step beside decodes (`max_prefill_tokens_while_decoding: null`, the
policy before issue #25) against the decode-first cap; inter-token latency and throughput of each.
--compare-prefix-caching (with --shared-prefix-len): prefix caching off, then on; the throughput ratio.
--compare-routing (with --data-parallel and --shared-prefix-len, best with --prefix-groups): replicas chosen by load
alone (vLLM's routing), then by cached prefix (SGLang's cache-aware routing, kvbox's default); the prefix cache's hit
rate and the throughput of each.
"""

from __future__ import annotations

import random


def server_variants(args) -> list[tuple[str, dict]]:
    """(label, the launched model's config overrides) per server, in order; one unnamed one without a comparison."""
    cap = args.max_prefill_tokens_while_decoding
    if args.compare_prefill_cap:
        return [("prefill cap off (the previous policy)",
                 {"scheduler": {"max_prefill_tokens_while_decoding": None}}),
                (f"prefill cap {cap} (prompt tokens per step beside decodes)",
                 {"scheduler": {"max_prefill_tokens_while_decoding": cap}})]
    caching = bool(args.shared_prefix_len)  # random prompts share nothing: the cache would only cost its lookups
    if args.compare_prefix_caching:
        return [("prefix caching off", {"kv_cache": {"prefix_caching": False}}),
                ("prefix caching on", {"kv_cache": {"prefix_caching": True}})]
    if args.compare_routing:
        policies = (("load", "the least loaded replica"), ("prefix", "the replica holding the prefix"))
        return [(f"routing {routing} ({what})", {"kv_cache": {"prefix_caching": True}, "parallelism": {"routing": routing}})
                for routing, what in policies]
    return [("", {"kv_cache": {"prefix_caching": caching}, "scheduler": {"max_prefill_tokens_while_decoding": cap}})]


def shared_prefix_prompts(num: int, prefix_len: int, own_len: int, vocab_size: int, seed: int = 0,
                          groups: int = 1) -> list[list[int]]:
    """`num` prompts of random token ids: one of `groups` common `prefix_len`-token prefixes (system prompts, or
    documents several questions are asked about), drawn at random, then `own_len` tokens of their own."""
    rng = random.Random(seed)
    draw = lambda n: [rng.randrange(10, vocab_size - 10) for _ in range(n)]  # noqa: E731
    prefixes = [draw(prefix_len) for _ in range(groups)]
    return [rng.choice(prefixes) + draw(own_len) for _ in range(num)]


def compare(args, runs: list[tuple[str, dict]]) -> dict:
    """The second run against the first: output throughput ratio and each one's ITL and TTFT p99 (printed too)."""
    (first_label, first), (second_label, second) = runs
    ratio = second["output_tokens_per_s"] / first["output_tokens_per_s"]
    name = ("prefix_caching_speedup" if args.compare_prefix_caching else "prefix_routing_speedup"
            if args.compare_routing else "capped_over_uncapped_throughput")
    print(f"{second_label} / {first_label}: output throughput {ratio:.3f} "
          f"({second['output_tokens_per_s']:.1f} / {first['output_tokens_per_s']:.1f} tok/s)")
    for label, summary in runs:
        itl, ttft = summary.get("itl_ms", {}), summary.get("ttft_ms", {})
        print(f"  {label}: ITL p50 {itl.get('p50', 0):.1f} p90 {itl.get('p90', 0):.1f} p99 {itl.get('p99', 0):.1f} "
              f"ms, TTFT p50 {ttft.get('p50', 0):.0f} p99 {ttft.get('p99', 0):.0f} ms, "
              f"{summary['total_tokens_per_s']:.0f} total tok/s"
              + (f", prefix cache hit rate {summary['prefix_cache']['hit_rate']:.1%}" if "prefix_cache" in summary
                 else ""))
    return {name: ratio, "runs": [{"label": label, **summary} for label, summary in runs]}
