"""The HTTP API over an engine with async scheduling (the GPU's default), on the CPU: the same answers as the
synchronous engine for every kind of request, while outputs reach the supervisor one step later than the step that
made them; a stream cut off mid-way frees its request."""

import concurrent.futures
import time

import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import ADMIN_KEY, long_llama, model_config, run_inprocess, server_config

pytest_plugins = ["helpers_server"]

PROMPTS = ["The quick brown fox", "def fibonacci(n):", "Once upon a time", "1, 2, 3, 4,"]
REQUESTS = [  # completions requests, each sent to both models
    {"max_tokens": 60, "temperature": 0, "logprobs": 2, "extra_body": {"ignore_eos": True}},
    {"max_tokens": 60, "temperature": 0.9, "top_p": 0.9, "seed": 7, "n": 2},
    {"max_tokens": 40, "temperature": 0, "stop": [" the", "\n"], "frequency_penalty": 1.0},
    {"max_tokens": 20, "temperature": 0, "echo": True, "extra_body": {"min_tokens": 5}},
]


@pytest.fixture(scope="module")
def server(tiny_model):
    source = long_llama(tiny_model)
    # 10 blocks of 16 tokens for 4 running requests of up to 5 blocks each (prompt and 60 tokens): as soon as three
    # decode together, one is preempted.
    options = {"max_model_len": 128, "kv_cache": {"num_blocks": 10}, "scheduler": {"max_num_seqs": 4}}
    config = server_config([model_config("sync", source, async_scheduling=False, **options),
                            model_config("async", source, async_scheduling=True, **options)])
    with run_inprocess(config) as running:
        yield running


def answers(client, model: str) -> list:
    """Every request for every prompt, four at a time (so that they share batches), in a fixed order."""
    def one(prompt_and_request):
        prompt, request = prompt_and_request
        response = client.completions.create(model=model, prompt=prompt, **request)
        return [(c.index, c.text, c.finish_reason, c.logprobs and c.logprobs.tokens) for c in response.choices]

    work = [(p, r) for r in REQUESTS for p in PROMPTS]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        return list(pool.map(one, work))


def test_same_answers_as_the_synchronous_engine(server):
    client = server.client()
    expected = answers(client, "sync")
    assert answers(client, "async") == expected
    assert any(reason == "stop" for choices in expected for _, _, reason, _ in choices)  # the stops were exercised
    preemptions = {name: model["replicas"][0]["stats"]["num_preemptions"]
                   for name, model in server.admin_models().items()}
    assert preemptions["async"] > 0, preemptions


def test_stream_cut_off_midway_frees_its_request(server):
    with server.http() as http, http.stream("POST", "/v1/completions", json={
            "model": "async", "prompt": PROMPTS[0], "max_tokens": 1000, "ignore_eos": True, "stream": True}) as stream:
        chunks = 0
        for line in stream.iter_lines():
            chunks += line.startswith("data: ")
            if chunks >= 3:
                break  # leaving the block closes the connection
    deadline = time.monotonic() + 10
    while (stats := server.admin_models()["async"]["replicas"][0]["stats"])["num_running"] or stats["num_waiting"]:
        assert time.monotonic() < deadline, stats
        time.sleep(0.1)
    response = server.client().completions.create(model="async", prompt=PROMPTS[1], max_tokens=5, temperature=0)
    assert response.choices[0].finish_reason == "length"
    with server.http(ADMIN_KEY) as admin:
        assert admin.get("/admin/models").status_code == 200
