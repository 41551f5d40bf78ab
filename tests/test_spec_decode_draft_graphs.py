"""CUDA graphs of a draft model's single-token forwards (each of its k draws, and a step's first forward when every
row computes one known token): on the CPU, with the stand-in that runs the padded forward eagerly where a graph
would replay, the same drafts and outputs as the eager draft path, padded batches (fewer drafting sequences than
the bucket) included; on CUDA the same drafts and tokens with graphs on and off, and across level-1 sleeps."""

import pytest
import torch

from engine import LLM
from engine.cuda_graphs import CudaGraphs, GraphShape
from engine.input_batch import BatchRow
from engine.sampling_params import SamplingParams
from engine.sleep import EngineSleep
from tests.test_spec_decode import OPTIONS, PARAMS, PROMPTS, flat
from tests.test_spec_decode_draft import draft_of
from tests.test_spec_decode_graphs import EagerGraphs

# Greedy with logprobs, a seeded sampling request (its drafts are drawn from q, which verification uses) and n = 2.
MIXED_PARAMS = [PARAMS[0], SamplingParams(temperature=0.8, top_k=20, seed=7, max_tokens=20, ignore_eos=True),
                PARAMS[2]]


def drafts_recorded(draft_model) -> list[list[tuple[str, list[int]]]]:
    """Each step's drafts, per drafting request, as the draft model draws them from now on."""
    steps, draft = [], draft_model.draft

    def recording(rows):
        q = draft(rows)
        steps.append([(row.state.req_id, list(row.state.spec_token_ids)) for row in rows if row.state.spec_token_ids])
        return q

    draft_model.draft = recording
    return steps


def drafts_only(steps: list[list[tuple[str, list[int]]]]) -> list[list[list[int]]]:
    return [[drafts for _, drafts in step] for step in steps]


def num_draws(steps: list[list[tuple[str, list[int]]]]) -> int:
    """The draft model's sequential single-token forwards: one per draft position of each step's longest run."""
    return sum(max(len(drafts) for _, drafts in step) for step in steps if step)


def test_draft_model_steps_replay_decode_graphs(tiny_model):
    model_dir = tiny_model("llama", max_position_embeddings=256)
    spec = {"model": draft_of(tiny_model, "llama"), "num_speculative_tokens": 3}
    eager = LLM(model_dir, speculative_config=spec, **OPTIONS)
    eager_drafts = drafts_recorded(eager.core.runner.draft_model)
    expected = eager.generate(PROMPTS, MIXED_PARAMS, use_tqdm=False)
    llm = LLM(model_dir, speculative_config=spec, **OPTIONS)
    runner, draft = llm.core.runner, llm.core.runner.draft_model
    EagerGraphs.install(runner)
    graphs = EagerGraphs.install(draft)
    runner.use_cuda_graphs = True
    runner.capture_cuda_graphs()
    drafted = drafts_recorded(draft)
    assert flat(llm.generate(PROMPTS, MIXED_PARAMS, use_tqdm=False)) == flat(expected)
    assert drafted == eager_drafts and num_draws(drafted) > 10
    # Every forward of single-token rows replayed a decode graph, the draws and most first forwards; prefill
    # chunks ran eagerly.
    assert all((shape is not None) == (set(counts) == {1}) for counts, shape in graphs.steps)
    assert all(shape.query_len == 1 for shape in graphs.replayed)
    assert len(graphs.replayed) == sum(shape is not None for _, shape in graphs.steps) >= num_draws(drafted)
    assert any(len(counts) == 3 and shape == GraphShape(4, 1) for counts, shape in graphs.steps)  # one dummy
    # Released with the target's (a sleep that does not keep them): no graph reads the freed cache.
    runner.release_cuda_graphs()
    assert graphs.bucket(1, [BatchRow([5], 9, 1, [0])]) is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("k", [1, 3])
def test_cuda_graphs_replay_the_draft_models_steps_with_the_same_drafts(tiny_model, monkeypatch, k):
    model_dir = tiny_model("llama", max_position_embeddings=256)
    spec = {"model": draft_of(tiny_model, "llama"), "num_speculative_tokens": k}
    # A fixed cache: engines sized by the GPU's free memory would leave the second (and its draft) none.
    options = {**OPTIONS, "device": "cuda", "num_kv_blocks": 256}
    eager = LLM(model_dir, speculative_config=spec, cuda_graphs=False, **options)
    eager_drafts = drafts_recorded(eager.core.runner.draft_model)
    expected = eager.generate(PROMPTS, MIXED_PARAMS, use_tqdm=False)
    replayed = []
    replay = CudaGraphs.replay
    monkeypatch.setattr(CudaGraphs, "replay", lambda self, shape: replayed.append((self, shape)) or replay(self, shape))
    graphed = LLM(model_dir, speculative_config=spec, cuda_graphs=True, **options)
    draft = graphed.core.runner.draft_model
    drafted = drafts_recorded(draft)
    outputs = graphed.generate(PROMPTS, MIXED_PARAMS, use_tqdm=False)
    assert [c.token_ids for o in outputs for c in o.outputs] == [c.token_ids for o in expected for c in o.outputs]
    assert drafted == eager_drafts
    draft_replays = [shape for graphs, shape in replayed if graphs is draft.cuda_graphs]
    assert len(draft_replays) >= num_draws(drafted) > 10 and all(shape.query_len == 1 for shape in draft_replays)
    assert any(shape.query_len == 1 + k for graphs, shape in replayed if graphs is graphed.core.runner.cuda_graphs)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_draft_graphs_follow_the_targets_across_level_1_sleeps(tiny_model):
    """The draft's weights stay on the device while the engine sleeps, but its cache is freed and placed again with
    the target's (in the fixed-address region from the first wake on): its graphs are captured again on the first
    wake and kept from then on, like the target's, and draw the same drafts."""
    spec = {"model": draft_of(tiny_model, "llama"), "num_speculative_tokens": 3}
    llm = LLM(tiny_model("llama", max_position_embeddings=256), device="cuda", dtype="bfloat16",
              kernel_backend="triton", kv_cache_memory_bytes=64 << 20, max_num_seqs=4, speculative_config=spec)
    draft, sleeper = llm.core.runner.draft_model, EngineSleep(llm.core)
    params = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
    drafted = drafts_recorded(draft)
    before = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)]
    first_drafts, first_graphs = list(drafted), None
    assert draft.cuda_graphs._graphs and num_draws(first_drafts) > 5
    for cycle in range(3):
        assert not sleeper.handle(sleep=True).error
        assert not sleeper.handle(sleep=False).error
        drafted.clear()
        assert [o.outputs[0].token_ids for o in llm.generate(PROMPTS, params, use_tqdm=False)] == before
        assert drafts_only(drafted) == drafts_only(first_drafts)  # request ids count on across generate calls
        graphs = dict(draft.cuda_graphs._graphs)
        assert graphs and llm.core.runner.fixed_memory is not None
        first_graphs = first_graphs or graphs
        assert all(graphs[shape] is first_graphs[shape] for shape in first_graphs)
