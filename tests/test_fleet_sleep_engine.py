"""`engine.sleep` on an engine directly: level 1 frees the KV cache (and on a GPU moves the weights to pinned host
memory and drops the CUDA graphs), a wake restores them, and greedy outputs after the wake are identical to the
engine's before it ever slept. The GPU case runs where CUDA is present (the lead's GPU run)."""

import pytest
import torch

from engine import LLM, SamplingParams
from engine.sleep import EngineSleep

PROMPTS = [[5, 17, 42, 9, 33, 8, 71, 12], [3, 3, 90, 14]]
DEVICES = ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
def test_level_1_round_trip_gives_identical_greedy_outputs(tiny_model, device):
    options = {"kv_cache_memory_bytes": 64 << 20, "max_num_seqs": 4}
    if device == "cuda":
        options |= {"dtype": "bfloat16", "kernel_backend": "triton"}  # CUDA graphs on: dropped and captured again
    llm = LLM(tiny_model("llama", max_position_embeddings=192), device=device, **options)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    core, sleeper = llm.core, EngineSleep(llm.core)
    awake = sleeper.state()
    allocated = torch.cuda.memory_allocated() if device == "cuda" else 0
    for _ in range(3):
        asleep = sleeper.handle(sleep=True)
        assert asleep.asleep and not asleep.error and asleep.kv_cache_bytes == 0
        assert all(layer.kv_cache is None for layer in core.runner.model.attention_layers())
        assert core.kv_manager.pool.num_cached_free_blocks == 0  # the cache's contents are gone, so is its index
        if device == "cuda":
            assert asleep.weight_bytes == 0 and asleep.host_copy_bytes >= core.weight_bytes
            assert next(core.runner.model.parameters()).is_pinned()
            freed = allocated - torch.cuda.memory_allocated()
            assert freed >= core.weight_bytes + awake.kv_cache_bytes
        else:
            assert asleep.weight_bytes == awake.weight_bytes and asleep.host_copy_bytes == 0
        woken = sleeper.handle(sleep=False)
        assert not woken.asleep and woken.kv_cache_bytes == awake.kv_cache_bytes
        assert woken.weight_bytes == awake.weight_bytes and woken.host_copy_bytes == 0
        after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert after == before


def test_a_busy_engine_refuses_level_1(tiny_model):
    llm = LLM(tiny_model("llama", max_position_embeddings=192), device="cpu", kv_cache_memory_bytes=16 << 20)
    llm.core.add_request("busy", PROMPTS[0], SamplingParams(max_tokens=4))
    refused = EngineSleep(llm.core).handle(sleep=True)
    assert refused.error == "requests are still running" and not refused.asleep
    assert all(layer.kv_cache is not None for layer in llm.core.runner.model.attention_layers())


def test_level_1_with_tensor_parallelism_sleeps_every_rank(tiny_model):
    """Two gloo ranks: rank 0 tells its worker to sleep (the worker answers in a collective only its sleep handler
    joins, so a worker that did not sleep would hang the test, not pass it), and the woken pair answers as before."""
    llm = LLM(tiny_model("llama", max_position_embeddings=192), device="cpu", dtype="float32",
              tensor_parallel_size=2, kv_cache_memory_bytes=32 << 20, max_num_seqs=4)
    try:
        params = SamplingParams(temperature=0.0, max_tokens=16, ignore_eos=True)
        before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        sleeper = EngineSleep(llm.core)
        awake = sleeper.state()
        asleep = sleeper.handle(sleep=True)
        assert asleep.asleep and not asleep.error and asleep.kv_cache_bytes == 0
        assert all(layer.kv_cache is None for layer in llm.core.runner.local.model.attention_layers())
        woken = sleeper.handle(sleep=False)
        assert not woken.error and woken.kv_cache_bytes == awake.kv_cache_bytes
        llm.core.runner.check_workers()
        after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert after == before
    finally:
        llm.shutdown()
