"""Multi-LoRA serving against transformers + PEFT, on the tiny checkpoints and adapters that PEFT itself writes.

Greedy tokens identical and logprobs within 1e-4 in float32 for one batch mixing three adapters (different ranks,
merged q/k/v and gate/up targets, partial ones, rsLoRA) with the base model; the same with more adapters than GPU
slots; replacing an adapter under its name (running requests keep the old one, no prefix reuse across versions);
removal; refusals of bad adapters that leave the engine as it was; the scheduler's adapter limit.
"""

from collections import defaultdict

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from test_engine_equivalence import check_against_reference
from test_scheduler import make_request, make_scheduler, run_step
from transformers import AutoModelForCausalLM

from engine import LLM, InvalidParameterError, SamplingParams
from engine.lora.layers import LoraLinear

NUM_NEW_TOKENS = 6
PROMPTS = [
    "Hello",
    "The quick brown fox jumps over the lazy dog, and then",
    "def fibonacci(n):\n    return n if n < 2 else fibonacci(n - 1)",
    "Once upon a time, in a small village by the sea",
]
# name -> PEFT LoraConfig arguments: q/k/v slices of the merged qkv_proj; gate/up/down with rsLoRA; the largest
# rank on parts of both merged layers (q and v, up only).
ADAPTERS = {
    "attn": dict(r=8, lora_alpha=16, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "mlp": dict(r=4, lora_alpha=8, target_modules=["gate_proj", "up_proj", "down_proj"], use_rslora=True),
    "mixed": dict(r=16, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"]),
    "extra": dict(r=2, lora_alpha=4, target_modules=["o_proj", "gate_proj"]),
}
# More requests than slots: the four adapters and the base model in turn, three rounds, so that evicted adapters
# come back.
SWAP_WORKLOAD = [(i, [*ADAPTERS, None][(i + k) % (len(ADAPTERS) + 1)]) for k in range(3) for i in range(len(PROMPTS))]
MAX_RANK = 16
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=2, prompt_logprobs=1)


def make_adapter(base_dir, out_dir, seed=0, **lora_config):
    """A PEFT adapter whose B matrices are random (PEFT starts them at zero, which would test nothing)."""
    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32),
                           LoraConfig(**lora_config))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.3)
    model.save_pretrained(out_dir)
    return str(out_dir)


def peft_reference(base_dir, adapter_dir, prompt_ids_list):
    """Greedy continuation and the logprob of every token after the first, from transformers (+ PEFT)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32, attn_implementation="eager")
    if adapter_dir is not None:
        model = PeftModel.from_pretrained(model, adapter_dir)
    results = []
    with torch.no_grad():
        for prompt_ids in prompt_ids_list:
            ids = list(prompt_ids)
            for _ in range(NUM_NEW_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            logprobs = torch.log_softmax(model(torch.tensor([ids])).logits[0].float(), dim=-1)
            results.append((ids[len(prompt_ids):], [float(logprobs[p, ids[p + 1]]) for p in range(len(ids) - 1)]))
    return results


@pytest.fixture(scope="module")
def family_setup(tiny_model, tmp_path_factory):
    """family -> (base folder, adapter folders by name, prompt ids, PEFT references by adapter name), built once."""
    built = {}

    def get(family):
        if family not in built:
            base_dir = tiny_model(family, max_position_embeddings=128)
            folder = tmp_path_factory.mktemp(f"adapters-{family}")
            adapters = {name: make_adapter(base_dir, folder / name, seed=i, **config)
                        for i, (name, config) in enumerate(ADAPTERS.items())}
            prompt_ids = [LLM(base_dir, dtype="float32", device="cpu").tokenizer.encode(p) for p in PROMPTS]
            references = {name: peft_reference(base_dir, adapters.get(name), prompt_ids) for name in [*ADAPTERS, None]}
            built[family] = base_dir, adapters, prompt_ids, references
        return built[family]

    return get


@pytest.fixture(scope="module", params=["llama", "qwen2"])  # qwen2: a q/k/v bias under the adapters
def setup(request, family_setup):
    return family_setup(request.param)


@pytest.fixture(scope="module")
def llama_setup(family_setup):
    return family_setup("llama")


def lora_llm(base_dir, adapters, **options):
    llm = LLM(base_dir, dtype="float32", device="cpu", enable_lora=True, max_lora_rank=MAX_RANK, **options)
    for name, path in adapters.items():
        llm.add_lora(name, path)
    return llm


def check_workload(llm, workload, prompt_ids, references):
    """workload: (prompt index, adapter name or None) pairs, all in one generate call."""
    outputs = llm.generate([prompt_ids[i] for i, _ in workload], GREEDY, use_tqdm=False,
                           lora_name=[name for _, name in workload])
    for output, (i, name) in zip(outputs, workload):
        check_against_reference([output], [prompt_ids[i]], [references[name][i]])


def test_one_batch_mixes_three_adapters_and_the_base_model(setup):
    base_dir, adapters, prompt_ids, references = setup
    for name in ADAPTERS:  # each adapter changes every greedy continuation, or the comparison would prove little
        assert all(tokens != base_tokens for (tokens, _), (base_tokens, _) in zip(references[name], references[None]))
    used = ["attn", "mlp", "mixed"]
    llm = lora_llm(base_dir, {name: adapters[name] for name in used})
    check_workload(llm, [(0, "attn"), (1, "mlp"), (2, "mixed"), (3, None)], prompt_ids, references)
    assert llm.core.num_steps == NUM_NEW_TOKENS  # the first step ran all four prompts in one forward
    infos = {info.name: info for info in llm.core.list_loras()}
    assert sorted(infos) == sorted(used)
    assert [infos[name].rank for name in used] == [8, 4, 16]
    assert all(info.num_requests == 1 and info.slot is not None and info.num_slot_loads == 1 for info in infos.values())
    assert infos["attn"].num_tokens == len(prompt_ids[0]) + NUM_NEW_TOKENS - 1


@pytest.mark.parametrize("async_scheduling", [False, True], ids=["sync", "async"])
def test_more_adapters_than_slots_swap_by_least_recent_use(setup, async_scheduling):
    base_dir, adapters, prompt_ids, references = setup
    llm = lora_llm(base_dir, adapters, max_loras=2, max_cpu_loras=4, async_scheduling=async_scheduling)
    check_workload(llm, SWAP_WORKLOAD, prompt_ids, references)
    infos = llm.core.list_loras()
    assert sum(1 for info in infos if info.slot is not None) == 2
    assert sum(info.num_slot_loads for info in infos) > len(ADAPTERS)  # evicted adapters came back
    with pytest.raises(ValueError, match="max_cpu_loras"):
        llm.add_lora("fifth", adapters["attn"])
    assert [info.name for info in llm.core.list_loras()] == list(ADAPTERS)


def step(core, outputs, until_idle=False):
    """Steps the core once (or until it is idle), collecting each request's tokens and cache hits in `outputs`."""
    while True:
        for output in core.step():
            outputs[output.request_id]["tokens"] += output.new_token_ids
            outputs[output.request_id]["cached"] = output.num_cached_tokens
        if not (until_idle and core.has_unfinished_requests()):
            return


def test_replacing_an_adapter_keeps_running_requests_on_the_old_version(setup):
    base_dir, adapters, prompt_ids, references = setup
    llm = lora_llm(base_dir, {"x": adapters["attn"]}, block_size=8)
    core, prompt = llm.core, prompt_ids[3]
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = defaultdict(lambda: {"tokens": [], "cached": 0})
    core.add_request("old", prompt, params, lora_name="x")
    step(core, outputs)  # its prompt is computed and its blocks are in the prefix cache
    old_id = core.list_loras()[0].adapter_id
    core.add_lora("x", adapters["mlp"])
    new_id = core.list_loras()[0].adapter_id
    assert new_id != old_id and core.lora.has_retired
    core.add_request("new", prompt, params, lora_name="x")
    step(core, outputs, until_idle=True)
    core.add_request("again", prompt, params, lora_name="x")
    step(core, outputs, until_idle=True)
    assert outputs["old"]["tokens"] == references["attn"][3][0]
    assert outputs["new"]["tokens"] == outputs["again"]["tokens"] == references["mlp"][3][0]
    assert outputs["new"]["cached"] == 0  # the old version's blocks hold the same prompt, but not its K/V
    assert outputs["again"]["cached"] >= 8  # within one version the prefix cache works
    assert not core.lora.has_retired  # the old version went with its last request


def test_removed_adapter_serves_its_running_requests_then_goes(setup):
    base_dir, adapters, prompt_ids, references = setup
    llm = lora_llm(base_dir, {"x": adapters["mixed"], "y": adapters["mlp"]})
    core = llm.core
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True)
    outputs = defaultdict(lambda: {"tokens": [], "cached": 0})
    core.add_request("r", prompt_ids[1], params, lora_name="x")
    step(core, outputs)
    core.remove_lora("x")
    assert [info.name for info in core.list_loras()] == ["y"]
    with pytest.raises(InvalidParameterError, match="unknown LoRA adapter 'x'") as error:
        core.add_request("s", prompt_ids[1], params, lora_name="x")
    assert error.value.param == "model"
    step(core, outputs, until_idle=True)
    assert outputs["r"]["tokens"] == references["mixed"][1][0]
    assert not core.lora.has_retired
    with pytest.raises(ValueError, match="no LoRA adapter named 'x'"):
        core.remove_lora("x")


def rewrite_tensors(adapter_dir, change):
    path = adapter_dir / "adapter_model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _widen_a(tensors):  # an adapter trained on a base with a larger hidden size
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    tensors[name] = torch.randn(tensors[name].shape[0], 2 * tensors[name].shape[1])


def _drop_one_b(tensors):
    del tensors["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"]


def _poison(tensors):
    tensors["base_model.model.model.layers.0.mlp.down_proj.lora_B.weight"][0, 0] = float("nan")


def _truncate(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    path.write_bytes(path.read_bytes()[:path.stat().st_size // 2])


def _pickled_only(adapter_dir):
    path = adapter_dir / "adapter_model.safetensors"
    torch.save(load_file(path), adapter_dir / "adapter_model.bin")
    path.unlink()


def _dora(adapter_dir):
    path = adapter_dir / "adapter_config.json"
    path.write_text(path.read_text().replace('"use_dora": false', '"use_dora": true'))


# case -> (PEFT config, how to spoil the saved folder, the error it must raise)
BAD_ADAPTERS = {
    "rank_above_max": (dict(r=32, lora_alpha=32, target_modules=["q_proj"]), None, "above this engine's max_lora_rank"),
    "unknown_target": (dict(r=4, lora_alpha=8, target_modules=["q_proj", "lm_head"]), None,
                       "unknown target module.*lm_head"),
    "wrong_hidden_size": (ADAPTERS["attn"], lambda d: rewrite_tensors(d, _widen_a), r"has shape \[8, 128\]"),
    "missing_b": (ADAPTERS["mixed"], lambda d: rewrite_tensors(d, _drop_one_b), "has lora_A but no lora_B"),
    "non_finite": (ADAPTERS["mlp"], lambda d: rewrite_tensors(d, _poison), "finite"),
    "corrupt_safetensors": (ADAPTERS["attn"], _truncate, "cannot read adapter_model.safetensors"),
    "bin_only": (ADAPTERS["attn"], _pickled_only, "only pickled weights"),
    "dora": (ADAPTERS["attn"], _dora, "use_dora"),
}


@pytest.mark.parametrize("case", BAD_ADAPTERS)
def test_bad_adapters_are_refused_and_change_nothing(llama_setup, tmp_path, case):
    base_dir, adapters, prompt_ids, references = llama_setup
    config, spoil, message = BAD_ADAPTERS[case]
    bad = make_adapter(base_dir, tmp_path / case, **config)
    if spoil is not None:
        spoil(tmp_path / case)
    llm = lora_llm(base_dir, {"attn": adapters["attn"]})
    before = llm.core.list_loras()
    for name in ("attn", "new"):  # replacing an adapter, and adding one
        with pytest.raises(ValueError, match=message):
            llm.add_lora(name, bad)
        assert llm.core.list_loras() == before
    check_workload(llm, [(1, "attn"), (2, None)], prompt_ids, references)


def test_without_lora_the_model_is_untouched_and_adapters_are_refused(llama_setup):
    base_dir, adapters, prompt_ids, _ = llama_setup
    llm = LLM(base_dir, dtype="float32", device="cpu")
    assert not any(isinstance(m, LoraLinear) for m in llm.core.runner.model.modules())
    with pytest.raises(ValueError, match="enable_lora"):
        llm.add_lora("x", adapters["attn"])
    with pytest.raises(InvalidParameterError, match="LoRA is not enabled"):
        llm.generate([prompt_ids[0]], GREEDY, use_tqdm=False, lora_name="x")


def test_scheduler_runs_at_most_max_loras_adapters():
    s = make_scheduler(enable_lora=True, max_loras=2)
    for request_id, adapter in [("a", "A@1"), ("b", "B@1"), ("c", "C@1"), ("base", None), ("b2", "B@1")]:
        request = make_request(request_id, 4, max_tokens=2 if request_id == "a" else 4, first_token=ord(request_id[0]))
        request.adapter_id = adapter
        s.add_request(request)
    out, _ = run_step(s)
    # c's adapter finds no slot: it waits, and first come first served holds back those behind it too
    assert out.req_ids() == ["a", "b"]
    run_step(s)  # a finishes, freeing its adapter's slot
    out, _ = run_step(s)
    assert out.req_ids() == ["b", "c", "base", "b2"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_triton_kernels_and_cuda_graphs_match_peft(llama_setup):
    """The Triton kernel inside the engine, decode steps replayed from CUDA graphs while adapters swap in and out of
    two slots between replays. float32: tokens identical, logprobs as close as the GPU engine test allows."""
    base_dir, adapters, prompt_ids, references = llama_setup
    llm = LLM(base_dir, dtype="float32", device="cuda", kernel_backend="triton", enable_lora=True, max_loras=2,
              max_cpu_loras=4, max_num_seqs=8, kv_cache_memory_bytes=256 << 20)
    for name, path in adapters.items():
        llm.add_lora(name, path)
    assert llm.core.runner.use_cuda_graphs
    params = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=0)
    outputs = llm.generate([prompt_ids[i] for i, _ in SWAP_WORKLOAD], params, use_tqdm=False,
                           lora_name=[name for _, name in SWAP_WORKLOAD])
    for output, (i, name) in zip(outputs, SWAP_WORKLOAD):
        ref_tokens, ref_logprobs = references[name][i]
        assert output.outputs[0].token_ids == ref_tokens
        sampled = [entry.logprobs[0] for entry in output.outputs[0].logprobs]
        assert sampled == pytest.approx(ref_logprobs[len(prompt_ids[i]) - 1:], abs=2e-3)
    assert sum(info.num_slot_loads for info in llm.core.list_loras()) > len(ADAPTERS)


def test_stats_name_the_adapters_of_running_and_waiting_requests(setup):
    base_dir, adapters, prompt_ids, _ = setup
    llm = lora_llm(base_dir, {name: adapters[name] for name in ("attn", "mlp")}, max_loras=1)
    core = llm.core
    core.add_request("a", prompt_ids[0], GREEDY, lora_name="attn")
    core.add_request("b", prompt_ids[1], GREEDY, lora_name="mlp")  # one GPU slot: waits for "attn" to finish
    core.add_request("c", prompt_ids[2], GREEDY)
    core.step()
    stats = core.stats()
    assert (stats.running_loras, stats.waiting_loras) == (["attn"], ["mlp"])
    while core.has_unfinished_requests():
        core.step()
    stats = core.stats()
    assert (stats.running_loras, stats.waiting_loras) == ([], [])
