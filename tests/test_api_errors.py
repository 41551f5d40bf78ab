"""Every failure is OpenAI's error object with the right status and `param`, and the server keeps serving after it.

Most tests share the session's server (`api_server`); the last two, which kill an engine and stop the server, share
one of their own (`lone_server`), in that order.
"""

import json
import os
import signal
import threading
import time
from contextlib import ExitStack

import httpx
import openai
import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import (ADMIN_KEY, MAX_BODY_BYTES, long_llama, model_config, run_server,
                            server_config)

pytest_plugins = ["helpers_server"]

CHAT = {"model": "llama", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
COMPLETION = {"model": "llama", "prompt": "Hi", "max_tokens": 2}


@pytest.fixture
def http(api_server):
    """A client whose every test ends by checking that a normal request still succeeds."""
    with api_server.http() as client:
        yield client
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


def assert_error(response: httpx.Response, status: int, param: str | None = None) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param, error
    return error


def test_malformed_json_is_400(http):
    response = http.post("/v1/chat/completions", content=b'{"model": "llama", "messages": [',
                         headers={"Content-Type": "application/json"})
    assert assert_error(response, 400)["type"] == "invalid_request_error"


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**COMPLETION, "max_tokens": "ten"}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt": [1, "two"]}, "prompt"),
    ("/v1/completions", {"prompt": "Hi"}, "model"),
    ("/v1/chat/completions", {**CHAT, "messages": "Hi"}, "messages"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": 3}]}, "messages[0].content"),
    ("/v1/chat/completions", {**CHAT, "logprobs": "yes"}, "logprobs"),
])
def test_wrong_types_name_the_field(http, path, body, param):
    assert_error(http.post(path, json=body), 400, param)


@pytest.mark.parametrize("path, body, param", [
    ("/v1/completions", {**COMPLETION, "temperature": -1}, "temperature"),
    ("/v1/completions", {**COMPLETION, "top_p": 0}, "top_p"),
    ("/v1/completions", {**COMPLETION, "n": 5}, "n"),  # server.max_n is 4
    ("/v1/completions", {**COMPLETION, "max_tokens": 100_000}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "max_tokens": 0}, "max_tokens"),
    ("/v1/completions", {**COMPLETION, "logprobs": 6}, "logprobs"),  # server.max_logprobs is 5
    ("/v1/completions", {**COMPLETION, "stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ("/v1/completions", {**COMPLETION, "stop": "x" * 300}, "stop"),
    ("/v1/completions", {**COMPLETION, "presence_penalty": 3}, "presence_penalty"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"not-a-token": 1}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "logit_bias": {"100000": 1}}, "logit_bias"),
    ("/v1/completions", {**COMPLETION, "prompt": [[1, 100000]]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": ""}, "prompt"),
    ("/v1/chat/completions", {**CHAT, "max_completion_tokens": 100_000}, "max_completion_tokens"),
    ("/v1/chat/completions", {**CHAT, "logprobs": True, "top_logprobs": 6}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_logprobs": 2}, "top_logprobs"),
    ("/v1/chat/completions", {**CHAT, "top_k": -5}, "top_k"),
])
def test_out_of_range_parameters_name_the_field(http, path, body, param):
    assert_error(http.post(path, json=body), 400, param)


def test_unknown_model_is_404(api_server, http):
    with pytest.raises(openai.NotFoundError) as raised:
        api_server.client().chat.completions.create(**{**CHAT, "model": "no-such-model"})
    assert raised.value.code == "model_not_found" and raised.value.param == "model"
    assert_error(http.get("/v1/models/no-such-model"), 404, "model")


def test_a_prompt_longer_than_the_context_is_400(api_server, http):
    with pytest.raises(openai.BadRequestError) as raised:
        api_server.client().completions.create(model="qwen", prompt="hello there " * 200, max_tokens=2)
    assert raised.value.param == "prompt" and "context length is 512" in raised.value.message


@pytest.mark.parametrize("messages, param", [
    ([], "messages"),
    ([{"role": "robot", "content": "Hi"}], "messages[0].role"),
    ([{"role": "user"}], "messages[0].content"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x"}}]}],
     "messages[0].content[0].type"),
])
def test_empty_messages_and_invalid_roles_are_400(http, messages, param):
    assert_error(http.post("/v1/chat/completions", json={**CHAT, "messages": messages}), 400, param)


def test_request_supplied_chat_template_is_refused(http):
    body = {**CHAT, "chat_template": "{{ raise_exception('pwned') }}"}
    assert_error(http.post("/v1/chat/completions", json=body), 400, "chat_template")


def test_an_oversized_body_is_413(http):
    body = {**CHAT, "messages": [{"role": "user", "content": "x" * MAX_BODY_BYTES}]}
    error = assert_error(http.post("/v1/chat/completions", json=body), 413)
    assert error["code"] == "request_too_large"


def test_keys_guard_every_route_but_the_public_ones(api_server, http):
    with api_server.http(key=None) as anonymous, api_server.http(key="sk-wrong") as wrong:
        for client in (anonymous, wrong):
            assert_error(client.post("/v1/chat/completions", json=CHAT), 401)
            assert_error(client.get("/v1/models"), 401)
            assert_error(client.get("/metrics"), 401)
            assert client.get("/health").status_code == 200
            assert client.get("/ready").json()["ready"] is True
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{api_server.base_url}/v1", api_key="sk-wrong", max_retries=0).models.list()
    assert_error(http.get("/admin/models"), 401)  # an API key is no admin key...
    with api_server.http(ADMIN_KEY) as admin:  # ...but an admin key works as an API key
        assert admin.get("/admin/models").status_code == 200
        assert admin.post("/v1/completions", json=COMPLETION).status_code == 200


def test_a_full_queue_is_429_with_retry_after(api_server, http):
    # llama takes max_num_seqs (2) + queue_cap (1) requests; hold 3 with long streams, then ask for a 4th.
    body = {**COMPLETION, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with api_server.http() as holder, ExitStack() as streams:
        for _ in range(3):  # admitted once the headers are out
            assert streams.enter_context(holder.stream("POST", "/v1/completions", json=body)).status_code == 200
        response = http.post("/v1/completions", json=COMPLETION)
        assert_error(response, 429)
        assert int(response.headers["Retry-After"]) >= 1
        assert http.post("/v1/completions", json={**COMPLETION, "model": "qwen"}).status_code == 200
    deadline = time.monotonic() + 2
    while api_server.admin_models()["llama"]["num_inflight"]:  # the server notices the disconnects
        assert time.monotonic() < deadline
        time.sleep(0.02)


@pytest.fixture(scope="module")
def lone_server(tiny_model, tmp_path_factory):
    with run_server(server_config([model_config("llama", long_llama(tiny_model))]),
                    tmp_path_factory.mktemp("lone_server")) as server:
        yield server


def test_a_dead_engine_ends_streams_with_an_error_event_and_comes_back(lone_server):
    pid = lone_server.admin_models()["llama"]["replicas"][0]["pid"]
    with lone_server.http() as http:
        with http.stream("POST", "/v1/completions", json={**COMPLETION, "max_tokens": 2000, "ignore_eos": True,
                                                         "stream": True}) as response:
            lines = response.iter_lines()
            next(lines)
            os.kill(pid, signal.SIGKILL)
            events = [line.removeprefix("data: ") for line in lines if line]
        assert events[-1] == "[DONE]"
        assert json.loads(events[-2])["error"]["code"] == "engine_unavailable"
        assert_error(http.post("/v1/completions", json=COMPLETION), 503)
        deadline = time.monotonic() + 60
        while http.get("/ready").status_code != 200:  # the supervisor restarts it after a backoff
            assert time.monotonic() < deadline, "the engine did not come back"
            time.sleep(0.1)
        assert http.post("/v1/completions", json=COMPLETION).status_code == 200
    assert lone_server.admin_models()["llama"]["restarts"] == 1


def test_sigterm_drains_running_requests_and_refuses_new_ones(lone_server):
    engine_pid = lone_server.admin_models()["llama"]["replicas"][0]["pid"]
    with lone_server.http() as http:
        result = {}
        running = threading.Thread(target=lambda: result.update(response=http.post("/v1/completions", json={
            **COMPLETION, "max_tokens": 300, "ignore_eos": True})))
        running.start()
        while not lone_server.admin_models()["llama"]["num_inflight"]:
            time.sleep(0.02)
        lone_server.process.send_signal(signal.SIGTERM)
        time.sleep(0.2)
        refused = http.post("/v1/completions", json=COMPLETION)
        assert_error(refused, 503)
        assert refused.headers["Retry-After"]
        assert http.get("/ready").status_code == 503 and http.get("/health").status_code == 200
        running.join()
    assert result["response"].status_code == 200
    assert result["response"].json()["usage"]["completion_tokens"] == 300
    assert lone_server.process.wait(30) == 0  # the drain ends in a clean exit...
    with pytest.raises(ProcessLookupError):  # ...with its engine gone
        os.kill(engine_pid, 0)
