"""CUDA graphs of verify steps (speculative decoding: 1 + k tokens a sequence): which steps pad to which captured
shape, the padded inputs giving the unpadded outputs (on the CPU, with a stand-in that runs the padded forward
eagerly where a graph would replay), and on CUDA greedy tokens identical with graphs on and off, verify graphs
replayed."""

import pytest
import torch

from engine import LLM
from engine.cuda_graphs import CudaGraphs, GraphShape, graph_shape, graph_sizes
from engine.input_batch import BatchRow, InputBatch, ScheduledRow
from engine.models.attention import AttentionMetadata
from tests.test_spec_decode import OPTIONS, PARAMS, PROMPTS, flat
from tests.test_spec_decode_draft import draft_of

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def workload(tiny_model, method: str) -> tuple[dict, list, list]:
    """Speculation and the prompts and parameters it runs on. A draft model drafts k for every decoding sequence,
    so its verify steps are uniform in a batch; n-gram drafts are not (a sequence without a match decodes one
    token, and the step runs eagerly), so it runs one looping prompt, which finds k drafts every step."""
    if method == "ngram":
        return NGRAM, PROMPTS[1:2], PARAMS[:1]
    return {"model": draft_of(tiny_model, "llama"), "num_speculative_tokens": 3}, PROMPTS, PARAMS


def rows(*counts: int) -> list[ScheduledRow]:
    return [ScheduledRow(None, 0, count) for count in counts]


def test_verify_steps_pad_to_their_own_buckets():
    sizes = graph_sizes(max_num_seqs=64, max_num_batched_tokens=48, num_speculative_tokens=3)
    assert sizes == {1: [1, 2, 4, 8, 16, 24, 32, 40, 48], 4: [1, 2, 4, 8, 12]}  # 12 sequences of 4 tokens fill 48
    assert graph_sizes(64, 48) == {1: sizes[1]}
    assert graph_shape(sizes, 3, rows(1, 1, 1)) == GraphShape(4, 1)
    assert graph_shape(sizes, 12, rows(4, 4, 4)) == GraphShape(4, 4)
    assert graph_shape(sizes, 40, rows(*[4] * 10)) == GraphShape(12, 4)
    assert graph_shape(sizes, 52, rows(*[4] * 13)) is None  # beyond the largest verify bucket
    assert graph_shape(sizes, 12, rows(1, 4, 7)) is None  # mixed query lengths: eager
    assert graph_shape(sizes, 6, rows(3, 3)) is None  # fewer drafts than k: no graph of that length
    assert graph_shape(sizes, 30, rows(30)) is None  # a prefill chunk


def test_padding_adds_dummy_sequences_of_the_query_length():
    batch = InputBatch(64, 8, 4, 16, torch.device("cpu"), with_lora=False)
    metadata = batch.fill([BatchRow([5, 6, 7, 8], 20, 4, [3, 2])], pad_to=3, pad_query_len=4)
    assert metadata.query_start_loc.tolist() == [0, 4, 8, 12]
    assert metadata.seq_lens.tolist() == [24, 4, 4]
    assert metadata.slot_mapping.tolist() == [36, 37, 38, 39] + [-1] * 8  # block 2, from offset 4; dummies: nowhere
    assert batch.positions.device[:12].tolist() == [20, 21, 22, 23, 0, 1, 2, 3, 0, 1, 2, 3]
    assert batch.input_ids.device[:12].tolist() == [5, 6, 7, 8] + [0] * 8


class EagerGraphs(CudaGraphs):
    """Stands in for the captured graphs on the CPU: a replay runs the forward on the padded input buffers, as the
    graph of that shape would, and records the shape."""

    def __init__(self, sizes, batch: InputBatch):
        super().__init__(sizes)
        self.batch, self.replayed = batch, []

    def capture(self, forward, pad_inputs, device):
        self.forward = forward
        self._graphs = {GraphShape(size, q): None for q, sizes in self.sizes.items() for size in sizes}

    def replay(self, shape):
        self.replayed.append(shape)
        b, n = self.batch, shape.num_tokens
        metadata = AttentionMetadata(b.slot_mapping.device[:n], b.block_tables.device[:shape.num_seqs],
                                     b.seq_lens.device[:shape.num_seqs], b.query_start_loc.device[:shape.num_seqs + 1],
                                     shape.query_len, 0)
        return self.forward(n, metadata)


@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_padded_verify_steps_answer_as_eager_ones(tiny_model, method):
    model_dir = tiny_model("llama", max_position_embeddings=256)
    spec, prompts, params = workload(tiny_model, method)
    reference = LLM(model_dir, **OPTIONS).generate(prompts, params, use_tqdm=False)
    llm = LLM(model_dir, speculative_config=spec, **OPTIONS)
    runner = llm.core.runner
    runner.cuda_graphs = graphs = EagerGraphs(runner.cuda_graphs.sizes, runner.batch)
    runner.use_cuda_graphs = True
    runner.capture_cuda_graphs()
    assert flat(llm.generate(prompts, params, use_tqdm=False)) == flat(reference)
    assert any(shape.query_len == 4 for shape in graphs.replayed)
    if method == "draft_model":  # three verifying sequences (or four: n = 2) padded to the bucket of four
        assert GraphShape(4, 4) in graphs.replayed


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["ngram", "draft_model"])
def test_cuda_graphs_replay_verify_steps_with_the_same_tokens(tiny_model, method, monkeypatch):
    model_dir = tiny_model("llama", max_position_embeddings=256)
    spec, prompts, params = workload(tiny_model, method)
    # A fixed cache: engines sized by the GPU's free memory would leave the second (and its draft) none.
    options = {**OPTIONS, "device": "cuda", "num_kv_blocks": 256}
    eager = LLM(model_dir, speculative_config=spec, cuda_graphs=False, **options)
    expected = eager.generate(prompts, params, use_tqdm=False)
    replayed = []
    replay = CudaGraphs.replay
    monkeypatch.setattr(CudaGraphs, "replay", lambda self, shape: replayed.append(shape) or replay(self, shape))
    graphed = LLM(model_dir, speculative_config=spec, cuda_graphs=True, **options)
    outputs = graphed.generate(prompts, params, use_tqdm=False)
    assert [c.token_ids for o in outputs for c in o.outputs] == [c.token_ids for o in expected for c in o.outputs]
    assert any(shape.query_len == 4 for shape in replayed)
