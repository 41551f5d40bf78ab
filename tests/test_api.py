"""The OpenAI-compatible API end to end over HTTP with the official `openai` client: the app and its engines in
process (`api_server`); `test_api_e2e.py` has the same through engine processes."""

import json
import re
import time

import httpx
import pytest

from engine import LLM, SamplingParams

pytest.register_assert_rewrite("helpers_server")
from helpers_server import LONG_CONTEXT, long_llama

pytest_plugins = ["helpers_server"]

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(api_server):
    return api_server.client()


@pytest.fixture(scope="module")
def offline_llama(tiny_model):
    return LLM(long_llama(tiny_model), device="cpu", dtype="float32", num_kv_blocks=300)


def test_models_lists_every_model(client):
    models = {m.id: m for m in client.models.list().data}
    assert set(models) == {"llama", "qwen"}
    assert models["llama"].owned_by == "kvbox" and models["llama"].model_extra["max_model_len"] == LONG_CONTEXT
    assert client.models.retrieve("qwen").id == "qwen"


def test_greedy_completion_equals_the_offline_engine(client, offline_llama):
    expected = offline_llama.generate(PROMPT, SamplingParams(temperature=0.0, max_tokens=12), use_tqdm=False)[0]
    response = client.completions.create(model="llama", prompt=PROMPT, max_tokens=12, temperature=0)
    assert response.choices[0].text == expected.outputs[0].text
    assert response.choices[0].finish_reason == expected.outputs[0].finish_reason
    usage = response.usage
    assert (usage.prompt_tokens, usage.completion_tokens) == (len(expected.prompt_token_ids),
                                                              len(expected.outputs[0].token_ids))
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert usage.prompt_tokens_details.cached_tokens >= 0


def test_usage_reports_prefix_cache_hits(client):
    prompt = "A prompt long enough to fill a few KV blocks of sixteen tokens, so that a repeat finds them cached."
    first = client.completions.create(model="qwen", prompt=prompt, max_tokens=2)
    second = client.completions.create(model="qwen", prompt=prompt, max_tokens=2)
    assert first.usage.prompt_tokens >= 32
    assert second.usage.prompt_tokens_details.cached_tokens >= 16


def test_greedy_chat_equals_the_offline_engine(client, offline_llama):
    expected = offline_llama.chat(MESSAGES, SamplingParams(temperature=0.0, max_tokens=10), use_tqdm=False)[0]
    response = client.chat.completions.create(model="llama", messages=MESSAGES, max_completion_tokens=10,
                                              temperature=0)
    assert response.choices[0].message.role == "assistant"
    assert response.choices[0].message.content == expected.outputs[0].text
    assert response.usage.prompt_tokens == len(expected.prompt_token_ids)


def test_streamed_completion_adds_up_to_the_whole_one(client):
    whole = client.completions.create(model="llama", prompt=PROMPT, max_tokens=16, temperature=0)
    chunks = list(client.completions.create(model="llama", prompt=PROMPT, max_tokens=16, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    *text_chunks, usage_chunk = chunks
    assert "".join(c.choices[0].text for c in text_chunks) == whole.choices[0].text
    assert text_chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason
    assert usage_chunk.choices == [] and usage_chunk.usage.total_tokens == whole.usage.total_tokens
    assert all(c.usage is None for c in text_chunks)


def test_streamed_chat_names_the_role_once_and_reports_usage(client):
    chunks = list(client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=8, stream=True,
                                                 stream_options={"include_usage": True}))
    *deltas, usage_chunk = chunks
    assert deltas[0].choices[0].delta.role == "assistant"
    assert all(c.choices[0].delta.role is None for c in deltas[1:])
    assert deltas[-1].choices[0].finish_reason == "length"
    assert usage_chunk.usage.completion_tokens == 8
    whole = client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=8)
    assert "".join(c.choices[0].delta.content for c in deltas) == whole.choices[0].message.content


def paused_stream(api_server, chunks):
    """Reads a stream's first chunk, then pauses the server (not its engines) for a while so that the engine runs
    ahead, then reads the rest: the tokens made meanwhile must reach the client merged, nothing lost."""
    first = next(chunks)
    api_server.pause(0.3)
    return [first, *chunks]


def test_a_stream_that_falls_behind_merges_tokens_and_still_adds_up(api_server, client):
    request = {"model": "llama", "prompt": PROMPT, "max_tokens": 128, "temperature": 0, "logprobs": 2,
               "extra_body": {"ignore_eos": True}}
    whole = client.completions.create(**request)
    *chunks, usage_chunk = paused_stream(api_server, iter(client.completions.create(
        **request, stream=True, stream_options={"include_usage": True})))
    streamed = [c.choices[0] for c in chunks]
    assert max(len(c.logprobs.tokens) for c in streamed) > 1, "no chunk carried several tokens"
    expected = whole.choices[0]
    assert "".join(c.text for c in streamed) == expected.text
    assert streamed[-1].finish_reason == expected.finish_reason
    assert [t for c in streamed for t in c.logprobs.tokens] == expected.logprobs.tokens
    assert [o for c in streamed for o in c.logprobs.text_offset] == expected.logprobs.text_offset
    assert [lp for c in streamed for lp in c.logprobs.token_logprobs] == pytest.approx(
        expected.logprobs.token_logprobs, abs=1e-4)
    assert [list(top) for c in streamed for top in c.logprobs.top_logprobs] == [
        list(top) for top in expected.logprobs.top_logprobs]
    assert usage_chunk.usage.completion_tokens == whole.usage.completion_tokens == 128


def test_a_chat_stream_that_falls_behind_names_the_role_once_and_adds_up(api_server, client):
    request = {"model": "qwen", "messages": MESSAGES, "max_tokens": 128, "logprobs": True, "top_logprobs": 2,
               "extra_body": {"ignore_eos": True}}
    whole = client.chat.completions.create(**request)
    chunks = paused_stream(api_server, iter(client.chat.completions.create(**request, stream=True)))
    entries = [e for c in chunks for e in c.choices[0].logprobs.content]
    assert max(len(c.choices[0].logprobs.content) for c in chunks) > 1, "no chunk carried several tokens"
    assert [c.choices[0].delta.role for c in chunks] == ["assistant"] + [None] * (len(chunks) - 1)
    assert "".join(c.choices[0].delta.content for c in chunks) == whole.choices[0].message.content
    assert [e.token for e in entries] == [e.token for e in whole.choices[0].logprobs.content]
    assert [[t.token for t in e.top_logprobs] for e in entries] == [
        [t.token for t in e.top_logprobs] for e in whole.choices[0].logprobs.content]
    assert len(entries) == whole.usage.completion_tokens == 128


def test_per_model_default_sampling_applies_when_the_request_omits_it(client):
    # qwen's config sets temperature 0: without one the request is greedy, so it equals an explicit greedy one.
    explicit = client.completions.create(model="qwen", prompt=PROMPT, max_tokens=10, temperature=0)
    default = client.completions.create(model="qwen", prompt=PROMPT, max_tokens=10)
    assert default.choices[0].text == explicit.choices[0].text


def test_n_gives_that_many_choices(client):
    completion = client.completions.create(model="llama", prompt=PROMPT, max_tokens=6, n=2, seed=1)
    assert [c.index for c in completion.choices] == [0, 1]
    chat = client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=6, n=2, seed=1)
    assert [c.index for c in chat.choices] == [0, 1]
    assert chat.usage.completion_tokens == 12
    streamed = list(client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=6, n=2, seed=1,
                                                   stream=True))
    assert {c.choices[0].index for c in streamed} == {0, 1}


def test_several_prompts_and_token_id_prompts(api_server, client):
    with api_server.http() as http:
        ids = [http.post("/tokenize", json={"model": "llama", "prompt": p}).json()["tokens"] for p in (PROMPT, "Hi")]
    response = client.completions.create(model="llama", prompt=[PROMPT, "Hi"], max_tokens=5, temperature=0)
    assert [c.index for c in response.choices] == [0, 1]
    assert response.usage.prompt_tokens == len(ids[0]) + len(ids[1])
    by_ids = client.completions.create(model="llama", prompt=ids, max_tokens=5, temperature=0)
    assert [c.text for c in by_ids.choices] == [c.text for c in response.choices]


def test_best_of_keeps_the_n_samples_of_highest_cumulative_logprob(client):
    """best_of 4, n 2, seeded: the two kept are the two best of the four that n 4 with the same seed draws."""
    request = dict(model="llama", prompt=PROMPT, max_tokens=6, seed=3, temperature=1.0, logprobs=0)
    every = client.completions.create(**request, n=4).choices
    cumulative = sorted((sum(c.logprobs.token_logprobs), c.text) for c in every)[::-1]
    best = client.completions.create(**request, n=2, extra_body={"best_of": 4})
    assert [c.index for c in best.choices] == [0, 1]
    assert [c.text for c in best.choices] == [text for _, text in cumulative[:2]]
    assert best.usage.completion_tokens == 24  # every sample drawn counts
    plain = client.completions.create(**{**request, "logprobs": None}, extra_body={"best_of": 3})
    assert len(plain.choices) == 1 and plain.choices[0].logprobs is None  # drawn to rank, not returned
    # Sample i is seeded with seed + i, so best_of 3 draws the first three of the four above.
    assert plain.choices[0].text == max((sum(c.logprobs.token_logprobs), c.text) for c in every[:3])[1]


def test_beam_search_equals_the_offline_engines(client, offline_llama):
    from engine import BeamSearchParams

    completion = client.completions.create(model="llama", prompt=PROMPT, max_tokens=5, n=3, temperature=0,
                                           extra_body={"use_beam_search": True, "ignore_eos": True})
    expected = offline_llama.beam_search(PROMPT, BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True))
    assert [c.text for c in completion.choices] == [s.text for s in expected[0].sequences]
    assert [c.index for c in completion.choices] == [0, 1, 2]
    assert completion.usage.completion_tokens == 15 and completion.choices[0].finish_reason == "length"


def test_completion_logprobs_and_echo(client):
    response = client.completions.create(model="llama", prompt=PROMPT, max_tokens=5, logprobs=2, echo=True,
                                         temperature=0)
    choice, usage = response.choices[0], response.usage
    assert choice.text.startswith(PROMPT)
    logprobs = choice.logprobs
    assert len(logprobs.tokens) == usage.prompt_tokens + usage.completion_tokens
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None  # nothing predicts token 0
    assert all(lp <= 0 for lp in logprobs.token_logprobs[1:])
    assert all(1 <= len(top) <= 3 for top in logprobs.top_logprobs[1:])  # the sampled token plus the top 2
    assert logprobs.text_offset == sorted(logprobs.text_offset)
    # Greedy: the sampled token is the most likely one.
    for token, top in zip(logprobs.tokens[usage.prompt_tokens:], logprobs.top_logprobs[usage.prompt_tokens:]):
        assert top[token] == max(top.values())


def test_chat_logprobs_carry_bytes_and_top_alternatives(client):
    response = client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=6, logprobs=True,
                                              top_logprobs=3)
    content = response.choices[0].logprobs.content
    assert len(content) == response.usage.completion_tokens
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        if "\ufffd" not in entry.token:
            assert bytes(entry.bytes).decode() == entry.token
    streamed = client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=6, logprobs=True,
                                              top_logprobs=3, stream=True)
    assert [e.token for c in streamed for e in c.choices[0].logprobs.content] == [e.token for e in content]


def test_stop_strings_cut_the_output(client):
    full = client.completions.create(model="llama", prompt=PROMPT, max_tokens=24, temperature=0).choices[0].text
    stop = full[len(full) // 2:len(full) // 2 + 2]
    cut = client.completions.create(model="llama", prompt=PROMPT, max_tokens=24, temperature=0, stop=stop)
    assert cut.choices[0].text == full[:full.index(stop)]
    assert cut.choices[0].finish_reason == "stop" and cut.choices[0].model_extra["stop_reason"] == stop
    streamed = client.completions.create(model="llama", prompt=PROMPT, max_tokens=24, temperature=0, stop=[stop],
                                         stream=True)
    assert "".join(c.choices[0].text for c in streamed) == cut.choices[0].text


def test_seed_makes_sampling_reproducible(client):
    def sample(seed):
        return client.completions.create(model="llama", prompt=PROMPT, max_tokens=12, temperature=1.0,
                                         seed=seed).choices[0].text

    assert sample(7) == sample(7)
    assert len({sample(7), sample(8), sample(9)}) > 1


def test_the_model_name_routes_the_request(client):
    outputs = {name: client.completions.create(model=name, prompt=PROMPT, max_tokens=12, temperature=0)
               for name in ("llama", "qwen")}
    assert outputs["llama"].model == "llama" and outputs["qwen"].model == "qwen"
    assert outputs["llama"].choices[0].text != outputs["qwen"].choices[0].text


def test_sampling_extras_are_accepted(client):
    response = client.completions.create(
        model="llama", prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9, presence_penalty=0.5,
        frequency_penalty=0.5, logit_bias={"42": 5}, user="tester",
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 8,
                    "skip_special_tokens": False})
    assert response.usage.completion_tokens == 8 and response.choices[0].finish_reason == "length"


def test_tokenize_detokenize_round_trip(api_server):
    with api_server.http() as http:
        tokens = http.post("/tokenize", json={"model": "llama", "prompt": PROMPT}).json()
        assert tokens["count"] == len(tokens["tokens"]) and tokens["max_model_len"] == LONG_CONTEXT
        assert http.post("/detokenize", json={"model": "llama", "tokens": tokens["tokens"]}).json() == {
            "prompt": PROMPT}
        chat = http.post("/tokenize", json={"model": "qwen", "messages": MESSAGES}).json()
        text = http.post("/detokenize", json={"model": "qwen", "tokens": chat["tokens"]}).json()["prompt"]
        assert "Name a colour." in text


def test_metrics_use_vllm_names_and_count_requests(api_server, client):
    def scrape() -> str:
        with api_server.http() as http:
            return http.get("/metrics").text

    def value(text: str, name: str) -> float:
        match = re.search(rf'^{re.escape(name)}{{model_name="llama"}} (\S+)$', text, re.M)
        return float(match.group(1)) if match else 0.0

    before = scrape()
    client.completions.create(model="llama", prompt=PROMPT, max_tokens=4, extra_body={"ignore_eos": True})
    after = scrape()
    for name in ("vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
                 "vllm:gpu_cache_usage_perc", "vllm:num_preemptions_total", "vllm:prefix_cache_queries_total",
                 "vllm:prefix_cache_hits_total"):
        assert re.search(rf'^{re.escape(name)}{{model_name="llama"}} ', after, re.M), name
    assert value(after, "vllm:generation_tokens_total") == value(before, "vllm:generation_tokens_total") + 4
    assert value(after, "vllm:prompt_tokens_total") > value(before, "vllm:prompt_tokens_total")
    for name in ("vllm:time_to_first_token_seconds_count", "vllm:e2e_request_latency_seconds_count"):
        assert value(after, name) == value(before, name) + 1
    assert value(after, "vllm:inter_token_latency_seconds_count") > value(before,
                                                                         "vllm:inter_token_latency_seconds_count")
    assert 'vllm:request_success_total{finished_reason="length",model_name="llama"}' in after
    # The engine's stats reach the supervisor 4 times a second: the steps of the request show up by then.
    deadline = time.monotonic() + 2
    while value(after, "kvbox:engine_step_seconds_total") <= value(before, "kvbox:engine_step_seconds_total"):
        assert time.monotonic() < deadline, "the engine's step time did not grow"
        time.sleep(0.1)
        after = scrape()
    waited = value(after, "kvbox:engine_device_wait_seconds_total")
    assert 0 <= waited <= value(after, "kvbox:engine_step_seconds_total")


def test_a_client_that_disconnects_aborts_its_request(api_server):
    def llama() -> dict:
        return api_server.admin_models()["llama"]

    def assert_aborted_soon() -> None:
        # An aborted request leaves the engine at once (its stats refresh 4 times a second); 2000 tokens would
        # take seconds.
        deadline = time.monotonic() + 1.0
        while (status := llama())["num_inflight"] or status["replicas"][0]["stats"]["num_running"]:
            assert time.monotonic() < deadline, f"the request still runs after its client left: {status}"
            time.sleep(0.05)
        # It counts as vLLM counts a client that went away: finished_reason="abort", nothing else.
        assert successes() == {**successes_before, "abort": successes_before.get("abort", 0) + 1}
        successes_before.update(successes())

    def successes() -> dict[str, float]:
        with api_server.http() as http:
            found = re.findall(r'^vllm:request_success_total{finished_reason="(\w+)",model_name="llama"} (\S+)$',
                               http.get("/metrics").text, re.M)
        return {reason: float(count) for reason, count in found if float(count)}

    body = {"model": "llama", "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True}
    successes_before = successes()
    with api_server.http() as http, http.stream("POST", "/v1/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()  # kept: a dropped iterator closes the connection
        assert json.loads(next(lines).removeprefix("data: "))["choices"]
        assert llama()["num_inflight"] == 1
    assert_aborted_soon()
    with api_server.http() as http, pytest.raises(httpx.ReadTimeout):
        http.post("/v1/completions", json=body, timeout=0.5)  # a plain response: the handler watches the socket
    assert_aborted_soon()
