"""Strict requests and vLLM/OpenAI parity, through HTTP: unknown and unsupported fields refused (or, under
`server.ignore_unknown_fields`, ignored with a warning), OpenAI's ranges and combinations, the sampling extras end to
end (bad_words, allowed_token_ids, prompt_logprobs, truncate_prompt_tokens, cache_salt, continue_final_message,
documents, chat_template_kwargs), the stream's shape (role chunk, no usage key unless asked), system_fingerprint,
405's Allow header and the OpenAPI document.

Most tests share the session's server (`api_server`: `llama` with 2048 tokens of context, `qwen` with 512, greedy);
those that need a custom chat template or the lenient switch share `lenient_server`.
"""

import json
import logging

import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import API_KEY, model_config, run_inprocess, server_config
from test_api_errors import CHAT, COMPLETION, assert_error

pytest_plugins = ["helpers_server"]

GREEDY = {"model": "qwen", "temperature": 0, "ignore_eos": True}
TEMPLATE = ("{% if documents %}[docs:{% for d in documents %}{{ d['text'] }};{% endfor %}]{% endif %}"
            "{% if greeting is defined %}[greeting:{{ greeting }}]{% endif %}"
            "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}{% if not loop.last or not "
            "continue_final_message %}</{{ m['role'] }}>{% endif %}{% endfor %}"
            "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture
def http(api_server):
    with api_server.http() as client:
        yield client


@pytest.fixture(scope="module")
def lenient_server(tiny_model):
    config = server_config([model_config("t", tiny_model("llama"), chat_template=TEMPLATE)],
                           ignore_unknown_fields=True)
    with run_inprocess(config) as server:
        yield server


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "frobnicate": 1}, "frobnicate"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": "Hi", "mood": "x"}]},
     "messages[0].mood"),
    ("/v1/chat/completions", {**CHAT, "stream": True, "stream_options": {"include_usage": True, "x": 1}},
     "stream_options.x"),
    ("/v1/completions", {**COMPLETION, "max_token": 3}, "max_token"),
    ("/v1/completions", {**COMPLETION, "response_format": {"type": "json_object", "strictness": 1}},
     "response_format.strictness"),
    ("/tokenize", {"model": "llama", "prompt": "Hi", "add_special_token": False}, "add_special_token"),
    ("/detokenize", {"model": "llama", "tokens": [1], "skip": True}, "skip"),
])
def test_unknown_fields_are_refused_naming_their_path(http, path, body, param):
    assert "unknown field" in assert_error(http.post(path, json=body), 400, param)["message"]


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "best_of": 2}, "best_of"),
    ("/v1/completions", {**COMPLETION, "suffix": "!"}, "suffix"),
    ("/v1/chat/completions", {**CHAT, "functions": [{"name": "f"}]}, "functions"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [
        {"image_url": {"url": "http://x/y.png"}, "type": "image_url"}]}]}, "messages[0].content[0].image_url"),
])
def test_known_but_unsupported_fields_are_refused(http, path, body, param):
    assert "not supported" in assert_error(http.post(path, json=body), 400, param)["message"]


def test_the_lenient_switch_ignores_unknown_fields_with_a_warning_but_never_unsupported_ones(lenient_server,
                                                                                                caplog):
    body = {"model": "t", "messages": [{"role": "user", "content": "Hi", "mood": 1}], "max_tokens": 2, "x": {}}
    with lenient_server.http() as http, caplog.at_level(logging.WARNING, "kvbox.api"):
        assert http.post("/v1/chat/completions", json=body).status_code == 200
        assert "messages[0].mood" in caplog.text and ", x" in caplog.text
        assert_error(http.post("/v1/chat/completions", json={**body, "best_of": 2}), 400, "best_of")
        assert_error(http.post("/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x", "y": 1},
                               headers={"Authorization": "Bearer sk-test-admin-key"}), 400, "y")


@pytest.mark.parametrize("path, body, param", [
    ("/v1/chat/completions", {**CHAT, "stream_options": {"include_usage": True}}, "stream_options"),
    ("/v1/chat/completions", {**CHAT, "temperature": 3}, "temperature"),
    ("/v1/completions", {**COMPLETION, "temperature": 2.5}, "temperature"),
    ("/v1/completions", {**COMPLETION, "model": "qwen", "max_tokens": 600}, "max_tokens"),  # 512 of context
    ("/v1/chat/completions", {**CHAT, "model": "qwen", "max_completion_tokens": 510}, "max_completion_tokens"),
    ("/v1/completions", {**COMPLETION, "prompt_logprobs": 1, "stream": True}, "prompt_logprobs"),
    ("/v1/completions", {**COMPLETION, "prompt_logprobs": 6}, "prompt_logprobs"),  # server.max_logprobs is 5
    ("/v1/completions", {**COMPLETION, "truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
    ("/v1/completions", {**COMPLETION, "allowed_token_ids": []}, "allowed_token_ids"),
    ("/v1/completions", {**COMPLETION, "allowed_token_ids": [10**6]}, "allowed_token_ids[0]"),
    ("/v1/completions", {**COMPLETION, "bad_words": [" "]}, "bad_words[0]"),
    ("/v1/chat/completions", {**CHAT, "continue_final_message": True}, "continue_final_message"),
    ("/v1/chat/completions", {**CHAT, "chat_template_kwargs": {"tokenize": True}}, "chat_template_kwargs.tokenize"),
    ("/v1/chat/completions", {**CHAT, "seed": 2**64}, "seed"),
    ("/v1/completions", {**COMPLETION, "seed": -(2**63) - 1}, "seed"),
    ("/v1/completions", {**COMPLETION, "seed": 15045384408074686201593856}, "seed"),
    ("/v1/completions", {**COMPLETION, "top_k": 2**63}, "top_k"),
    ("/v1/completions", {**COMPLETION, "priority": 2**70}, "priority"),
    ("/v1/completions", {**COMPLETION, "prompt": [2**32]}, "prompt"),
    ("/v1/completions", {**COMPLETION, "prompt": [[1, 2**64]]}, "prompt[0][1]"),
    ("/v1/chat/completions", {**CHAT, "messages": [{"role": "user", "content": [{"text": "Hi"}]}]},
     "messages[0].content[0].type"),
    ("/tokenize", {"model": "llama", "messages": [{"role": "user", "content": [{"text": "Hi"}]}]},
     "messages[0].content[0].type"),
])
def test_openai_and_vllm_ranges_and_combinations(http, path, body, param):
    assert_error(http.post(path, json=body), 400, param)
    assert http.post("/v1/chat/completions", json=CHAT).status_code == 200


def test_a_default_max_tokens_is_lowered_to_fit_not_refused(http):
    prompt = list(range(1, 500))  # qwen's context is 512: chat's and completions' defaults must still fit
    assert http.post("/v1/completions", json={**GREEDY, "prompt": prompt}).status_code == 200


def test_405_carries_allow(http):
    response = http.get("/v1/completions")
    assert_error(response, 405)
    assert "POST" in response.headers["Allow"].split(", ") and "GET" not in response.headers["Allow"]


def sse(response) -> list[dict]:
    return [json.loads(line[6:]) for line in response.iter_lines() if line.startswith("data: {")]


def test_chat_stream_opens_with_a_role_chunk_and_omits_usage_unless_asked(http):
    body = {**CHAT, "model": "qwen", "stream": True, "n": 2, "max_tokens": 3}
    with http.stream("POST", "/v1/chat/completions", json=body) as response:
        chunks = sse(response)
    assert [c["choices"][0]["delta"] for c in chunks[:2]] == [{"role": "assistant", "content": ""}] * 2
    assert {c["choices"][0]["index"] for c in chunks[:2]} == {0, 1}
    assert all("role" not in c["choices"][0]["delta"] for c in chunks[2:])
    assert all("usage" not in c and c["system_fingerprint"].startswith("fp_") for c in chunks)
    with http.stream("POST", "/v1/chat/completions",
                     json={**body, "stream_options": {"include_usage": True}}) as response:
        chunks = sse(response)
    assert all(c["usage"] is None for c in chunks[:-1]) and chunks[-1]["usage"]["completion_tokens"] == 6


def test_completion_stream_omits_usage_and_responses_carry_a_fingerprint(api_server):
    client = api_server.client()
    chunks = list(client.completions.create(model="qwen", prompt="Hi", max_tokens=3, stream=True))
    assert chunks and all(c.usage is None and "usage" not in c.model_extra for c in chunks)
    chat = client.chat.completions.create(model="qwen", messages=[{"role": "user", "content": "Hi"}], max_tokens=2)
    completion = client.completions.create(model="qwen", prompt="Hi", max_tokens=2)
    assert chat.system_fingerprint == completion.system_fingerprint and chat.system_fingerprint.startswith("fp_")
    llama = client.completions.create(model="llama", prompt="Hi", max_tokens=2)
    assert llama.system_fingerprint != completion.system_fingerprint


def test_allowed_token_ids_and_bad_words_steer_sampling(http):
    allowed = http.post("/v1/completions", json={**GREEDY, "prompt": "The quick", "max_tokens": 4, "logprobs": 0,
                                                 "allowed_token_ids": [42, 43], "temperature": 1.0, "seed": 1})
    tokens = http.post("/detokenize", json={"model": "qwen", "tokens": [42, 43]}).json()
    assert allowed.status_code == 200, allowed.text
    assert set(allowed.json()["choices"][0]["text"]) <= set(tokens["prompt"])
    plain = http.post("/v1/completions", json={**GREEDY, "prompt": "The quick", "max_tokens": 4, "logprobs": 0})
    first = plain.json()["choices"][0]["logprobs"]["tokens"][0]
    banned = http.post("/v1/completions", json={**GREEDY, "prompt": "The quick", "max_tokens": 4, "logprobs": 0,
                                                "bad_words": [first]})
    assert banned.status_code == 200, banned.text
    assert banned.json()["choices"][0]["logprobs"]["tokens"][0] != first


def test_prompt_logprobs_on_completions_and_chat(http):
    prompt = [5, 6, 7, 8]
    body = {**GREEDY, "prompt": prompt, "max_tokens": 1, "prompt_logprobs": 2}
    entries = http.post("/v1/completions", json=body).json()["choices"][0]["prompt_logprobs"]
    assert len(entries) == 4 and entries[0] is None
    for token, entry in zip(prompt[1:], entries[1:]):
        assert str(token) in entry and 2 <= len(entry) <= 3
        assert sorted(e["rank"] for e in entry.values() if e is not entry[str(token)])[:2] in ([1, 2], [1])
        assert all(e["logprob"] <= 0 and isinstance(e["decoded_token"], str) for e in entry.values())
    echoed = http.post("/v1/completions", json={**GREEDY, "prompt": prompt, "max_tokens": 1, "echo": True,
                                                "logprobs": 1}).json()["choices"][0]
    assert [list(e) if e else None for e in echoed["prompt_logprobs"]][0] is None
    assert echoed["logprobs"]["token_logprobs"][1] == pytest.approx(entries[1]["6"]["logprob"])
    plain = http.post("/v1/completions", json={**GREEDY, "prompt": prompt, "max_tokens": 1}).json()["choices"][0]
    assert "prompt_logprobs" not in plain
    chat = http.post("/v1/chat/completions", json={**CHAT, "model": "qwen", "prompt_logprobs": 1}).json()
    assert chat["prompt_logprobs"][0] is None and len(chat["prompt_logprobs"]) == chat["usage"]["prompt_tokens"]


def test_truncate_prompt_tokens_keeps_the_last_tokens(http):
    body = {**GREEDY, "prompt": list(range(10, 40)), "max_tokens": 1, "echo": True, "truncate_prompt_tokens": 5}
    response = http.post("/v1/completions", json=body).json()
    assert response["usage"]["prompt_tokens"] == 5
    tail = http.post("/detokenize", json={"model": "qwen", "tokens": list(range(35, 40))}).json()["prompt"]
    assert response["choices"][0]["text"].startswith(tail)


def test_cache_salt_separates_prefix_caches(http):
    prompt = list(range(100, 180))

    def cached(**salt) -> int:
        body = {**GREEDY, "prompt": prompt, "max_tokens": 1, **salt}
        return http.post("/v1/completions", json=body).json()["usage"]["prompt_tokens_details"]["cached_tokens"]

    cached(cache_salt="a")
    assert cached(cache_salt="a") > 0
    assert cached(cache_salt="b") == 0
    assert cached() == 0


def test_the_chat_template_gets_documents_kwargs_and_continues_the_last_message(lenient_server):
    messages = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "The answer is"}]

    def rendered(**options) -> str:
        with lenient_server.http() as http:
            tokens = http.post("/tokenize", json={"model": "t", "messages": messages, **options}).json()["tokens"]
            return http.post("/detokenize", json={"model": "t", "tokens": tokens}).json()["prompt"]

    assert rendered(add_generation_prompt=False, continue_final_message=True).endswith("<assistant>The answer is")
    assert rendered().endswith("</assistant><assistant>")
    assert rendered(chat_template_kwargs={"greeting": "hello"}).startswith("[greeting:hello]")
    client = lenient_server.client()
    options = {"add_generation_prompt": False, "continue_final_message": True}

    def prompt_tokens(**extra) -> int:
        return client.chat.completions.create(model="t", messages=messages, max_tokens=1,
                                              extra_body={**options, **extra}).usage.prompt_tokens

    with lenient_server.http() as http:
        docs = http.post("/tokenize", json={"model": "t", "prompt": "[docs:kv caches;]",
                                            "add_special_tokens": False}).json()["count"]
    assert prompt_tokens(documents=[{"title": "a", "text": "kv caches"}]) == prompt_tokens() + docs


def test_openapi_describes_every_route_and_its_body(api_server):
    with api_server.http(key=None) as anonymous:
        assert_error(anonymous.get("/openapi.json"), 401)
    with api_server.http() as http:
        document = http.get("/openapi.json").json()
    paths = document["paths"]
    for path in ["/v1/completions", "/v1/chat/completions", "/v1/models", "/tokenize", "/detokenize",
                 "/v1/load_lora_adapter", "/admin/reload", "/health"]:
        assert path in paths, path
    schemas = document["components"]["schemas"]
    for path, name in [("/v1/chat/completions", "ChatCompletionRequest"), ("/v1/completions", "CompletionRequest"),
                       ("/tokenize", "TokenizeRequest")]:
        body = paths[path]["post"]["requestBody"]["content"]["application/json"]["schema"]
        assert body == {"$ref": f"#/components/schemas/{name}"}
        assert schemas[name]["additionalProperties"] is False
    assert "model" in schemas["CompletionRequest"]["required"] and "prompt" in schemas["CompletionRequest"]["required"]
    chat = schemas["ChatCompletionRequest"]["properties"]
    assert chat["messages"]["items"] == {"$ref": "#/components/schemas/ChatMessage"}
    assert {"maximum": 2**63 - 1, "minimum": -(2**63)}.items() <= chat["seed"]["anyOf"][0].items()
    assert API_KEY not in json.dumps(document)
