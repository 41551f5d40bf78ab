"""CUDA graphs of mixed steps (prompt chunks beside decodes, or alone): which graphs exist, which steps replay
them, the scheduler filling a capped step up to the graph's size, the padded inputs (empty sequences, tokens in no
sequence), and the padded forward giving the unpadded tokens: on the CPU through a stand-in that runs the padded
forward eagerly where a graph would replay, on CUDA with graphs on and off."""

import numpy as np
import pytest
import torch

from engine import LLM
from engine.cuda_graphs import MIXED_GRAPH_TOKENS, CudaGraphs, GraphShape, graph_shape, graph_sizes, mixed_graph_shapes
from engine.input_batch import BatchRow, InputBatch, ScheduledRow
from engine.sampling_params import SamplingParams
from engine.scheduler_budget import StepBudget
from tests.test_spec_decode_graphs import EagerGraphs

# Four streams at most, chunks of 32 prompt tokens beside decodes: one mixed graph of 256 tokens (steps fill it),
# longer prompt-only steps eager.
OPTIONS = dict(dtype="float32", max_model_len=512, max_num_seqs=4, max_num_batched_tokens=320,
               max_prefill_tokens_while_decoding=32, prefill_tokens_per_decode=8)


def rows(*counts: int) -> list[ScheduledRow]:
    return [ScheduledRow(None, 0, count) for count in counts]


def test_mixed_graphs_reach_the_largest_capped_step():
    shapes = mixed_graph_shapes(256, 8192, 512, 8)  # 256 streams allow 2,048 prompt tokens beside them
    assert [s.mixed_tokens for s in shapes] == list(range(256, 2305, 256))
    assert {(s.num_seqs, s.query_len) for s in shapes} == {(256, 0)}
    assert mixed_graph_shapes(256, 1000, 512, 8)[-1] == GraphShape(256, 0, 1000)  # the budget bounds the largest
    assert mixed_graph_shapes(8, 24, 512, 8) == [GraphShape(8, 0, 24)]
    assert mixed_graph_shapes(4, 8192, 16, 2) == [GraphShape(4, 0, 256)]
    assert mixed_graph_shapes(256, 8192, None, 8) == []  # uncapped prompt chunks fill the budget: eager


def test_decode_graphs_first_then_the_smallest_mixed_graph_that_holds_the_step():
    sizes, mixed = graph_sizes(256, 8192), mixed_graph_shapes(256, 8192, 512, 8)
    assert graph_shape(sizes, 3, rows(1, 1, 1), 4096, mixed) == GraphShape(4, 1)
    assert graph_shape(sizes, 514, rows(1, 1, 512), 4096, mixed) == GraphShape(256, 0, 768)
    assert graph_shape(sizes, 512, rows(*[1] * 64, 448), 4096, mixed) == GraphShape(256, 0, 512)
    assert graph_shape(sizes, 200, rows(200), 4096, mixed) == GraphShape(256, 0, 256)  # a prompt alone
    assert graph_shape(sizes, 2305, rows(1, 2304), 4096, mixed) is None  # past the largest: eager
    assert graph_shape(sizes, 3, rows(1, 2), 4096) is None  # no mixed graphs (a draft model's)


def test_a_capped_step_fills_up_to_the_graph_multiple():
    def prefill_room(decodes: int, multiple: int) -> int:
        budget = StepBudget(8192, 512, 8, multiple)
        budget.take(decodes, prefill=False)
        return budget.prefill_room()

    assert prefill_room(64, 0) == 512
    assert prefill_room(64, MIXED_GRAPH_TOKENS) == 768 - 64
    assert prefill_room(1, MIXED_GRAPH_TOKENS) == 768 - 1
    assert prefill_room(200, MIXED_GRAPH_TOKENS) == 2048 - 200  # 1,600 grown from 200 streams, then filled
    assert prefill_room(0, MIXED_GRAPH_TOKENS) == 8192  # nothing decodes: no cap, nothing to fill


def test_mixed_padding_leaves_empty_sequences_and_tokens_in_none():
    batch = InputBatch(16, 8, 4, 16, torch.device("cpu"), with_lora=True)
    metadata = batch.fill([BatchRow([9], 7, 1, [4]), BatchRow([5, 6, 7], 20, 3, [3, 2])], pad_to=6, pad_tokens=10)
    assert metadata.query_start_loc.tolist() == [0, 1, 4, 4, 4, 4, 4]
    assert metadata.seq_lens.tolist() == [8, 23, 0, 0, 0, 0]
    assert metadata.slot_mapping.tolist() == [4 * 16 + 7, 2 * 16 + 4, 2 * 16 + 5, 2 * 16 + 6] + [-1] * 6
    assert batch.input_ids.device[:10].tolist() == [9, 5, 6, 7] + [0] * 6
    assert batch.positions.device[:10].tolist() == [7, 20, 21, 22] + [0] * 6
    assert batch.lora_slots.device[4:10].tolist() == [-1] * 6
    assert metadata.block_tables.shape[0] == 6


def staggered(llm: LLM) -> list:
    """Two requests of 150 prompt tokens start together (one step of 300 prompt tokens), then decode while prompts of
    300 and 100 tokens arrive: their chunks go beside the decodes (mixed steps); one asks for prompt logprobs across
    its chunks."""
    core, outputs, rng = llm.core, [], np.random.default_rng(0)
    for i in range(2):
        core.add_request(f"long{i}", rng.integers(5, 250, 150).tolist(),
                         SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True, logprobs=1))
    for _ in range(3):
        outputs += core.step()
    core.add_request("p300", rng.integers(5, 250, 300).tolist(),
                     SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True, prompt_logprobs=1))
    core.add_request("p100", rng.integers(5, 250, 100).tolist(),
                     SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True))
    while core.has_unfinished_requests():
        outputs += core.step()
    return [(o.request_id, o.new_token_ids, [(e.token_ids, e.rank) for e in o.new_logprobs or []],
             [(e.token_ids, e.rank) for e in o.prompt_logprobs or []]) for o in outputs]


def test_mixed_steps_through_the_padded_graph_inputs_answer_as_eager_ones(tiny_model):
    model_dir = tiny_model("llama", max_position_embeddings=512)
    reference = LLM(model_dir, device="cpu", **OPTIONS)
    reference.core.scheduler.fill_multiple = MIXED_GRAPH_TOKENS  # the same steps as the graphed engine's
    expected = staggered(reference)
    llm = LLM(model_dir, device="cpu", **OPTIONS)
    runner = llm.core.runner
    graphs = EagerGraphs.install(runner)
    runner.use_cuda_graphs = True
    runner.capture_cuda_graphs()
    llm.core.scheduler.fill_multiple = runner.mixed_graph_tokens
    assert staggered(llm) == expected
    mixed = [counts for counts, shape in graphs.steps if shape is not None and shape.query_len == 0]
    assert any(len(counts) > 1 and 1 in counts and sum(counts) == 256 for counts in mixed)  # filled beside decodes
    assert any(shape is None and sum(counts) > 256 for counts, shape in graphs.steps)  # the first step: eager


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
def test_cuda_graphs_replay_mixed_steps_with_the_same_tokens(tiny_model, monkeypatch):
    model_dir = tiny_model("llama", max_position_embeddings=512)
    options = {**OPTIONS, "device": "cuda", "num_kv_blocks": 256}
    eager = LLM(model_dir, cuda_graphs=False, **options)
    eager.core.scheduler.fill_multiple = MIXED_GRAPH_TOKENS
    expected = staggered(eager)
    replayed, replay = [], CudaGraphs.replay
    monkeypatch.setattr(CudaGraphs, "replay", lambda self, shape: replayed.append(shape) or replay(self, shape))
    graphed = LLM(model_dir, cuda_graphs=True, **options)
    assert graphed.core.scheduler.fill_multiple == MIXED_GRAPH_TOKENS
    assert staggered(graphed) == expected
    assert GraphShape(4, 0, 256) in replayed and GraphShape(4, 1) in replayed
