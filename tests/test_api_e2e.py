"""The API through engine processes, the way `kvbox serve` runs: the real server in a subprocess, the official
`openai` client. Most API tests run in process (`api_server`); these check that the same answers and the same
request id come through the process boundary."""

import openai
import pytest

from engine import LLM, SamplingParams

pytest.register_assert_rewrite("helpers_server")
from helpers_server import long_llama, model_config, run_server, server_config

pytest_plugins = ["helpers_server"]

PROMPT = "The quick brown fox"
MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def server(tiny_model, tmp_path_factory):
    with run_server(server_config([model_config("llama", long_llama(tiny_model))]),
                    tmp_path_factory.mktemp("api_e2e")) as running:
        yield running


def test_greedy_answers_equal_the_offline_engine(server, tiny_model):
    offline = LLM(long_llama(tiny_model), device="cpu", dtype="float32", num_kv_blocks=300)
    params = SamplingParams(temperature=0.0, max_tokens=12)
    client = server.client()
    completion = client.completions.create(model="llama", prompt=[PROMPT, "Hi"], max_tokens=12, temperature=0)
    assert [c.text for c in completion.choices] == [
        o.outputs[0].text for o in offline.generate([PROMPT, "Hi"], params, use_tqdm=False)]
    streamed = client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=12, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == offline.chat(
        MESSAGES, params, use_tqdm=False)[0].outputs[0].text


def test_the_request_id_crosses_to_the_engine_and_back(server):
    raw = server.client().with_raw_response.completions.create(
        model="llama", prompt=PROMPT, max_tokens=2, extra_headers={"X-Request-Id": "e2e-7"})
    assert raw.headers["x-request-id"] == "e2e-7" and raw.parse().id == "cmpl-e2e-7"
    with pytest.raises(openai.BadRequestError) as raised:
        server.client().completions.create(model="llama", prompt=PROMPT, max_tokens=2,
                                           extra_headers={"X-Request-Id": "bad id"})
    assert raised.value.status_code == 400 and raised.value.param == "X-Request-Id"
