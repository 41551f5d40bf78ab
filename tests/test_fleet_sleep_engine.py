"""`engine.sleep` on an engine directly: level 1 frees the KV cache (and on a GPU moves the weights to pinned host
memory; the CUDA graphs are captured again on the first wake only, on fixed addresses), a wake restores them, and greedy outputs after the wake are identical to the
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
    first_graphs = None
    for cycle in range(3):
        free_before = torch.cuda.mem_get_info()[0] if device == "cuda" else 0
        asleep = sleeper.handle(sleep=True)
        assert asleep.asleep and not asleep.error and asleep.kv_cache_bytes == 0
        assert all(layer.kv_cache is None for layer in core.runner.model.attention_layers())
        assert core.kv_manager.pool.num_cached_free_blocks == 0  # the cache's contents are gone, so is its index
        if device == "cuda":
            assert asleep.weight_bytes == 0 and asleep.host_copy_bytes >= core.weight_bytes
            assert next(core.runner.model.parameters()).is_pinned()
            freed = allocated - torch.cuda.memory_allocated()
            assert freed >= core.weight_bytes + awake.kv_cache_bytes
            # From the second sleep the weights and cache live outside torch's allocator: the driver sees them go.
            assert torch.cuda.mem_get_info()[0] - free_before >= core.weight_bytes + awake.kv_cache_bytes
        else:
            assert asleep.weight_bytes == awake.weight_bytes and asleep.host_copy_bytes == 0
        woken = sleeper.handle(sleep=False)
        assert not woken.asleep and woken.kv_cache_bytes == awake.kv_cache_bytes
        assert woken.weight_bytes == awake.weight_bytes and woken.host_copy_bytes == 0
        after = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
        assert after == before
        if device == "cuda":  # the first wake captures on fixed addresses; later ones replay those very graphs
            assert core.runner.fixed_memory is not None and core.runner.cuda_graphs._graphs
            graphs = dict(core.runner.cuda_graphs._graphs)
            first_graphs = first_graphs or graphs
            assert all(graphs[shape] is first_graphs[shape] for shape in first_graphs)


def test_weights_move_in_the_order_fixed_memory_lays_them_out(tiny_model):
    """A wake copies tensor i of `_move_weights` into view i of the fixed region, laid out by `_unique_tensors`:
    both must walk the tensors alike, a tied embedding once."""
    from engine.sleep_rank import _move_weights, _unique_tensors

    llm = LLM(tiny_model("llama", tie_word_embeddings=True), device="cpu", kv_cache_memory_bytes=16 << 20)
    model = llm.core.runner.model
    expected = [t.data_ptr() for t in _unique_tensors(model)]
    seen = []
    _move_weights(model, lambda i, t: seen.append((i, t.data_ptr())) or t.clone())
    assert seen == list(enumerate(expected))
    assert len(_unique_tensors(model)) == len(expected)  # the clones replaced each tensor once


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
