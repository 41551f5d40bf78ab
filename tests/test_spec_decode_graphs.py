"""CUDA graphs of verify steps (speculative decoding: 1 + k tokens a sequence): which steps pad to which captured
shape, mixed steps (sequences with fewer drafts, or none, padded to 1 + k tokens each) included, the padded inputs
giving the unpadded outputs (on the CPU, with a stand-in that runs the padded forward eagerly where a graph would
replay), and on CUDA greedy tokens identical with graphs on and off, verify graphs replayed for mixed steps too."""

import pytest
import torch

from engine import LLM
from engine.cuda_graphs import MIXED_STEP_MAX_TOKENS, CudaGraphs, GraphShape, graph_shape, graph_sizes
from engine.input_batch import BatchRow, InputBatch, ScheduledRow
from engine.models.attention import AttentionMetadata
from engine.sampling_params import SamplingParams
from tests.test_spec_decode import OPTIONS, PARAMS, PROMPTS, flat
from tests.test_spec_decode_draft import draft_of

NGRAM = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def workload(tiny_model, method: str) -> tuple[dict, list, list]:
    """Speculation and the prompts and parameters it runs on. A draft model drafts k for every decoding sequence,
    so its verify steps are uniform in a batch; "ngram" runs one looping prompt, which finds k drafts every step;
    "ngram_mixed" runs prompts that find 0..k drafts a step each (mixed steps, padded to the verify graph)."""
    if method == "ngram":
        return NGRAM, PROMPTS[1:2], PARAMS[:1]
    if method == "ngram_mixed":
        return NGRAM, PROMPTS, PARAMS
    return {"model": draft_of(tiny_model, "llama"), "num_speculative_tokens": 3}, PROMPTS, PARAMS


def rows(*counts: int, start: int = 0) -> list[ScheduledRow]:
    return [ScheduledRow(None, start, count) for count in counts]


def test_verify_steps_pad_to_their_own_buckets():
    sizes = graph_sizes(max_num_seqs=64, max_num_batched_tokens=48, num_speculative_tokens=3)
    assert sizes == {1: [1, 2, 4, 8, 16, 24, 32, 40, 48], 4: [1, 2, 4, 8, 12]}  # 12 sequences of 4 tokens fill 48
    assert graph_sizes(64, 48) == {1: sizes[1]}
    assert graph_shape(sizes, 3, rows(1, 1, 1), 256) == GraphShape(4, 1)
    assert graph_shape(sizes, 12, rows(4, 4, 4), 256) == GraphShape(4, 4)
    assert graph_shape(sizes, 40, rows(*[4] * 10), 256) == GraphShape(12, 4)
    assert graph_shape(sizes, 52, rows(*[4] * 13), 256) is None  # beyond the largest verify bucket
    assert graph_shape(sizes, 12, rows(1, 4, 7), 256) is None  # a row longer than 1 + k (a prefill chunk)
    assert graph_shape(sizes, 30, rows(30), 256) is None  # a prefill chunk
    assert graph_shape(graph_sizes(64, 48), 6, rows(3, 3), 256) is None  # no speculation: decode graphs only


def test_mixed_steps_pad_to_the_verify_bucket():
    """Sequences with fewer drafts than k (n-gram: no match, or a shorter one) or none beside verifying ones pad to
    the verify graph of 1 + k tokens, while the padded graph stays small and within the model's length."""
    sizes = graph_sizes(max_num_seqs=256, max_num_batched_tokens=2048, num_speculative_tokens=3)
    assert graph_shape(sizes, 6, rows(3, 3), 256) == GraphShape(2, 4)  # fewer drafts than k everywhere
    assert graph_shape(sizes, 7, rows(1, 4, 2), 256) == GraphShape(4, 4)
    assert graph_shape(sizes, 9, rows(1, 1, 1, 1, 1, 4), 256) == GraphShape(8, 4)  # decodes beside one verify
    assert graph_shape(sizes, 4, rows(1, 1, 1, 1), 256) == GraphShape(4, 1)  # decodes alone keep decode graphs
    assert graph_shape(sizes, 7, rows(1, 1, 5), 256) is None  # a prefill chunk longer than 1 + k
    largest = MIXED_STEP_MAX_TOKENS // 4
    assert graph_shape(sizes, largest + 3, rows(*[1] * (largest - 1), 4), 256) == GraphShape(largest, 4)
    assert graph_shape(sizes, largest + 4, rows(*[1] * largest, 4), 256) is None  # past the memory-bound size
    assert graph_shape(sizes, 4 * (largest + 1), rows(*[4] * (largest + 1)), 256) is not None  # uniform: no cap
    assert graph_shape(sizes, 3, rows(1, 2, start=252), 256) == GraphShape(2, 4)  # padding up to position 255
    assert graph_shape(sizes, 3, rows(1, 2, start=253), 256) is None  # padding past max_model_len: eager


def test_padding_adds_dummy_sequences_of_the_query_length():
    batch = InputBatch(64, 8, 4, 16, torch.device("cpu"), with_lora=False)
    batch.block_tables.host[:] = 999  # stale ids (a profile's larger cache): dummies must not read them
    metadata = batch.fill([BatchRow([5, 6, 7, 8], 20, 4, [3, 2])], pad_to=3, pad_query_len=4)
    assert metadata.block_tables[1:, 0].tolist() == [0, 0]
    assert metadata.query_start_loc.tolist() == [0, 4, 8, 12]
    assert metadata.seq_lens.tolist() == [24, 4, 4]
    assert metadata.slot_mapping.tolist() == [36, 37, 38, 39] + [-1] * 8  # block 2, from offset 4; dummies: nowhere
    assert batch.positions.device[:12].tolist() == [20, 21, 22, 23, 0, 1, 2, 3, 0, 1, 2, 3]
    assert batch.input_ids.device[:12].tolist() == [5, 6, 7, 8] + [0] * 8


def test_mixed_rows_pad_after_their_own_tokens():
    """A row of fewer tokens than the verify graph's 1 + k takes 1 + k: its tokens, then padding at the next
    positions written nowhere; its seq_len counts the padding, so that the attention kernels (which place a
    sequence's queries at its last positions) see its real queries where they are; dummies follow."""
    batch = InputBatch(64, 8, 4, 16, torch.device("cpu"), with_lora=False)
    batch.fill([BatchRow([1], 0, 1, [8]), BatchRow([1], 0, 1, [9, 9, 9])])  # an earlier step's table entries
    metadata = batch.fill([BatchRow([5, 6], 20, 2, [3, 2]), BatchRow([9], 14, 1, [4]), BatchRow([1, 2, 3, 4], 30, 4,
                                                                                               [5, 6, 7])],
                          pad_to=4, pad_query_len=4)
    assert metadata.query_start_loc.tolist() == [0, 4, 8, 12, 16]
    assert metadata.seq_lens.tolist() == [24, 18, 34, 4]
    assert batch.positions.device[:16].tolist() == [20, 21, 22, 23, 14, 15, 16, 17, 30, 31, 32, 33, 0, 1, 2, 3]
    assert metadata.slot_mapping.tolist() == ([36, 37, -1, -1] + [78, -1, -1, -1] + [110, 111, 112, 113]
                                              + [-1] * 4)
    assert batch.input_ids.device[:16].tolist() == [5, 6, 0, 0, 9, 0, 0, 0, 1, 2, 3, 4] + [0] * 4
    assert (metadata.max_query_len, metadata.max_seq_len) == (4, 34)
    # Padding past a row's last block reads that block again, not what an earlier step left in the table.
    assert metadata.block_tables[1, :3].tolist() == [4, 4, 9]
    # Decode graphs and eager steps pad no row.
    metadata = batch.fill([BatchRow([9], 7, 1, [4]), BatchRow([5, 6], 20, 2, [3, 2])])
    assert metadata.query_start_loc.tolist() == [0, 1, 3]
    assert metadata.seq_lens.tolist() == [8, 22]


class EagerGraphs(CudaGraphs):
    """Stands in for the captured graphs on the CPU: a replay runs the forward on the padded input buffers, as the
    graph of that shape would, and records the shape; `steps` records each forward's row lengths and its graph."""

    def __init__(self, sizes, max_model_len: int, batch: InputBatch, mixed=()):
        super().__init__(sizes, max_model_len, mixed)
        self.batch, self.replayed, self.uneven, self.steps = batch, [], [], []

    @classmethod
    def install(cls, owner) -> "EagerGraphs":
        """In place of `owner`'s graphs (a runner's or a draft model's)."""
        graphs = owner.cuda_graphs
        owner.cuda_graphs = graphs = cls(graphs.sizes, graphs.max_model_len, owner.batch, graphs.mixed)
        return graphs

    def bucket(self, num_tokens, rows):
        shape = super().bucket(num_tokens, rows)
        self.steps.append((tuple(row.count for row in rows), shape))
        return record_mixed(self.uneven, rows, shape)

    def capture(self, forward, pad_inputs, device):
        self.forward = forward
        self._graphs = {GraphShape(size, q): None for q, sizes in self.sizes.items() for size in sizes}
        self._graphs.update(dict.fromkeys(self.mixed))

    def replay(self, shape):
        self.replayed.append(shape)
        b, n = self.batch, shape.num_tokens
        metadata = AttentionMetadata(b.slot_mapping.device[:n], b.block_tables.device[:shape.num_seqs],
                                     b.seq_lens.device[:shape.num_seqs], b.query_start_loc.device[:shape.num_seqs + 1],
                                     shape.query_len, 0)
        return self.forward(n, metadata)


def record_mixed(mixed: list, rows, shape: GraphShape | None) -> GraphShape | None:
    """Notes the graph a step whose rows compute different numbers of tokens goes to."""
    if shape is not None and len({row.count for row in rows}) > 1:
        mixed.append((tuple(row.count for row in rows), shape))
    return shape


@pytest.mark.parametrize("method", ["ngram", "ngram_mixed", "draft_model"])
def test_padded_verify_steps_answer_as_eager_ones(tiny_model, method):
    model_dir = tiny_model("llama", max_position_embeddings=256)
    spec, prompts, params = workload(tiny_model, method)
    reference = LLM(model_dir, **OPTIONS).generate(prompts, params, use_tqdm=False)
    llm = LLM(model_dir, speculative_config=spec, **OPTIONS)
    runner = llm.core.runner
    graphs = EagerGraphs.install(runner)
    if runner.draft_model is not None:  # its decode graphs are captured with the target's
        EagerGraphs.install(runner.draft_model)
    runner.use_cuda_graphs = True
    runner.capture_cuda_graphs()
    assert flat(llm.generate(prompts, params, use_tqdm=False)) == flat(reference)
    assert any(shape.query_len == 4 for shape in graphs.replayed)
    if method == "draft_model":  # three verifying sequences (or four: n = 2) padded to the bucket of four
        assert GraphShape(4, 4) in graphs.replayed
    if method == "ngram_mixed":  # steps of sequences with 0..3 drafts each went through the verify graph
        # Those with a prompt chunk longer than 1 + k went to a mixed-step graph (query_len 0).
        verify_padded = [(counts, shape) for counts, shape in graphs.uneven if max(counts) <= 4]
        assert len(verify_padded) >= 5 and all(shape.query_len == 4 for _, shape in verify_padded)
        assert all(shape.query_len == 0 for counts, shape in graphs.uneven if max(counts) > 4)
        assert any(1 in counts and 4 in counts for counts, _ in verify_padded)
        assert any(set(counts) - {1, 4} for counts, _ in verify_padded)  # 1 or 2 drafts of 3


def staggered_run(llm: LLM) -> list:
    """A looping request verifies drafts for a few steps, then a 3-token prompt asking for prompt logprobs and a
    request with no match (it decodes one token a step) join it: their prefill rows of 3 tokens and their decode
    rows sit beside verifying ones. With async scheduling a decode row's last token is still on the device."""
    core, outputs = llm.core, []
    core.add_request("loop", [100, 101, 102, 103] * 6, SamplingParams(temperature=0.0, max_tokens=30, ignore_eos=True))
    for _ in range(3):
        outputs += core.step()
    core.add_request("short", [7, 9, 11], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True,
                                                          prompt_logprobs=2, logprobs=1))
    core.add_request("plain", [50, 60, 70], SamplingParams(temperature=0.0, max_tokens=12, ignore_eos=True))
    while core.has_unfinished_requests():
        outputs += core.step()
    return [(o.request_id, o.new_token_ids, [(e.token_ids, e.rank) for e in o.new_logprobs or []],
             [(e.token_ids, e.rank) for e in o.prompt_logprobs or []]) for o in outputs]


@pytest.mark.parametrize("async_scheduling", [False, True])
def test_mixed_steps_with_prefill_rows_and_pending_tokens(tiny_model, async_scheduling):
    model_dir = tiny_model("llama", max_position_embeddings=256)
    options = {**OPTIONS, "speculative_config": NGRAM, "async_scheduling": async_scheduling}
    expected = staggered_run(LLM(model_dir, **options))
    llm = LLM(model_dir, **options)
    runner = llm.core.runner
    graphs = EagerGraphs.install(runner)
    runner.use_cuda_graphs = True
    runner.capture_cuda_graphs()
    assert staggered_run(llm) == expected
    assert any(prompt for *_, prompt in expected)  # the short prompt's logprobs came through
    assert any(counts.count(3) == 2 for counts, _ in graphs.uneven)  # the two prefill rows padded to 1 + k
    assert any(4 in counts and 1 in counts for counts, _ in graphs.uneven)  # decodes padded beside a verify


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need a GPU")
@pytest.mark.parametrize("method", ["ngram", "ngram_mixed", "draft_model"])
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
    mixed, bucket = [], CudaGraphs.bucket
    monkeypatch.setattr(CudaGraphs, "bucket", lambda self, n, rows: record_mixed(mixed, rows, bucket(self, n, rows)))
    graphed = LLM(model_dir, speculative_config=spec, cuda_graphs=True, **options)
    outputs = graphed.generate(prompts, params, use_tqdm=False)
    assert [c.token_ids for o in outputs for c in o.outputs] == [c.token_ids for o in expected for c in o.outputs]
    assert any(shape.query_len == 4 for shape in replayed)
    if method == "ngram_mixed":
        assert mixed and all(shape.query_len == (4 if max(counts) <= 4 else 0) for counts, shape in mixed)
