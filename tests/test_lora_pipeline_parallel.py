"""LoRA adapters with pipeline stages on the CPU (gloo): each stage keeps the adapter weights of its own layers, and
two stages answer as one rank with the same adapters (greedy tokens identical, logprobs within float32 rounding) and
as transformers + PEFT, for a batch mixing two adapters and the base model with prefix caching on. Rank 0 holds the
first stage only, yet it checks the whole adapter (a later stage's tensors against a twin layer of its own), so a
bad tensor in another stage's layer is refused before any worker hears of the adapter."""

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_engine_equivalence import check_against_reference
from test_lora import GREEDY, MAX_RANK, PROMPTS, make_adapter, peft_reference
from test_tensor_parallel import assert_same

from engine import LLM

ADAPTERS = {
    "attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    # PEFT's layers_to_transform: only the last layer, which the second stage holds; rank 0 keeps nothing of it.
    "mlp-last": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True,
                     layers_to_transform=[2]),
}
WORKLOAD = [(i, name) for name in [*ADAPTERS, None] for i in (1, 3)]


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    base_dir = tiny_model("llama", num_hidden_layers=3, max_position_embeddings=128)  # stages of 2 + 1 layers
    folder = tmp_path_factory.mktemp("pp-adapters")
    return base_dir, {name: make_adapter(base_dir, folder / name, seed=i, **config)
                      for i, (name, config) in enumerate(ADAPTERS.items())}


def lora_llm(base_dir, adapters, pipeline_parallel_size, tensor_parallel_size=1):
    llm = LLM(base_dir, dtype="float32", device="cpu", enable_lora=True, max_lora_rank=MAX_RANK, max_loras=2,
              pipeline_parallel_size=pipeline_parallel_size, tensor_parallel_size=tensor_parallel_size, block_size=8,
              num_kv_blocks=64)
    for name, path in adapters.items():
        llm.add_lora(name, path)
    return llm


def generate(llm, workload=WORKLOAD):
    return llm.generate([PROMPTS[i] for i, _ in workload], GREEDY, use_tqdm=False,
                        lora_name=[name for _, name in workload])


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_two_stages_with_adapters_answer_as_one_rank_and_as_peft(setup, tensor_parallel_size):
    """Two stages, each of one rank or of two tensor-parallel ranks (four processes, each adapter cut both ways)."""
    base_dir, adapters = setup
    results = []
    for stages in (1, 2):
        llm = lora_llm(base_dir, adapters, stages, tensor_parallel_size if stages == 2 else 1)
        try:
            results.append(generate(llm))
            if stages == 2:  # the first stage holds layers 0 and 1: nothing of the last-layer adapter
                held = {name: sorted(v.adapter.weights) for name, v in llm.core.runner.lora._current.items()}
                assert held["mlp-last"] == [] and {n.split(".")[2] for n in held["attn"]} == {"0", "1"}
        finally:
            llm.shutdown()
    single, staged = results
    assert_same([single], [staged])
    prompt_ids = {i: output.prompt_token_ids for output, (i, _) in zip(staged, WORKLOAD)}
    for name in [*ADAPTERS, None]:
        reference = peft_reference(base_dir, adapters.get(name), [prompt_ids[1], prompt_ids[3]])
        for output, (i, used) in zip(staged, WORKLOAD):
            if used == name:
                check_against_reference([output], [prompt_ids[i]], [reference[(1, 3).index(i)]])
    tokens = {name: staged[k].outputs[0].token_ids for k, (i, name) in enumerate(WORKLOAD) if i == 1}
    assert len({tuple(t) for t in tokens.values()}) == len(tokens)  # each adapter changes what it is asked


def test_a_bad_tensor_in_a_later_stage_is_refused_by_rank_0(setup, tmp_path):
    base_dir, adapters = setup
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "adapter_config.json").write_text((Path(adapters["attn"]) / "adapter_config.json").read_text())
    tensors = load_file(Path(adapters["attn"]) / "adapter_model.safetensors")
    name = "base_model.model.model.layers.2.self_attn.q_proj.lora_A.weight"
    tensors[name] = torch.zeros(tensors[name].shape[0], tensors[name].shape[1] + 1)
    save_file(tensors, bad / "adapter_model.safetensors", metadata={"format": "pt"})
    llm = lora_llm(base_dir, {}, 2)
    try:
        with pytest.raises(ValueError, match=r"layers\.2\.self_attn\.q_proj\.lora_A\.weight' has shape"):
            llm.add_lora("bad", str(bad))
        assert llm.core.list_loras() == []
        llm.add_lora("attn", adapters["attn"])  # the workers go on serving
        assert generate(llm, [(1, "attn")])[0].outputs[0].token_ids
    finally:
        llm.shutdown()
