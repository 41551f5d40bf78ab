"""Offline data parallelism (`LLM(model, data_parallel_size=N)`, engine.data_parallel): replicas in this process
give what one engine gives, and share the work."""

import pytest

from engine import LLM, BeamSearchParams, SamplingParams
from engine.config import EngineConfig, EngineConfigError
from engine.data_parallel import DataParallelCores

OPTIONS = dict(dtype="float32", device="cpu", num_kv_blocks=64, block_size=8)
PROMPTS = [[1, 5, 9, 13, 17, 21], [2, 4, 6], [7, 7, 7, 7, 7, 7, 7, 7, 7], [3, 1, 4, 1, 5, 9, 2, 6], [11, 12], [30]]


@pytest.fixture(scope="module")
def model(tiny_model):
    return tiny_model("llama")


@pytest.fixture(scope="module")
def single(model):
    llm = LLM(model, **OPTIONS)
    yield llm
    llm.shutdown()


@pytest.fixture(scope="module")
def replicated(model):
    llm = LLM(model, data_parallel_size=2, **OPTIONS)
    yield llm
    llm.shutdown()


def _tokens(outputs):
    return [[sample.token_ids for sample in output.outputs] for output in outputs]


def test_greedy_and_seeded_outputs_equal_one_engines_and_both_replicas_work(single, replicated, monkeypatch):
    assert isinstance(replicated.core, DataParallelCores) and len(replicated.core.replicas) == 2
    taken = {0: [], 1: []}
    for index, replica in enumerate(replicated.core.replicas):
        original = replica.add_request
        monkeypatch.setattr(replica, "add_request",
                            lambda request_id, *args, _index=index, _original=original, **kwargs:
                            taken[_index].append(request_id) or _original(request_id, *args, **kwargs))
    params = [SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True),
              SamplingParams(temperature=0.9, top_p=0.8, max_tokens=6, n=2, seed=7, ignore_eos=True)]
    for p in params:
        assert _tokens(replicated.generate(PROMPTS, p, use_tqdm=False)) == _tokens(single.generate(PROMPTS, p,
                                                                                                   use_tqdm=False))
    assert len(taken[0]) >= 4 and len(taken[1]) >= 4, taken  # the least-loaded replica takes each request
    assert replicated.core._load == [0, 0] and not replicated.core._replica_of  # nothing left counted


def test_beam_search_forks_on_the_parents_replica(single, replicated):
    params = BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True)
    prompts = [{"prompt": ids} for ids in PROMPTS[:4]]
    expected = [[(s.tokens, round(s.cum_logprob, 4)) for s in out.sequences] for out in single.beam_search(prompts,
                                                                                                          params)]
    got = [[(s.tokens, round(s.cum_logprob, 4)) for s in out.sequences] for out in replicated.beam_search(prompts,
                                                                                                        params)]
    assert got == expected
    for replica in replicated.core.replicas:  # every kept block released: none in use
        assert replica.stats().kv_usage == 0.0
    assert not replicated.core._kept


def test_a_stopped_sample_is_finished_on_its_replica(model):
    cores = DataParallelCores(EngineConfig.from_kwargs(model, data_parallel_size=2, **OPTIONS))
    try:
        params = SamplingParams(temperature=0.0, max_tokens=20, ignore_eos=True)
        for i, prompt in enumerate(PROMPTS[:4]):
            cores.add_request(str(i), prompt, params)
        assert sorted(cores._replica_of.values()) == [0, 0, 1, 1]
        outputs = cores.step()
        cores.finish_requests(["1", "2"])
        while cores.has_unfinished_requests():
            outputs += cores.step()
        counts = {str(i): sum(len(o.new_token_ids) for o in outputs if o.request_id == str(i)) for i in range(4)}
        assert counts["0"] == counts["3"] == 20 and counts["1"] < 20 and counts["2"] < 20, counts
        assert cores._load == [0, 0]
    finally:
        cores.shutdown()


def test_metrics_are_labelled_by_replica(replicated):
    replicated.generate(PROMPTS, SamplingParams(max_tokens=2), use_tqdm=False)
    engines = {m.labels["engine"] for m in replicated.get_metrics() if m.name == "vllm:num_preemptions"}
    assert engines == {"0", "1"}


def test_embeddings_equal_one_engines(model):
    one = LLM(model, task="embed", **OPTIONS)
    two = LLM(model, task="embed", data_parallel_size=2, **OPTIONS)
    try:
        texts = ["hello world", "a b c d e f", "zzz", "the quick brown fox"]
        for a, b in zip(one.embed(texts, use_tqdm=False), two.embed(texts, use_tqdm=False)):
            assert a.embedding == pytest.approx(b.embedding, abs=1e-6)
    finally:
        one.shutdown()
        two.shutdown()


@pytest.mark.parametrize("options,words", [
    (dict(data_parallel_size=0), "must be >= 1"),
    (dict(data_parallel_size=2, tensor_parallel_size=2), "serve the model with parallelism.data"),
    (dict(data_parallel_size=2, pipeline_parallel_size=2), "serve the model with parallelism.data"),
    (dict(data_parallel_size=2, device="cuda:1"), "names one"),
])
def test_bad_data_parallel_configs_name_the_key(model, options, words):
    with pytest.raises(EngineConfigError, match=words) as error:
        EngineConfig.from_kwargs(model, **{**OPTIONS, **options})
    assert error.value.field == "data_parallel_size"
