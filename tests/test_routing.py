"""Data-parallel routing: a prompt goes to the replica whose prefix cache likely holds most of it, unless that replica
is much busier than the least loaded one; the cached tokens a request reports show the gain."""

from dataclasses import dataclass

import msgspec
import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import long_llama, model_config, run_inprocess, server_config  # noqa: E402

from appliance.config.schema import ModelSpec  # noqa: E402
from appliance.routing import PrefixRouter  # noqa: E402
from appliance.supervisor import ModelRuntime  # noqa: E402

pytest_plugins = ["helpers_server"]

BLOCK = 4


@dataclass
class FakeReplica:
    replica: int
    num_inflight: int = 0


def prompt(prefix: int, suffix: int, num_prefix_blocks: int = 3) -> list[int]:
    return [prefix] * (BLOCK * num_prefix_blocks) + [1000 + suffix] * 3


def test_a_cached_prefix_draws_its_prompt_within_the_load_margin():
    router = PrefixRouter(BLOCK, max_busier=2)
    idle, busy = FakeReplica(0), FakeReplica(1)
    assert router.choose([idle, busy], prompt(7, 0)) is idle  # nothing cached: the least loaded
    idle.num_inflight = 2
    assert router.choose([idle, busy], prompt(7, 1)) is idle  # two busier than replica 1: still within the margin
    idle.num_inflight = 3
    assert router.choose([idle, busy], prompt(7, 2)) is busy  # beyond it: load wins, and replica 1 now holds it
    idle.num_inflight = 0
    assert router.choose([idle, busy], prompt(7, 3)) is busy  # the latest holder of the prefix
    assert (router.num_routed, router.num_prefix_routed) == (4, 2)


def test_the_longest_cached_prefix_wins_and_short_prompts_go_by_load():
    router = PrefixRouter(BLOCK, max_busier=8)
    a, b = FakeReplica(0), FakeReplica(1, num_inflight=1)
    router.choose([a, b], prompt(5, 0, num_prefix_blocks=1))  # one block of 5s on a
    a.num_inflight, b.num_inflight = 1, 0
    router.choose([a, b], prompt(5, 0, num_prefix_blocks=3))  # a holds the first block: it gets all three
    b.num_inflight = 5
    # b is not busier than a by more than the margin, but it holds nothing of this prompt
    assert router.choose([a, b], prompt(5, 9, num_prefix_blocks=3)) is a
    assert router.choose([a, b], [1, 2]) is a  # shorter than a block: the least loaded


def test_memory_is_bounded():
    router = PrefixRouter(BLOCK, max_busier=1, max_entries=10)
    replica = FakeReplica(0)
    for i in range(20):
        router.choose([replica], prompt(i, i))
    assert len(router._owner) == 10


@pytest.mark.parametrize("parallelism, routed", [({"data": 2}, True), ({"data": 2, "routing": "load"}, False),
                                                 ({"data": 1}, False)])
def test_the_config_chooses_the_routing(parallelism, routed):
    spec = msgspec.convert({"name": "m", "source": "/m", "parallelism": parallelism}, ModelSpec)
    assert (ModelRuntime(spec).router is not None) == routed


def test_served_replicas_reuse_their_cached_prefix(tiny_model):
    """One replica is busy with a long stream after it cached a prefix: least-loaded routing would send the next
    prompt with that prefix to the idle replica (no cached tokens); cache-aware routing sends it back."""
    shared = "The quick brown fox jumps over the lazy dog. " * 8
    config = server_config([model_config("llama", long_llama(tiny_model), parallelism={"data": 2},
                                         kv_cache={"num_blocks": 300, "block_size": 16})])
    cached = {}
    with run_inprocess(config) as server:
        model = server.supervisor.models["llama"]
        client = server.client()
        for routing in ("prefix", "load"):
            if routing == "load":
                model.router = None
            first = client.completions.create(model="llama", prompt=shared + f"{routing} one", max_tokens=1)
            assert first.usage.prompt_tokens_details.cached_tokens == 0  # a prefix not seen before on any replica
            with client.completions.create(model="llama", prompt="busy", max_tokens=1500, stream=True,
                                           extra_body={"ignore_eos": True}) as stream:
                next(iter(stream))  # the long request runs on the replica that cached the prefix (both were idle)
                second = client.completions.create(model="llama", prompt=shared + f"{routing} two", max_tokens=1)
            cached[routing] = second.usage.prompt_tokens_details.cached_tokens
            shared = shared.replace("quick", "slow")  # a fresh prefix for the next round
    assert cached["load"] == 0
    assert cached["prefix"] >= 64  # the shared prefix's full blocks
