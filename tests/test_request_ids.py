"""One id per request end to end: the client's `X-Request-Id` (checked) or one made up, echoed in the response's
header, carried in the response's `id` and in its engine requests' ids (`<id>-<prompt index>`), which the log
lines name. In process (`api_server`)."""

import logging
import re
import time

import pytest

pytest.register_assert_rewrite("helpers_server")

pytest_plugins = ["helpers_server"]

COMPLETION = {"model": "llama", "prompt": "Hi", "max_tokens": 2}
CHAT = {"model": "qwen", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}


@pytest.fixture
def http(api_server):
    with api_server.http() as client:
        yield client


def test_the_client_id_is_echoed_and_carried_in_the_response_id(http):
    completion = http.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": "trace-1.a:B_2"})
    assert completion.status_code == 200, completion.text
    assert completion.headers["x-request-id"] == "trace-1.a:B_2"
    assert completion.json()["id"] == "cmpl-trace-1.a:B_2"
    chat = http.post("/v1/chat/completions", json=CHAT, headers={"X-Request-Id": "trace-2"})
    assert chat.headers["x-request-id"] == "trace-2" and chat.json()["id"] == "chatcmpl-trace-2"
    with http.stream("POST", "/v1/chat/completions", json={**CHAT, "stream": True},
                     headers={"X-Request-Id": "trace-3"}) as stream:
        assert stream.headers["x-request-id"] == "trace-3"
        ids = {line for line in stream.iter_lines() if line.startswith("data: {")}
    assert ids and all('"id":"chatcmpl-trace-3"' in line for line in ids)


def test_an_id_is_made_when_the_client_gives_none(http):
    first, second = (http.post("/v1/completions", json=COMPLETION) for _ in range(2))
    made = first.headers["x-request-id"]
    assert re.fullmatch(r"[0-9a-f]{32}", made) and first.json()["id"] == f"cmpl-{made}"
    assert second.headers["x-request-id"] != made
    assert http.get("/v1/models").headers["x-request-id"]  # every route answers with one


def test_errors_carry_the_id_too(http):
    response = http.post("/v1/completions", json={**COMPLETION, "model": "nope"}, headers={"X-Request-Id": "lost-1"})
    assert response.status_code == 404 and response.headers["x-request-id"] == "lost-1"


@pytest.mark.parametrize("bad", ["has space", "slash/in/it", "x" * 129, "", "new\tline", "ünï"])
def test_a_bad_id_is_400_naming_the_header(http, bad):
    response = http.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": bad.encode()})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == "X-Request-Id" and error["type"] == "invalid_request_error"
    assert "x-request-id" not in response.headers


def test_an_id_already_running_is_409_and_free_again_once_it_ends(http, api_server):
    body = {**COMPLETION, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with api_server.http() as holder, holder.stream("POST", "/v1/completions", json=body,
                                                    headers={"X-Request-Id": "dup"}) as stream:
        assert stream.status_code == 200
        lines = stream.iter_lines()
        next(lines)
        again = http.post("/v1/completions", json={**COMPLETION, "model": "qwen"}, headers={"X-Request-Id": "dup"})
        assert again.status_code == 409, again.text
        assert again.json()["error"]["param"] == "X-Request-Id"
        assert again.json()["error"]["code"] == "duplicate_request_id"
    deadline = time.monotonic() + 5
    while (reused := http.post("/v1/completions", json=COMPLETION, headers={"X-Request-Id": "dup"})).status_code \
            == 409:  # until the server has noticed the disconnect
        assert time.monotonic() < deadline
        time.sleep(0.02)
    assert reused.status_code == 200, reused.text


def test_log_lines_name_every_engine_request_by_the_one_id(http, caplog):
    body = {"model": "llama", "prompt": ["one", "two"], "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with caplog.at_level(logging.INFO, logger="kvbox"):
        with http.stream("POST", "/v1/completions", json=body, headers={"X-Request-Id": "grep-me"}) as stream:
            next(stream.iter_lines())
        deadline = time.monotonic() + 5
        while "request grep-me: aborted" not in caplog.text and time.monotonic() < deadline:
            time.sleep(0.02)  # until the server has noticed the disconnect
    assert "request grep-me: aborted (grep-me-0, grep-me-1)" in caplog.text
