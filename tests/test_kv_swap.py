"""KV swap (`host_swap_bytes`): on a cramped device cache, preempted requests' blocks move to host memory and back,
and greedy tokens and logprobs equal those of a roomy cache and of preemption by recompute (synchronous and async
scheduling, through msgpack-decoded steps, with a draft model whose cache swaps too); every device and host block
comes back; a pool too small, shared blocks and kept beams fall back to recompute; the counters reach metrics; the
YAML key maps to the engine option."""

import json
import subprocess
import sys
from pathlib import Path

import msgspec
import pytest
from prometheus_client.core import CollectorRegistry
from prometheus_client.exposition import generate_latest

from appliance.config.schema import ENGINE_KEYS, KVCacheSpec
from appliance.metric_collectors import EngineStatsCollector
from engine import LLM, SamplingParams
from engine.config import EngineConfig, EngineConfigError
from engine.contract import SchedulerOutput, SchedulerStats, SwapStats
from engine.kv_cache.manager import KVCacheManager
from engine.request import Request
from tests.test_contract import CRAMPED, DEVICES, PROMPTS, flat, through_the_wire

HOST = 1 << 24  # far more than the cramped cache's blocks
GREEDY = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=2, prompt_logprobs=1)


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", max_position_embeddings=256)


@pytest.fixture(scope="module")
def roomy(model_dir):
    return LLM(model_dir, dtype="float32", device="cpu").generate(PROMPTS, GREEDY, use_tqdm=False)


def logprobs_of(outputs):
    return [e.logprobs[0] for o in outputs for e in o.outputs[0].logprobs]


def assert_nothing_leaked(llm: LLM) -> None:
    kv = llm.core.kv_manager
    assert kv.num_free_blocks == kv.pool.num_blocks
    if kv.swap is not None:
        assert kv.swap.num_free_blocks == kv.swap.num_blocks
        assert llm.core.stats().swap.num_swapped_requests == 0


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_swapped_requests_match_a_roomy_cache_and_recompute(model_dir, roomy, async_scheduling, device):
    """On CUDA: a pinned host pool and asynchronous copies, ordered on the stream behind the step in flight."""
    if device != "cpu":
        roomy = LLM(model_dir, dtype="float32", device=device).generate(PROMPTS, GREEDY, use_tqdm=False)
    options = dict(dtype="float32", device=device, async_scheduling=async_scheduling, **CRAMPED)
    recompute = LLM(model_dir, **options)
    recomputed = recompute.generate(PROMPTS, GREEDY, use_tqdm=False)
    swap = LLM(model_dir, host_swap_bytes=HOST, **options)
    steps: list[SchedulerOutput] = []
    through_the_wire(swap, steps)  # as a worker process would get them
    swapped = swap.generate(PROMPTS, GREEDY, use_tqdm=False)
    assert flat(swapped) == flat(roomy) == flat(recomputed)
    assert logprobs_of(swapped) == pytest.approx(logprobs_of(roomy), abs=1e-4)
    stats = swap.core.stats()
    assert stats.num_preemptions > 0 and stats.swap.num_swapped_out_blocks > 0
    assert stats.swap.num_swapped_in_blocks == stats.swap.num_swapped_out_blocks
    assert any(step.blocks_to_swap_out for step in steps) and any(step.blocks_to_swap_in for step in steps)
    assert recompute.core.stats().swap is None
    assert_nothing_leaked(swap)
    # Every token's K/V was computed once: a resumed request computes only what it had not computed before.
    once = sum(len(o.prompt_token_ids) + GREEDY.max_tokens - 1 for o in swapped)
    assert sum(step.num_tokens for step in steps) == once


def test_pipeline_stages_swap_their_own_layers_blocks(tiny_model):
    """Two stages of an uneven split (2 + 1 layers): every stage counts the same host blocks (the pool is sized on
    the whole model) and moves its own layers' K/V in the steps' order, with batches in flight."""
    model_dir = tiny_model("llama", num_hidden_layers=3, max_position_embeddings=256)
    roomy = LLM(model_dir, dtype="float32", device="cpu").generate(PROMPTS, GREEDY, use_tqdm=False)
    whole = LLM(model_dir, dtype="float32", device="cpu", host_swap_bytes=HOST, **CRAMPED)
    llm = LLM(model_dir, dtype="float32", device="cpu", host_swap_bytes=HOST, pipeline_parallel_size=2, **CRAMPED)
    try:
        kv_memory = llm.core.runner.kv_memory
        assert kv_memory.num_layers == 2 and kv_memory.num_host_blocks == whole.core.runner.kv_memory.num_host_blocks
        swapped = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
        assert flat(swapped) == flat(roomy)
        assert logprobs_of(swapped) == pytest.approx(logprobs_of(roomy), abs=1e-4)
        stats = llm.core.stats()
        assert stats.num_preemptions > 0 and stats.swap.num_swapped_in_blocks == stats.swap.num_swapped_out_blocks > 0
        assert_nothing_leaked(llm)
    finally:
        llm.shutdown()


def test_a_request_the_host_pool_cannot_hold_recomputes(model_dir, roomy):
    probe = LLM(model_dir, dtype="float32", device="cpu", **CRAMPED)
    two_blocks = 2 * probe.core.runner.kv_memory.bytes_per_block  # every prompt here needs more
    llm = LLM(model_dir, dtype="float32", device="cpu", host_swap_bytes=two_blocks, **CRAMPED)
    assert flat(llm.generate(PROMPTS, GREEDY, use_tqdm=False)) == flat(roomy)
    stats = llm.core.stats()
    assert stats.num_preemptions > 0 and stats.swap.num_host_blocks == 2 and stats.swap.num_swapped_out_blocks == 0
    assert_nothing_leaked(llm)


def test_a_draft_models_cache_swaps_with_the_target(model_dir):
    """The target as its own draft accepts every greedy draft, which it would not if the draft's K/V were lost."""
    params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)
    reference = LLM(model_dir, dtype="float32", device="cpu").generate(PROMPTS, params, use_tqdm=False)
    # No prefix caching: these prompts share their first blocks, and a request holding shared blocks recomputes.
    llm = LLM(model_dir, dtype="float32", device="cpu", host_swap_bytes=HOST, enable_prefix_caching=False,
              speculative_config={"model": model_dir, "num_speculative_tokens": 3}, **CRAMPED)
    assert flat(llm.generate(PROMPTS, params, use_tqdm=False)) == flat(reference)
    stats = llm.core.stats()
    assert stats.swap.num_swapped_out_blocks > 0
    assert stats.spec_decoding.num_accepted_tokens == stats.spec_decoding.num_draft_tokens > 0
    memory = llm.core.runner.kv_memory
    assert memory.draft.num_host_blocks == memory.num_host_blocks == stats.swap.num_host_blocks
    assert_nothing_leaked(llm)


def _request(request_id: str, num_tokens: int) -> Request:
    return Request(request_id, list(range(num_tokens)), SamplingParams(max_tokens=8))


def _running(kv: KVCacheManager, request_id: str, num_tokens: int) -> Request:
    request = _request(request_id, num_tokens)
    assert kv.allocate_slots(request, num_tokens)
    request.num_computed_tokens = num_tokens
    return request


def test_host_pool_bookkeeping():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False, num_host_blocks=4)
    a, b = _running(kv, "a", 10), _running(kv, "b", 6)  # 3 and 2 blocks
    a_blocks = list(kv.block_ids("a"))
    assert kv.swap_out(a) and kv.is_swapped_out(a) and kv.num_free_blocks == 6
    assert not kv.swap_out(b)  # 2 blocks, 1 host block left: it recomputes, nothing changed
    assert kv.num_blocks_of("b") == 2
    out, into = kv.take_swaps()
    assert out == list(zip(a_blocks, [0, 1, 2])) and into == []
    assert kv.allocate_slots(a, 1)  # resumed: 11 tokens in 3 fresh blocks, the first 3 filled from the host
    out, into = kv.take_swaps()
    assert out == [] and into == list(zip([0, 1, 2], kv.block_ids("a"))) and kv.swap.num_free_blocks == 4
    assert kv.swap_out(a)
    kv.free(a)  # ended (aborted) while swapped out
    assert kv.swap.num_free_blocks == 4 and kv.swap.stats() == SwapStats(4, 0, 0, 6, 3)


def test_shared_and_kept_blocks_are_not_swapped():
    kv = KVCacheManager(num_blocks=8, block_size=4, enable_prefix_caching=False, num_host_blocks=8)
    source = _running(kv, "s", 9)
    sibling = _request("s2", 9)
    sibling.num_computed_tokens = kv.share_prefix(source, sibling)
    assert not kv.swap_out(source)  # its prompt blocks are the sibling's too
    kept = _running(kv, "k", 4)
    kv.keep_when_finished("k")  # a beam whose K/V its forks will take
    assert not kv.swap_out(kept)
    assert kv.swap.num_free_blocks == 8 and kv.take_swaps() == ([], [])


def _stats(swap: SwapStats | None) -> SchedulerStats:
    return SchedulerStats(0, 0, 0, 0.0, 16, 16, 0, 0, 0, 3, 0, 0, swap=swap)


def test_swap_counters_reach_the_metrics(model_dir):
    llm = LLM(model_dir, dtype="float32", device="cpu", host_swap_bytes=HOST, **CRAMPED)
    llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    offline = {m.name: m.value for m in llm.get_metrics()}
    assert offline["kvbox:kv_swapped_out_blocks"] == offline["kvbox:kv_swapped_in_blocks"] > 0
    assert offline["kvbox:kv_host_blocks_used"] == 0 and offline["vllm:num_preemptions"] > 0

    class Replica:
        def __init__(self, swap):
            self.stats, self.replica = _stats(swap), 0
            self.info = type("Info", (), {"block_size": 16, "num_kv_blocks": 16, "dtype": "float32",
                                          "device": "cpu"})()
            self.plan = type("Plan", (), {"engine_config": EngineConfig("m")})()

    swap = SwapStats(num_host_blocks=10, num_used_host_blocks=4, num_swapped_requests=1, num_swapped_out_blocks=7,
                     num_swapped_in_blocks=3)
    model = type("Model", (), {"name": "m", "replicas": [Replica(swap), Replica(None)]})()
    registry = CollectorRegistry()
    registry.register(EngineStatsCollector(type("Supervisor", (), {"models": {"m": model}})()))
    text = generate_latest(registry).decode()
    for line in ('kvbox:kv_swapped_out_blocks_total{model_name="m"} 7.0',
                 'kvbox:kv_swapped_in_blocks_total{model_name="m"} 3.0', 'kvbox:kv_host_blocks_used{model_name="m"} 4.0',
                 'vllm:num_requests_swapped{model_name="m"} 1.0', 'vllm:cpu_cache_usage_perc{model_name="m"} 0.2',
                 'vllm:num_preemptions_total{model_name="m"} 6.0'):
        assert line in text, line
    assert 'num_cpu_blocks="10"' in text


def test_yaml_key_and_checks():
    assert ENGINE_KEYS["host_swap_bytes"] == ("kv_cache", "host_swap_bytes")
    assert msgspec.convert({"host_swap_bytes": 1 << 30}, KVCacheSpec).host_swap_bytes == 1 << 30
    assert KVCacheSpec().host_swap_bytes is None
    with pytest.raises(msgspec.ValidationError, match="host_swap_bytes"):
        msgspec.convert({"host_swap_bytes": -1}, KVCacheSpec)
    with pytest.raises(EngineConfigError, match="host_swap_bytes"):
        EngineConfig("m", host_swap_bytes=-1)
    assert EngineConfig("m", host_swap_bytes=1 << 20, pipeline_parallel_size=2).host_swap_bytes == 1 << 20


def test_bench_swap_vs_recompute_smoke(tmp_path):
    out = tmp_path / "result.json"
    subprocess.run([sys.executable, str(Path(__file__).resolve().parents[1] / "bench" / "kv_swap.py"), "--shape",
                    "tiny-llama", "--device", "cpu", "--num-prompts", "6", "--input-len", "32", "--output-len", "12",
                    "--num-kv-blocks", "8", "--host-swap-gib", "0.01", "--reference", "--json", str(out)], check=True,
                   timeout=300)
    result = json.loads(out.read_text())
    recompute, swap, reference = result["rows"]
    assert reference["preemptions"] == 0
    for pair in ("swap_vs_recompute", "swap_vs_reference", "recompute_vs_reference"):
        assert result[pair] == {"identical_prompts": 6, "prompts": 6, "mean_leading_tokens_in_common": 12.0}
    assert recompute["preemptions"] > 0 and recompute["swapped_out_blocks"] == 0
    assert swap["preemptions"] > 0 and swap["swapped_out_blocks"] == swap["swapped_in_blocks"] > 0
