"""Tool calling and reasoning output: the parsers and stream splitters on known texts, and through HTTP with the
`openai` client: required and named tool choices forced by a grammar (arguments validate against the tool's
schema, even on random weights), streamed as OpenAI's deltas; tools and chat_template_kwargs reach the template."""

import json

import jsonschema
import pytest

pytest.register_assert_rewrite("helpers_server")
from appliance.openai.reasoning import ReasoningStream, split_reasoning
from appliance.openai.tool_parsers import parser_for
from appliance.openai.tools import ToolPlan, ToolStream
from helpers_server import model_config, run_inprocess, server_config

WEATHER = {"type": "object", "properties": {"city": {"enum": ["Paris", "Oslo"]},
                                            "days": {"type": "integer", "minimum": 1, "maximum": 7}},
           "required": ["city", "days"], "additionalProperties": False}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Forecast", "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"enum": ["UTC", "CET"]}}, "required": ["zone"]}}}]
SCHEMAS = {t["function"]["name"]: t["function"]["parameters"] for t in TOOLS}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
# A Hermes-style template: tools listed in the system turn, thinking switched off by enable_thinking=false.
TEMPLATE = (
    "{% if tools %}<|im_start|>system\n<tools>{% for t in tools %}{{ t | tojson }}{% endfor %}</tools><|im_end|>\n"
    "{% endif %}{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] or '' }}"
    "{% for c in m.get('tool_calls') or [] %}<tool_call>{{ c.function | tojson }}</tool_call>{% endfor %}"
    "<|im_end|>\n{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and not enable_thinking %}<think>\n\n</think>\n\n{% endif %}{% endif %}")


@pytest.fixture(scope="module")
def server(tiny_model):
    source = tiny_model("llama", max_position_embeddings=1024)
    config = server_config([
        model_config("hermes", source, chat_template=TEMPLATE, tool_parser="auto", reasoning_parser="qwen3"),
        model_config("plain", source)])
    with run_inprocess(config) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return server.client()


@pytest.mark.parametrize("parallel", [True, False])
def test_required_calls_validate_against_their_tools(client, parallel):
    response = client.chat.completions.create(model="plain", messages=MESSAGES, tools=TOOLS, tool_choice="required",
                                              parallel_tool_calls=parallel, max_tokens=300, seed=2)
    choice = response.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls
    assert parallel or len(choice.message.tool_calls) == 1
    for call in choice.message.tool_calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_named_function_is_called_with_valid_arguments(client):
    response = client.chat.completions.create(
        model="plain", messages=MESSAGES, tools=TOOLS, max_tokens=60, seed=3,
        tool_choice={"type": "function", "function": {"name": "get_weather"}})
    choice = response.choices[0]
    assert choice.finish_reason == "stop" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER)


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_streamed_tool_calls_assemble(client, tool_choice):
    stream = client.chat.completions.create(model="plain", messages=MESSAGES, tools=TOOLS, tool_choice=tool_choice,
                                            max_tokens=300, seed=4, stream=True)
    calls, finish = {}, None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"name": "", "arguments": ""})
                call["id"] = delta.id or call.get("id")
                call["name"] += delta.function.name or ""
                call["arguments"] += delta.function.arguments or ""
    assert calls and finish == ("tool_calls" if tool_choice == "required" else "stop")
    for call in calls.values():
        assert call["id"].startswith("call_")
        jsonschema.validate(json.loads(call["arguments"]), SCHEMAS[call["name"]])


def test_auto_passes_tools_to_the_template_and_answers_in_text(client):
    plain = client.chat.completions.create(model="hermes", messages=MESSAGES, max_tokens=4, temperature=0)
    with_tools = client.chat.completions.create(model="hermes", messages=MESSAGES, tools=TOOLS, max_tokens=4,
                                                temperature=0)
    assert with_tools.usage.prompt_tokens > plain.usage.prompt_tokens + 20
    assert with_tools.choices[0].finish_reason in ("stop", "length") and not with_tools.choices[0].message.tool_calls


def test_history_with_tool_calls_and_enable_thinking(client):
    history = [*MESSAGES, {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                          "arguments": '{"city": "Paris", "days": 1}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    thinking = client.chat.completions.create(model="hermes", messages=history, tools=TOOLS, max_tokens=3)
    quiet = client.chat.completions.create(model="hermes", messages=history, tools=TOOLS, max_tokens=3,
                                           extra_body={"chat_template_kwargs": {"enable_thinking": False}})
    assert quiet.usage.prompt_tokens > thinking.usage.prompt_tokens


@pytest.mark.parametrize("body, param", [
    ({"tool_choice": "auto", "tools": TOOLS, "model": "plain"}, "tool_choice"),  # no parser configured
    ({"tool_choice": "required"}, "tool_choice"),  # no tools
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice.function.name"),
    ({"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}}, "tool_choice"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "wat"}}}],
      "tool_choice": "required"}, "tools"),
])
def test_bad_tool_requests_are_400s(server, body, param):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "hermes", "messages": MESSAGES, **body})
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == param


@pytest.mark.parametrize("name, text, content, calls", [
    ("hermes", 'Sure.\n<tool_call>\n{"name": "f", "arguments": {"a": 1}}\n</tool_call>\n'
               '<tool_call>{"name": "g", "arguments": {}}</tool_call>', "Sure.", [("f", '{"a": 1}'), ("g", "{}")]),
    ("hermes", "no calls here", "no calls here", []),
    ("hermes", "<tool_call>{broken</tool_call>", "<tool_call>{broken</tool_call>", []),
    ("llama3_json", '<|python_tag|>{"name": "f", "parameters": {"a": 1}}; {"name": "g", "parameters": {}}', "",
     [("f", '{"a": 1}'), ("g", "{}")]),
    ("llama3_json", "The answer is {1}", "The answer is {1}", []),
    ("mistral", 'ok [TOOL_CALLS][{"name": "f", "arguments": {"a": 1}}]', "ok", [("f", '{"a": 1}')]),
    ("mistral", '[TOOL_CALLS]f[ARGS]{"a": 1}[TOOL_CALLS]g[ARGS]{}', "", [("f", '{"a": 1}'), ("g", "{}")]),
])
def test_parsers(name, text, content, calls):
    parsed = parser_for(name, None).parse(text)
    assert (parsed.content, [tuple(c) for c in parsed.calls]) == (content, calls)


def test_auto_parser_follows_the_template():
    assert type(parser_for("auto", TEMPLATE)).__name__ == "HermesParser"
    assert type(parser_for("auto", "{{ '[TOOL_CALLS]' }}")).__name__ == "MistralParser"
    assert parser_for("auto", "{{ messages }}") is None


def test_tool_stream_holds_back_a_call_and_streams_the_rest():
    stream = ToolStream(ToolPlan("auto", TOOLS, parser_for("hermes", None)))
    pieces = ["Let me ", "check.<tool", '_call>{"name": "get_time", ', '"arguments": {"zone": "UTC"}}</tool_call>']
    out = [stream.feed(p, final=False) for p in pieces] + [stream.feed("", final=True)]
    assert "".join(c for c, _ in out) == "Let me check."
    (call,) = out[-1][1]
    assert call.function == {"name": "get_time", "arguments": '{"zone": "UTC"}'} and stream.calls


@pytest.mark.parametrize("parser, text, reasoning, content", [
    ("qwen3", "<think>\nhmm\n</think>\n\nHello", "hmm", "Hello"),
    ("qwen3", "Hello", None, "Hello"),
    ("deepseek_r1", "hmm</think>Hello", "hmm", "Hello"),
    ("deepseek_r1", "still thinking", "still thinking", ""),
])
def test_reasoning_split_whole_and_streamed(parser, text, reasoning, content):
    assert split_reasoning(parser, text) == (reasoning, content)
    stream = ReasoningStream(parser)
    pieces = [stream.feed(text[i:i + 3], final=False) for i in range(0, len(text), 3)] + [stream.feed("", True)]
    assert "".join(r for r, _ in pieces).strip("\n") == (reasoning or "")
    assert "".join(c for _, c in pieces) == content
