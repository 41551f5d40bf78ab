"""Beam search online: `use_beam_search` on chat (and completions, in test_api.py) through the in-process server and
the openai client, and once through an engine process (keep_kv, kv_parent and ReleaseKV cross the socket); choices
best first and equal to the offline search; the K/V the steps kept all goes back; bad combinations are 400s naming
the field."""

import time

import openai
import pytest

from engine import LLM, BeamSearchParams
from helpers_server import ADMIN_KEY, long_llama, model_config, run_server, server_config

pytest_plugins = ["helpers_server"]

MESSAGES = [{"role": "user", "content": "Name a colour."}]


@pytest.fixture(scope="module")
def client(api_server):
    return api_server.client()


def _core(api_server, model: str):
    return api_server.supervisor.resolve(model)[0].replicas[0]._engine_loop.core


def _prompt_ids(api_server, messages) -> list[int]:
    with api_server.http() as http:
        return http.post("/tokenize", json={"model": "qwen", "messages": messages}).json()["tokens"]


def _wait_for_release(core) -> None:
    """The search's last ReleaseKV reaches the engine's thread after the response."""
    deadline = time.monotonic() + 10
    while core.kv_manager.num_kept and time.monotonic() < deadline:
        time.sleep(0.01)


def test_chat_beam_search_equals_the_offline_search_best_first(api_server, client, tiny_model):
    core = _core(api_server, "qwen")
    free_at_start = core.kv_manager.num_free_blocks
    response = client.chat.completions.create(
        model="qwen", messages=MESSAGES, max_tokens=5, n=3,
        extra_body={"use_beam_search": True, "ignore_eos": True, "length_penalty": 0.5, "early_stopping": True})
    offline = LLM(tiny_model("qwen3"), device="cpu", dtype="float32", num_kv_blocks=64)
    expected = offline.beam_search([_prompt_ids(api_server, MESSAGES)],
                                   BeamSearchParams(beam_width=3, max_tokens=5, ignore_eos=True, length_penalty=0.5,
                                                    early_stopping=True))[0].sequences
    assert [c.message.content for c in response.choices] == [s.text for s in expected]
    assert [c.index for c in response.choices] == [0, 1, 2]
    assert all(c.finish_reason == "length" and c.message.role == "assistant" for c in response.choices)
    assert response.id.startswith("chatcmpl-") and response.usage.completion_tokens == 15
    _wait_for_release(core)
    assert core.kv_manager.num_kept == 0 and core.kv_manager.num_free_blocks == free_at_start


def test_completions_beam_search_gives_its_blocks_back(api_server, client):
    core = _core(api_server, "qwen")
    free_at_start = core.kv_manager.num_free_blocks
    for i in range(5):
        completion = client.completions.create(model="qwen", prompt=[f"Count {i}:", "The sky is"], max_tokens=4,
                                               n=2, extra_body={"use_beam_search": True})
        assert [c.index for c in completion.choices] == [0, 1, 2, 3]
    _wait_for_release(core)
    assert core.kv_manager.num_kept == 0 and core.kv_manager.num_free_blocks == free_at_start


@pytest.mark.parametrize("route, body, param", [
    ("chat", {"temperature": 0.7}, "temperature"),
    ("chat", {"stream": True}, "stream"),
    ("chat", {"logprobs": True}, "logprobs"),
    ("chat", {"response_format": {"type": "json_object"}}, "response_format"),
    ("chat", {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ("chat", {"n": 5}, "n"),  # the server's max_n is 4
    ("completions", {"n": 5}, "n"),
    ("completions", {"temperature": 1.0}, "temperature"),
])
def test_beam_search_refuses_what_it_cannot_honour(client, route, body, param):
    extra = {"use_beam_search": True, **{k: v for k, v in body.items() if k not in ("n", "temperature", "stream")}}
    kwargs = {k: v for k, v in body.items() if k in ("n", "temperature", "stream")}
    with pytest.raises(openai.BadRequestError) as e:
        if route == "chat":
            client.chat.completions.create(model="qwen", messages=MESSAGES, max_tokens=3, extra_body=extra, **kwargs)
        else:
            client.completions.create(model="qwen", prompt="Hi", max_tokens=3, extra_body=extra, **kwargs)
    assert e.value.status_code == 400 and e.value.body["param"] == param


def test_beam_search_through_an_engine_process_frees_every_block(tiny_model, tmp_path):
    with run_server(server_config([model_config("llama", long_llama(tiny_model))]), tmp_path) as server:
        response = server.client().chat.completions.create(
            model="llama", messages=MESSAGES, max_tokens=6, n=3, extra_body={"use_beam_search": True,
                                                                            "ignore_eos": True})
        with server.http() as http:
            prompt = http.post("/tokenize", json={"model": "llama", "messages": MESSAGES}).json()["tokens"]
        offline = LLM(long_llama(tiny_model), device="cpu", dtype="float32", num_kv_blocks=300)
        expected = offline.beam_search([prompt], BeamSearchParams(beam_width=3, max_tokens=6, ignore_eos=True))
        assert [c.message.content for c in response.choices] == [s.text for s in expected[0].sequences]
        with server.http(ADMIN_KEY) as admin:
            deadline = time.monotonic() + 10
            while (used := admin.get("/admin/stats").json()["models"][0]["kv"]["num_used_blocks"]) and (
                    time.monotonic() < deadline):
                time.sleep(0.2)
        assert used == 0
