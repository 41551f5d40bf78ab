"""The bad-input catalogue: named cases over every route, each with the status and `param` it must get, and the
server still serving after each (the `http` fixture checks). Then the YAML loader with broken files: each a
`ConfigError`, never another exception.

The session's server (`api_server`): models `llama` (2048 tokens of context) and `qwen` (512), max_n 4,
max_logprobs 5, max_stop_strings 4, 64 KiB bodies, LoRA off.
"""

import json

import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import ADMIN_KEY, MAX_BODY_BYTES
from test_api_errors import CHAT, COMPLETION, assert_error

from appliance.config import ConfigError, load_config

pytest_plugins = ["helpers_server"]

ADMIN = {"Authorization": f"Bearer {ADMIN_KEY}"}
JSON = {"Content-Type": "application/json"}


def case(name, method, path, body=None, status=400, param=None, *, raw=None, headers=None):
    return pytest.param(method, path, body, raw, headers or {}, status, param, id=name)


def chat(**fields):
    return {**CHAT, **fields}


def completion(**fields):
    return {**COMPLETION, **fields}


def user(content):
    return chat(messages=[{"role": "user", "content": content}])


CASES = [
    # bodies, content types, encodings, sizes
    case("empty body", "POST", "/v1/completions", raw=b""),
    case("truncated json", "POST", "/v1/chat/completions", raw=b'{"model": "llama", "messages": ['),
    case("json array body", "POST", "/v1/completions", raw=b"[]"),
    case("json string body", "POST", "/v1/completions", raw=b'"hi"'),
    case("form body", "POST", "/v1/completions", raw=b"model=llama&prompt=Hi",
         headers={"Content-Type": "application/x-www-form-urlencoded"}),
    case("json under text/plain is read", "POST", "/v1/completions", completion(), 200,
         headers={"Content-Type": "text/plain"}),
    case("gzip content-encoding", "POST", "/v1/completions", completion(), 415, "Content-Encoding",
         headers={"Content-Encoding": "gzip"}),
    case("invalid utf-8", "POST", "/v1/completions", raw=b'{"model": "llama", "prompt": "\xff\xfe"}'),
    case("lone surrogate escape", "POST", "/v1/completions", raw=b'{"model": "llama", "prompt": "\\ud800"}'),
    case("body over max_body_bytes", "POST", "/v1/completions", completion(prompt="x" * MAX_BODY_BYTES), 413),
    case("nesting 5000 deep in a typed field", "POST", "/v1/completions",
         raw=b'{"model": "llama", "prompt": ' + b"[" * 5000 + b"]" * 5000 + b"}", param="prompt[0][0]"),
    case("nesting 3000 deep in free-form kwargs", "POST", "/v1/chat/completions",
         raw=b'{"model": "llama", "messages": [{"role": "user", "content": "Hi"}], "chat_template_kwargs": '
             + b'{"a": ' * 3000 + b"1" + b"}" * 3000 + b"}"),
    case("unknown top-level field", "POST", "/v1/completions", completion(frequency=1), param="frequency"),
    case("unknown nested field", "POST", "/v1/chat/completions",
         chat(messages=[{"role": "user", "content": "Hi", "x": 1}]), param="messages[0].x"),
    case("use_beam_search on chat with temperature", "POST", "/v1/chat/completions",
         chat(use_beam_search=True, temperature=0.5), param="temperature"),
    case("use_beam_search streamed", "POST", "/v1/completions", completion(use_beam_search=True, stream=True),
         param="stream"),
    case("use_beam_search with temperature", "POST", "/v1/completions",
         completion(use_beam_search=True, temperature=0.7), param="temperature"),
    case("use_beam_search with logprobs", "POST", "/v1/completions", completion(use_beam_search=True, logprobs=1),
         param="logprobs"),
    case("use_beam_search with n above max_n", "POST", "/v1/completions", completion(use_beam_search=True, n=9),
         param="n"),
    case("best_of below n", "POST", "/v1/completions", completion(best_of=1, n=2), param="best_of"),
    case("best_of above the server's max_n", "POST", "/v1/completions", completion(best_of=50), param="best_of"),
    case("best_of > n streamed", "POST", "/v1/completions", completion(best_of=2, stream=True), param="best_of"),
    case("best_of of zero", "POST", "/v1/completions", completion(best_of=0), param="best_of"),
    case("best_of on chat", "POST", "/v1/chat/completions", chat(best_of=2), param="best_of"),
    case("missing model", "POST", "/v1/completions", {"prompt": "Hi"}, param="model"),
    case("model of wrong type", "POST", "/v1/completions", completion(model=7), param="model"),
    case("unknown model", "POST", "/v1/completions", completion(model="nope"), 404, "model"),
    case("stream of wrong type", "POST", "/v1/completions", completion(stream="yes"), param="stream"),
    case("stream_options without stream", "POST", "/v1/completions", completion(stream_options={}),
         param="stream_options"),
    # numbers: ranges, int64, floats beyond double
    case("temperature 3", "POST", "/v1/completions", completion(temperature=3), param="temperature"),
    case("temperature 1e999 (infinity)", "POST", "/v1/completions",
         raw=b'{"model": "llama", "prompt": "Hi", "temperature": 1e999}', param="temperature"),
    case("NaN literal", "POST", "/v1/completions", raw=b'{"model": "llama", "prompt": "Hi", "top_p": NaN}'),
    case("Infinity literal", "POST", "/v1/completions",
         raw=b'{"model": "llama", "prompt": "Hi", "top_p": Infinity}'),
    case("top_p 0", "POST", "/v1/completions", completion(top_p=0), param="top_p"),
    case("min_p 2", "POST", "/v1/completions", completion(min_p=2), param="min_p"),
    case("repetition_penalty 0", "POST", "/v1/completions", completion(repetition_penalty=0),
         param="repetition_penalty"),
    case("frequency_penalty -3", "POST", "/v1/completions", completion(frequency_penalty=-3),
         param="frequency_penalty"),
    case("seed 2**64", "POST", "/v1/completions", completion(seed=2**64), param="seed"),
    case("seed below int64", "POST", "/v1/completions", completion(seed=-(2**63) - 1), param="seed"),
    case("top_k 2**63", "POST", "/v1/completions", completion(top_k=2**63), param="top_k"),
    case("top_k -5", "POST", "/v1/completions", completion(top_k=-5), param="top_k"),
    case("priority 2**70", "POST", "/v1/completions", completion(priority=2**70), param="priority"),
    case("n 2**64", "POST", "/v1/completions", completion(n=2**64), param="n"),
    case("huge n under int64", "POST", "/v1/completions", completion(n=10**12), param="n"),
    case("n 0", "POST", "/v1/completions", completion(n=0), param="n"),
    case("max_tokens 2**63", "POST", "/v1/completions", completion(max_tokens=2**63), param="max_tokens"),
    case("max_tokens -1", "POST", "/v1/completions", completion(max_tokens=-1), param="max_tokens"),
    case("max_tokens beyond the context", "POST", "/v1/completions", completion(model="qwen", max_tokens=600),
         param="max_tokens"),
    case("min_tokens above max_tokens", "POST", "/v1/completions", completion(min_tokens=5), param="min_tokens"),
    case("logprobs over the cap", "POST", "/v1/completions", completion(logprobs=6), param="logprobs"),
    case("top_logprobs without logprobs", "POST", "/v1/chat/completions", chat(top_logprobs=1),
         param="top_logprobs"),
    # logit_bias, stop lists, token ids
    case("logit_bias key not a number", "POST", "/v1/completions", completion(logit_bias={"x": 1}),
         param="logit_bias"),
    case("logit_bias key out of vocab", "POST", "/v1/completions", completion(logit_bias={"100000": 1}),
         param="logit_bias"),
    case("logit_bias key beyond int64", "POST", "/v1/completions", completion(logit_bias={str(2**70): 1}),
         param="logit_bias"),
    case("logit_bias negative key", "POST", "/v1/completions", completion(logit_bias={"-1": 1}),
         param="logit_bias"),
    case("logit_bias value 101", "POST", "/v1/completions", completion(logit_bias={"5": 101}), param="logit_bias"),
    case("too many stop strings", "POST", "/v1/completions", completion(stop=list("abcde")), param="stop"),
    case("empty stop string", "POST", "/v1/completions", completion(stop=[""]), param="stop[0]"),
    case("stop of wrong type", "POST", "/v1/completions", completion(stop=[1]), param="stop[0]"),
    case("stop_token_ids out of vocab", "POST", "/v1/completions", completion(stop_token_ids=[10**6]),
         param="stop_token_ids[0]"),
    case("stop_token_ids negative", "POST", "/v1/completions", completion(stop_token_ids=[-1]),
         param="stop_token_ids[0]"),
    case("empty prompt list", "POST", "/v1/completions", completion(prompt=[]), param="prompt"),
    case("empty token list in list", "POST", "/v1/completions", completion(prompt=[[]]), param="prompt"),
    case("token id out of vocab", "POST", "/v1/completions", completion(prompt=[1, 100000]), param="prompt"),
    case("token id 2**32", "POST", "/v1/completions", completion(prompt=[2**32]), param="prompt"),
    case("token id beyond int64", "POST", "/v1/completions", completion(prompt=[2**64]), param="prompt[0]"),
    case("negative token id", "POST", "/v1/completions", completion(prompt=[-1]), param="prompt[0]"),
    case("mixed prompt list", "POST", "/v1/completions", completion(prompt=["a", 1]), param="prompt"),
    case("prompt longer than the context", "POST", "/v1/completions", completion(model="qwen",
                                                                                 prompt=list(range(600))),
         param="prompt"),
    # unicode edge cases that must be served
    case("NUL in a prompt", "POST", "/v1/completions", completion(prompt="a\u0000b"), 200),
    case("emoji and combining marks", "POST", "/v1/completions", completion(prompt="e\u0301 \U0001F600 \u202e"),
         200),
    case("non-BMP stop string", "POST", "/v1/completions", completion(stop=["\U0001F600"]), 200),
    # chat roles and content parts
    case("no messages", "POST", "/v1/chat/completions", chat(messages=[]), param="messages"),
    case("unknown role", "POST", "/v1/chat/completions", chat(messages=[{"role": "robot", "content": "x"}]),
         param="messages[0].role"),
    case("missing role", "POST", "/v1/chat/completions", chat(messages=[{"content": "x"}]),
         param="messages[0].role"),
    case("user message without content", "POST", "/v1/chat/completions", chat(messages=[{"role": "user"}]),
         param="messages[0].content"),
    case("content part without type", "POST", "/v1/chat/completions", user([{"text": "Hi"}]),
         param="messages[0].content[0].type"),
    case("content part of unknown type", "POST", "/v1/chat/completions", user([{"type": "video", "text": "x"}]),
         param="messages[0].content[0].type"),
    case("image part on a text model", "POST", "/v1/chat/completions",
         user([{"type": "image_url", "image_url": {"url": "file:///etc/passwd"}}]),
         param="messages[0].content[0].type"),
    case("content part without text", "POST", "/v1/chat/completions", user([{"type": "text"}]),
         param="messages[0].content[0].text"),
    case("request-supplied chat template", "POST", "/v1/chat/completions", chat(chat_template="{{ 7 * 7 }}"),
         param="chat_template"),
    case("reserved template kwarg", "POST", "/v1/chat/completions",
         chat(chat_template_kwargs={"chat_template": "x"}), param="chat_template_kwargs.chat_template"),
    case("continue without an assistant message", "POST", "/v1/chat/completions",
         chat(continue_final_message=True, add_generation_prompt=False), param="continue_final_message"),
    case("tokenize part without type", "POST", "/tokenize",
         {"model": "llama", "messages": [{"role": "user", "content": [{"text": "Hi"}]}]},
         param="messages[0].content[0].type"),
    case("tokenize prompt and messages", "POST", "/tokenize",
         {"model": "llama", "prompt": "x", "messages": [{"role": "user", "content": "x"}]}, param="prompt"),
    case("detokenize negative id", "POST", "/detokenize", {"model": "llama", "tokens": [-1]}, param="tokens[0]"),
    case("detokenize out of vocab", "POST", "/detokenize", {"model": "llama", "tokens": [10**6]}, param="tokens"),
    # headers, methods, paths
    case("no API key", "POST", "/v1/completions", completion(), 401, headers={"Authorization": ""}),
    case("wrong API key", "POST", "/v1/completions", completion(), 401, headers={"Authorization": "Bearer x"}),
    case("request id too long", "POST", "/v1/completions", completion(), param="X-Request-Id",
         headers={"X-Request-Id": "a" * 1000}),
    case("request id with control characters", "POST", "/v1/completions", completion(), param="X-Request-Id",
         headers={"X-Request-Id": "bad id\x01"}),
    case("GET on a POST route", "GET", "/v1/chat/completions", status=405),
    case("unknown route", "GET", "/v1/nothing", status=404),
    case("unknown model card", "GET", "/v1/models/nope", status=404, param="model"),
    # adapters and admin routes
    case("load adapter without admin key", "POST", "/v1/load_lora_adapter", {"lora_name": "a", "lora_path": "/x"},
         401),
    case("load adapter, LoRA off", "POST", "/v1/load_lora_adapter",
         {"lora_name": "a", "lora_path": "../../etc"}, param="base_model", headers=ADMIN),
    case("load adapter, unknown field", "POST", "/v1/load_lora_adapter",
         {"lora_name": "a", "lora_path": "/x", "force": True}, param="force", headers=ADMIN),
    case("admin adapter load, LoRA off", "POST", "/admin/models/llama/loras", {"name": "a", "path": "/etc"},
         param="model", headers=ADMIN),
    case("admin adapter of unknown model", "GET", "/admin/models/nope/loras", status=404, param="model",
         headers=ADMIN),
    case("admin unload unknown adapter", "DELETE", "/admin/models/llama/loras/zz", status=404, param="lora_name",
         headers=ADMIN),
    case("admin route with an API key only", "GET", "/admin/models", status=401),
    case("admin reload with GET", "GET", "/admin/reload", status=405, headers=ADMIN),
]


@pytest.fixture
def http(api_server):
    with api_server.http() as client:
        yield client
        assert client.post("/v1/chat/completions", json=CHAT).status_code == 200


@pytest.mark.parametrize("method, path, body, raw, headers, status, param", CASES)
def test_bad_input(http, method, path, body, raw, headers, status, param):
    content = raw if raw is not None else json.dumps(body).encode() if body is not None else None
    response = http.request(method, path, content=content, headers={**JSON, **headers})
    if status == 200:
        assert response.status_code == 200, response.text
    else:
        assert_error(response, status, param)


def test_the_catalogue_is_large_enough():
    assert len(CASES) >= 60


BROKEN_YAML = {
    "syntax error": "models: [\n",
    "tab indentation": "models:\n\t- name: m\n",
    "empty file": "",
    "a list at the top": "- a\n- b\n",
    "unknown top-level key": "modelz: []\n",
    "unknown model key": "models:\n  - name: m\n    source: builtin:tiny\n    sauce: x\n",
    "wrong type": "models:\n  - name: m\n    source: builtin:tiny\n    queue_cap: many\n",
    "negative cap": "server:\n  max_n: -1\nmodels:\n  - name: m\n    source: builtin:tiny\n",
    "int64 overflow": "server:\n  port: 99999999999999999999999\nmodels:\n  - name: m\n    source: builtin:tiny\n",
    "duplicate model names": "models:\n  - name: m\n    source: builtin:tiny\n  - name: m\n    source: builtin:tiny\n",
    "python object tag": "models: !!python/object/apply:os.system ['true']\n",
    "zero read deadline": "server:\n  request_read_timeout_s: 0\nmodels:\n  - name: m\n    source: builtin:tiny\n",
    "negative write stall": "server:\n  write_stall_timeout_s: -1\nmodels:\n  - name: m\n    source: builtin:tiny\n",
}


@pytest.mark.parametrize("data", [t.encode() for t in BROKEN_YAML.values()] + [b"\x00\x01\x02\xff"],
                         ids=[*BROKEN_YAML, "binary garbage"])
def test_the_yaml_loader_refuses_broken_files_with_a_config_error(tmp_path, data):
    path = tmp_path / "kvbox.yaml"
    path.write_bytes(data)
    with pytest.raises(ConfigError):
        load_config(path)
