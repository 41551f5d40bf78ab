"""LoRA adapters with tensor parallelism on the CPU (gloo): two ranks, each holding its shard of every adapter, answer
as one rank with the same adapters (greedy tokens identical, logprobs within 1e-4) and as transformers + PEFT, for a
batch mixing two adapters and the base model with prefix caching on; adapters loaded, replaced and refused at run
time reach (or spare) the workers; and the served model takes an adapter through the admin API."""

import dataclasses

import pytest
from test_engine_equivalence import check_against_reference
from test_lora import GREEDY, MAX_RANK, PROMPTS, make_adapter, peft_reference
from test_tensor_parallel import assert_same

from engine import LLM

# attn: q/k/v (column, merged, with one KV head replicated on qwen2's two ranks) and o_proj (row-parallel);
# mlp: gate/up (merged column) and down_proj (row-parallel), rsLoRA.
ADAPTERS = {
    "attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
}
# qwen2 with one KV head: each rank keeps a replica of it, and of its LoRA B rows; q/k/v biases too.
FAMILIES = {"llama": {}, "qwen2": {"num_key_value_heads": 1}}
# The same prompts under each adapter and under none: the prefix cache must keep them apart; the second round of
# the same prompts reuses the first one's blocks.
CACHED = dataclasses.replace(GREEDY, prompt_logprobs=None)
WORKLOAD = [(i, name) for name in [*ADAPTERS, None] for i in (1, 3)]  # prompts of more than a block


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tiny_model, tmp_path_factory):
    base_dir = tiny_model(request.param, max_position_embeddings=128, **FAMILIES[request.param])
    folder = tmp_path_factory.mktemp(f"tp-adapters-{request.param}")
    adapters = {name: make_adapter(base_dir, folder / name, seed=i, **config)
                for i, (name, config) in enumerate(ADAPTERS.items())}
    return base_dir, adapters


def lora_llm(base_dir, adapters, tensor_parallel_size):
    llm = LLM(base_dir, dtype="float32", device="cpu", enable_lora=True, max_lora_rank=MAX_RANK, max_loras=2,
              tensor_parallel_size=tensor_parallel_size, block_size=8)
    for name, path in adapters.items():
        llm.add_lora(name, path)
    return llm


def generate(llm, workload=WORKLOAD, params=GREEDY):
    return llm.generate([PROMPTS[i] for i, _ in workload], params, use_tqdm=False,
                        lora_name=[name for _, name in workload])


def run(base_dir, adapters, tensor_parallel_size):
    llm = lora_llm(base_dir, adapters, tensor_parallel_size)
    try:
        # The second round from the prefix cache (prompt logprobs would compute the prompts again).
        outputs = [generate(llm), generate(llm, params=CACHED)]
        assert llm.core.stats().prefix_cache_hits > 0
        assert [o.outputs[0].token_ids for o in outputs[0]] == [o.outputs[0].token_ids for o in outputs[1]]
        return outputs
    finally:
        llm.shutdown()


def test_two_ranks_with_adapters_answer_as_one_rank_and_as_peft(setup):
    base_dir, adapters = setup
    single, double = run(base_dir, adapters, 1), run(base_dir, adapters, 2)
    assert_same(single, double)
    prompt_ids = {i: output.prompt_token_ids for output, (i, _) in zip(double[0], WORKLOAD)}
    references = {name: peft_reference(base_dir, adapters.get(name), [prompt_ids[1], prompt_ids[3]])
                  for name in [*ADAPTERS, None]}
    for output, (i, name) in zip(double[0], WORKLOAD):
        check_against_reference([output], [prompt_ids[i]], [references[name][(1, 3).index(i)]])
    # every adapter changes what it is asked, or the comparison would prove little
    tokens = {name: double[0][k].outputs[0].token_ids for k, (i, name) in enumerate(WORKLOAD) if i == 1}
    assert len({tuple(t) for t in tokens.values()}) == len(tokens)


def test_adapters_loaded_replaced_and_refused_at_run_time_reach_every_rank(setup, tmp_path):
    base_dir, adapters = setup
    single = lora_llm(base_dir, {"a": adapters["mlp"]}, 1)
    expected = generate(single, [(1, "a")])
    single.shutdown()
    llm = lora_llm(base_dir, {"a": adapters["attn"]}, 2)
    try:
        generate(llm, [(1, "a")])
        llm.add_lora("a", adapters["mlp"])  # a new version on every rank; the old one is freed on every rank
        assert [info.adapter_id for info in llm.core.list_loras()] == ["a@2"]
        assert llm.core.lora._versions.keys() == {"a@2"}
        with pytest.raises(ValueError, match="no adapter_config.json"):
            llm.add_lora("b", str(tmp_path))  # refused on rank 0: the workers never hear of it
        assert_same([expected], [generate(llm, [(1, "a")])])
    finally:
        llm.shutdown()
