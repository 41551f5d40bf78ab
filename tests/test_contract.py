"""The scheduler -> runner contract is plain data: every step's `SchedulerOutput` survives a msgpack round trip, and
a runner driven by the decoded copies (as a worker process would be) produces exactly what the in-process engine
produces, through preemptions, chunked prefill, async scheduling, n > 1, penalties and logprobs."""

import ast
import pathlib

import msgspec
import pytest
import torch

from engine import LLM, SamplingParams
from engine.contract import ModelRunnerOutput, SchedulerOutput

PROMPT = "The quick brown fox jumps over the lazy dog"
PROMPTS = [PROMPT * 3, PROMPT * 3 + " and", PROMPT * 2 + " again, then", PROMPT * 3 + " once more"]
# Cramped on purpose (16 blocks of 16 for four ~75-token prompts decoding 40 tokens): running requests are preempted
# and resume with a new block table; a 24-token budget chunks the prompts.
CRAMPED = {"num_kv_blocks": 16, "block_size": 16, "max_model_len": 128, "max_num_batched_tokens": 96}
PARAMS = [
    SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=3, prompt_logprobs=2),
    SamplingParams(temperature=1.0, top_p=0.8, top_k=40, seed=11, max_tokens=40, ignore_eos=True),
    SamplingParams(temperature=0.0, frequency_penalty=1.5, repetition_penalty=1.3, max_tokens=30, ignore_eos=True),
    SamplingParams(n=3, temperature=1.0, seed=5, max_tokens=30, ignore_eos=True, min_tokens=4,
                   logit_bias={7: 3.0}),
]


@pytest.fixture(scope="module")
def model_dir(tiny_model):
    return tiny_model("llama", max_position_embeddings=256)


def flat(outputs):
    result = []
    for output in outputs:
        result.append([(e.token_ids, e.rank) for e in output.prompt_logprobs or [] if e is not None])
        for completion in output.outputs:
            result.append((completion.token_ids, completion.finish_reason,
                           [(e.token_ids, e.rank) for e in completion.logprobs or []]))
    return result


def through_the_wire(llm: LLM, steps: list[SchedulerOutput], results: list[ModelRunnerOutput] | None = None) -> None:
    """Makes the runner execute msgpack-decoded copies of each step and return decoded copies of its results
    (recorded in `results` when given)."""
    execute = llm.core.runner.execute
    encoder = msgspec.msgpack.Encoder()

    def execute_decoded(scheduler_output: SchedulerOutput):
        wire = encoder.encode(scheduler_output)
        decoded = msgspec.msgpack.decode(wire, type=SchedulerOutput)
        assert decoded == scheduler_output
        steps.append(decoded)
        pending = execute(decoded)
        get = pending.get
        def get_decoded():
            output = get()
            decoded_output = msgspec.msgpack.decode(encoder.encode(output), type=ModelRunnerOutput)
            assert decoded_output == output
            if results is not None:
                results.append(decoded_output)
            return decoded_output

        pending.get = get_decoded
        return pending

    llm.core.runner.execute = execute_decoded


DEVICES = [pytest.param("cpu", id="cpu"), pytest.param("cuda", id="cuda", marks=[
    pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")])]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("async_scheduling", [False, True])
def test_runner_driven_by_decoded_steps_gives_identical_outputs(model_dir, async_scheduling, device):
    """On CUDA: Triton kernels, CUDA graphs for the decode steps and device-side pending tokens."""
    options = dict(dtype="float32", device=device, async_scheduling=async_scheduling, **CRAMPED)
    reference = LLM(model_dir, **options)
    wired = LLM(model_dir, **options)
    steps: list[SchedulerOutput] = []
    through_the_wire(wired, steps)
    for params in PARAMS:
        expected = reference.generate(PROMPTS, params, use_tqdm=False)
        assert flat(wired.generate(PROMPTS, params, use_tqdm=False)) == flat(expected)
    assert reference.core.stats().num_preemptions > 0  # the cramped cache did preempt
    assert wired.core.stats().num_preemptions == reference.core.stats().num_preemptions
    assert any(any(step.cached_requests.resumed) for step in steps)  # a preempted request came back as a diff
    # The runner forgot every request once it finished: the next step names the last ones.
    wired.generate([PROMPT], SamplingParams(max_tokens=1), use_tqdm=False)
    assert list(wired.core.runner.requests.states) == [str(len(PARAMS) * len(PROMPTS))]


@pytest.mark.parametrize("device", DEVICES)
def test_speculative_steps_cross_the_wire(model_dir, device):
    """Drafts (SchedulerOutput.spec_token_ids) and verification results (ModelRunnerOutput.spec_token_ids,
    spec_logprobs) survive msgpack, through preemptions, logprobs and seeded sampling."""
    spec = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 2}
    options = dict(dtype="float32", device=device, speculative_config=spec, **CRAMPED)
    reference = LLM(model_dir, **options)
    wired = LLM(model_dir, **options)
    steps: list[SchedulerOutput] = []
    results: list[ModelRunnerOutput] = []
    through_the_wire(wired, steps, results)
    for params in PARAMS[:2]:
        expected = reference.generate(PROMPTS, params, use_tqdm=False)
        assert flat(wired.generate(PROMPTS, params, use_tqdm=False)) == flat(expected)
    assert any(step.spec_token_ids for step in steps)
    assert any(any(result.spec_token_ids.values()) for result in results)  # some drafts were accepted
    assert any(any(result.spec_logprobs.values()) for result in results)
    assert wired.core.stats().spec_decoding == reference.core.stats().spec_decoding


def test_steps_after_the_first_send_only_diffs(model_dir):
    llm = LLM(model_dir, dtype="float32", device="cpu", async_scheduling=False)
    steps: list[SchedulerOutput] = []
    through_the_wire(llm, steps)
    llm.generate(PROMPTS[:2], SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True), use_tqdm=False)
    first, decodes = steps[0], steps[1:]
    assert [len(r.token_ids) for r in first.new_requests] == [
        r.num_computed_tokens + r.num_new_tokens for r in first.new_requests]  # prompts, less prefix-cache hits
    assert len(decodes) == 5
    for step in decodes:
        assert step.new_requests == []
        assert step.cached_requests.num_new_tokens == [1, 1]
        assert [len(ids) for ids in step.cached_requests.new_token_ids] == [1, 1]  # the token sampled last step
    llm.generate(PROMPTS[:1], SamplingParams(max_tokens=1), use_tqdm=False)
    assert sorted(steps[-1].finished_ids) == ["0", "1"]  # the first batch's requests are forgotten by the runner
    assert set(llm.core.runner.requests.states) == {"2"}


def test_runner_modules_never_import_the_schedulers_request():
    """The runner side of the contract, tensor-parallel workers included, holds no `Request` (it could not cross to
    a worker process)."""
    root = pathlib.Path(__file__).resolve().parent.parent / "engine"
    for name in ("runner.py", "input_batch.py", "cuda_graphs.py", "kv_memory.py", "sampler.py",
                 "distributed/worker.py", "distributed/tp_runner.py", "distributed/parallel_state.py"):
        tree = ast.parse((root / name).read_text())
        imported = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
        assert "engine.request" not in imported and "engine.scheduler" not in imported, name
