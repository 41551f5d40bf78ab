"""Pipeline parallelism on the CPU (gloo): each stage's process holds its layers only, activations go point-to-point
from stage to stage, and the answers are the single-rank engine's (greedy tokens identical, logprobs within float32
rounding) and transformers' greedy tokens; the layer split is checked against the model before anything starts."""

import os
import signal
import threading
import time

import pytest
import torch
from transformers import AutoModelForCausalLM

pytest.register_assert_rewrite("helpers_server")
from helpers_server import model_config, run_server, server_config  # noqa: E402
from test_tensor_parallel import assert_same  # noqa: E402

from appliance.config import ConfigError, load_config  # noqa: E402
from engine import LLM, SamplingParams  # noqa: E402
from engine.config import EngineConfigError, pipeline_stage_layers  # noqa: E402
from engine.distributed.tp_runner import WorkerDiedError  # noqa: E402
from engine.kernels import cpu  # noqa: E402

pytest_plugins = ["helpers_server"]

PROMPTS = ["The quick brown fox jumps over the lazy dog", "Once upon a time", "1 2 3 4 5 6 7 8 9 10 11 12 13"]
NUM_NEW_TOKENS = 8
GREEDY = SamplingParams(temperature=0.0, max_tokens=NUM_NEW_TOKENS, ignore_eos=True, logprobs=2, prompt_logprobs=1)
SEEDED = SamplingParams(n=2, temperature=1.0, top_p=0.9, seed=7, max_tokens=6, ignore_eos=True)
# Three layers, so that two stages split them unevenly (2 + 1). qwen2 with one KV head (MQA); gemma2 ties its LM
# head to the embedding, which the last stage then loads into a head of its own.
FAMILIES = {"llama": {}, "qwen2": {"num_key_value_heads": 1}, "gemma2": {}}
# Blocks of 8 tokens, so that the prompts fill blocks whose prefix the second batch finds cached.
OPTIONS = {"dtype": "float32", "device": "cpu", "block_size": 8, "num_kv_blocks": 64, "max_model_len": 64}


def three_layers(tiny_model, family: str = "llama") -> str:
    return tiny_model(family, num_hidden_layers=3, **FAMILIES[family])


def generate(model_dir: str, **options) -> tuple[list, int]:
    """Each batch's outputs and the prefix-cache hits they had."""
    llm = LLM(model_dir, **{**OPTIONS, **options})
    try:
        outputs = [llm.generate(PROMPTS, params, use_tqdm=False) for params in (GREEDY, SEEDED)]
        return outputs, llm.core.stats().prefix_cache_hits
    finally:
        llm.shutdown()


def hf_greedy(model_dir: str, prompt_ids: list[list[int]]) -> list[list[int]]:
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, attn_implementation="eager").eval()
    results = []
    with torch.no_grad():
        for ids in map(list, prompt_ids):
            for _ in range(NUM_NEW_TOKENS):
                ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
            results.append(ids[-NUM_NEW_TOKENS:])
    return results


@pytest.mark.parametrize("family", FAMILIES)
def test_two_stages_answer_as_one_rank_and_as_transformers(tiny_model, family):
    model_dir = three_layers(tiny_model, family)
    expected, _ = generate(model_dir)
    actual, prefix_cache_hits = generate(model_dir, pipeline_parallel_size=2)
    assert_same(expected, actual)
    assert prefix_cache_hits > 0
    prompt_ids = [output.prompt_token_ids for output in actual[0]]
    assert [o.outputs[0].token_ids for o in actual[0]] == hf_greedy(model_dir, prompt_ids)


def test_two_stages_of_two_tensor_parallel_ranks(tiny_model):
    model_dir = three_layers(tiny_model)
    llm = LLM(model_dir, **OPTIONS, tensor_parallel_size=2, pipeline_parallel_size=2)
    try:
        assert len(llm.core.runner._workers) == 3
        actual = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert_same([generate(model_dir)[0][0]], [actual])


def test_a_layer_split_is_honoured_stage_by_stage(tiny_model):
    model_dir = three_layers(tiny_model)
    llm = LLM(model_dir, **OPTIONS, pipeline_parallel_size=2, pipeline_layer_split=[1, 2])
    try:
        names = [name for name, _ in llm.core.runner.model.named_parameters()]  # rank 0's: the first stage
        assert {int(name.split(".")[2]) for name in names if name.startswith("model.layers.")} == {0}
        assert {name for name in names if not name.startswith("model.layers.")} == {"model.embed_tokens.weight"}
        assert llm.core.runner.kv_memory.num_layers == 1  # KV cache for its own layer only
        actual = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert_same([generate(model_dir)[0][0]], [actual])


def test_stage_layers_follow_vllms_rule():
    assert pipeline_stage_layers(3, 2) == [range(0, 2), range(2, 3)]
    assert pipeline_stage_layers(5, 3) == [range(0, 2), range(2, 4), range(4, 5)]
    assert pipeline_stage_layers(4, 1) == [range(0, 4)]
    assert pipeline_stage_layers(3, 2, (1, 2)) == [range(0, 1), range(1, 3)]


@pytest.mark.parametrize(("options", "message"), [
    ({"pipeline_parallel_size": 4}, "pipeline_parallel_size: 4 stages for a model of 3 layers; every stage needs a "
                                    "layer, so at most 3"),
    ({"pipeline_parallel_size": 2, "pipeline_layer_split": [2, 2]},
     r"pipeline_layer_split: \[2, 2\] adds up to 4 layers; the model has 3"),
    ({"pipeline_parallel_size": 2, "pipeline_layer_split": [3]},
     r"pipeline_layer_split: must give 2 layer count\(s\) >= 1, one per pipeline stage, got \[3\]"),
    ({"pipeline_parallel_size": 2, "pipeline_layer_split": [3, 0]}, "pipeline_layer_split: must give 2"),
])
def test_a_split_the_model_cannot_take_is_refused_before_anything_starts(tiny_model, options, message):
    with pytest.raises(EngineConfigError, match=message):
        LLM(three_layers(tiny_model), **OPTIONS, **options)


@pytest.mark.parametrize(("parallelism", "key", "problem"), [
    ({"pipeline": 4}, "parallelism.pipeline", "4 stages for a model of 3 layers; every stage needs a layer, so at "
                                              "most 3"),
    ({"pipeline": 2, "pipeline_layer_split": [1, 1]}, "parallelism.pipeline_layer_split",
     "[1, 1] adds up to 2 layers; the model has 3"),
    ({"pipeline": 3, "pipeline_layer_split": [1, 2]}, "parallelism.pipeline_layer_split",
     "must give 3 layer count(s) >= 1, one per pipeline stage, got [1, 2]"),
])
def test_config_check_names_the_key_and_the_numbers(tiny_model, tmp_path, parallelism, key, problem):
    path = tmp_path / "kvbox.yaml"
    path.write_text(f"models:\n  - {{name: m, source: {three_layers(tiny_model)}, parallelism: {parallelism}}}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: models[0].{key}: {problem}"


def test_a_stage_worker_killed_mid_step_fails_the_engine_within_seconds(tiny_model):
    llm = LLM(three_layers(tiny_model), **OPTIONS, pipeline_parallel_size=2)
    try:
        worker = llm.core.runner._workers[0]
        # Stopped, the last stage cannot take the step; killed a second later, its connections close.
        os.kill(worker.pid, signal.SIGSTOP)
        threading.Timer(1.0, os.kill, (worker.pid, signal.SIGKILL)).start()
        start = time.monotonic()
        with pytest.raises(WorkerDiedError, match=r"rank 1 \(code -9\)"):
            llm.generate(PROMPTS[0], GREEDY, use_tqdm=False)
        assert time.monotonic() - start < 10
    finally:
        llm.shutdown()


@pytest.mark.parametrize(("timeout_s", "fails"), [(1.0, True), (10.0, False)])
def test_a_slow_stage_is_waited_for_up_to_the_collective_timeout(tiny_model, monkeypatch, timeout_s, fails):
    """The last stage waits for the first's activations as long as `collective_timeout_s` (served:
    server.engine_hang_timeout_s) says; it was a fixed minute, shorter than a big model's step on the CPU."""
    llm = LLM(three_layers(tiny_model), **OPTIONS, pipeline_parallel_size=2, collective_timeout_s=timeout_s)
    try:
        first_stage = llm.core.runner.local.execute

        def slow(scheduler_output):
            time.sleep(2.0)
            return first_stage(scheduler_output)

        monkeypatch.setattr(llm.core.runner.local, "execute", slow)
        params = SamplingParams(temperature=0.0, max_tokens=2, ignore_eos=True)
        if fails:
            with pytest.raises(WorkerDiedError, match=r"rank 1 \(code 1\)"):
                llm.generate(PROMPTS[0], params, use_tqdm=False)
        else:
            assert len(llm.generate(PROMPTS[0], params, use_tqdm=False)[0].outputs[0].token_ids) == 2
    finally:
        llm.shutdown()


def test_served_with_two_pipeline_stages(tiny_model, tmp_path):
    model_dir = three_layers(tiny_model)
    expected = generate(model_dir)[0][0]
    config = server_config([model_config("llama", model_dir, parallelism={"pipeline": 2})])
    with run_server(config, tmp_path) as server:
        completion = server.client().completions.create(model="llama", prompt=PROMPTS, max_tokens=NUM_NEW_TOKENS,
                                                        temperature=0, extra_body={"ignore_eos": True})
    assert [c.text for c in sorted(completion.choices, key=lambda c: c.index)] == [
        o.outputs[0].text for o in expected]


def test_speculative_decoding_across_stages(tiny_model):
    """Drafts go to every stage with the step; the last stage verifies them and rank 0 gets the accepted ones."""
    model_dir = three_layers(tiny_model)
    prompts = [[100, 101, 102, 103] * 8, [7, 8, 9] * 5 + [40]]
    params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True, logprobs=1)
    options = {**OPTIONS, "speculative_config": {"num_speculative_tokens": 3, "prompt_lookup_min": 1}}
    expected = LLM(model_dir, **OPTIONS).generate(prompts, params, use_tqdm=False)
    llm = LLM(model_dir, **options, pipeline_parallel_size=2)
    try:
        actual = llm.generate(prompts, params, use_tqdm=False)
        assert llm.core.stats().spec_decoding.num_accepted_tokens > 0
    finally:
        llm.shutdown()
    assert_same([expected], [actual])


@pytest.mark.parametrize("tensor_parallel_size", [1, 2])
def test_cuda_stages_over_nccl_answer_as_one_gpu(tiny_model, tensor_parallel_size):
    """The same on GPUs: activations over NCCL, results back over the gloo control group."""
    if torch.cuda.device_count() < 2 * tensor_parallel_size:
        pytest.skip(f"needs {2 * tensor_parallel_size} CUDA devices")
    model_dir = three_layers(tiny_model)
    options = {**OPTIONS, "device": "cuda"}
    expected = LLM(model_dir, **options).generate(PROMPTS, GREEDY, use_tqdm=False)
    llm = LLM(model_dir, **options, pipeline_parallel_size=2, tensor_parallel_size=tensor_parallel_size)
    try:
        actual = llm.generate(PROMPTS, GREEDY, use_tqdm=False)
    finally:
        llm.shutdown()
    assert_same([expected], [actual])


def test_a_stage_reads_only_its_own_tensors_and_ties_its_head(tiny_model, monkeypatch):
    """The last stage of a tied model (gemma2) reads its layer, the final norm and the embedding, which becomes its
    LM head; no other tensor of the checkpoint is read."""
    from safetensors.torch import load_file

    from engine.distributed.pipeline import PipelineStage
    from engine.models import loader
    from engine.models.config import ModelConfig

    model_dir = three_layers(tiny_model, "gemma2")
    read = []

    def recording(path, keep=None):
        for name, tensor in real_iter(path, keep):
            read.append(name)
            yield name, tensor

    real_iter = loader.iter_safetensors
    monkeypatch.setattr(loader, "iter_safetensors", recording)
    model_config = ModelConfig.from_pretrained(model_dir, dtype="float32")
    model = loader.load_model(model_config, model_dir, torch.device("cpu"), stage=PipelineStage(range(2, 3), 1, 2))
    assert read and {name.split(".")[2] for name in read if name.startswith("model.layers.")} == {"2"}
    assert {name for name in read if not name.startswith("model.layers.")} == {"model.embed_tokens.weight",
                                                                               "model.norm.weight"}
    checkpoint = load_file(f"{model_dir}/model.safetensors")
    # this stage has no embedding to share the head with, so the head holds the only copy, packed for the CPU
    assert torch.equal(cpu.unpacked(model.lm_head.weight), checkpoint["model.embed_tokens.weight"])
    assert not hasattr(model.model, "embed_tokens")


class _Stage:
    """A middle stage that records its transfers (PipelineStage's receive/send, without a process group)."""

    is_first = is_last = False

    def __init__(self):
        self.events = []

    def receive(self, num_tokens):
        self.events.append(("receive", num_tokens))

    def send(self, hidden, residual):
        self.events.append(("send", hidden, residual))


@pytest.mark.parametrize("graphed", [False, True], ids=["eager", "graph"])
def test_a_stage_receives_before_its_forward_and_sends_its_rows_after(graphed):
    """The runner's side of graphs with pipeline stages: the transfers stay outside the forward, only the step's
    rows (a verify graph's padded rows included) go on, and a graph's output buffers are copied first (the next
    replay would overwrite them while the next stage still reads them)."""
    from types import SimpleNamespace

    from engine.runner import ModelRunner

    stage, padded = _Stage(), 8  # the graph computed 8 rows for a step of 5
    buffers = (torch.randn(padded, 4), torch.randn(padded, 4))

    def forward(num_tokens, metadata):
        stage.events.append(("forward", num_tokens))
        return tuple(b[:num_tokens].clone() for b in buffers)

    def replay(shape):
        stage.events.append(("replay", shape))
        return buffers

    runner = SimpleNamespace(stage=stage, _forward=forward, cuda_graphs=SimpleNamespace(replay=replay))
    # A verify graph pads each sequence to 1 + k rows after its own tokens: 2 sequences x 3 rows hold 5 tokens.
    rows = 6 if graphed else 5
    out = ModelRunner._stage_forward(runner, 5, None, "shape" if graphed else None, rows)
    kinds = [event[0] for event in stage.events]
    assert kinds == ["receive", "replay" if graphed else "forward", "send"] and stage.events[0][1] == rows
    sent = stage.events[2][1:]
    for tensor, whole in zip(sent, out):
        assert tensor.shape == (rows, 4) and torch.equal(tensor, whole[:rows])
        # Graphed: copies, not views of the graph's buffers; eager: the forward's own fresh tensors, not copied.
        assert (tensor.data_ptr() != whole.data_ptr()) == graphed
