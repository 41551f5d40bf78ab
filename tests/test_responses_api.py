"""The Responses API through the official `openai` client against an in-process server: `client.responses.create`
plain and streamed (typed events), greedy text identical to chat's on the same conversation, forced tool calls whose
arguments validate, `text.format` json_schema, `previous_response_id` chains (also through a tool call's output),
the bounded store (404 once evicted, deleted, or never stored), logprobs (equal to chat's, streamed with the text
deltas), a stored response replayed as its event stream, and bad requests refused with `param`. Every streamed event
validates against the SDK's typed models."""

import json
from typing import Annotated

import httpx
import jsonschema
import openai
import pydantic
import pytest
from openai.types.responses import ResponseStreamEvent

pytest.register_assert_rewrite("helpers_server")
from helpers_server import API_KEY, model_config, run_inprocess, server_config
from test_tools_reasoning import SCHEMAS, TEMPLATE, TOOLS, WEATHER

FUNCTION_TOOLS = [{"type": "function", **t["function"]} for t in TOOLS]
STORE_MAX = 3


@pytest.fixture(scope="module")
def server(tiny_model):
    source = tiny_model("llama", max_position_embeddings=1024)
    config = server_config([model_config("plain", source, chat_template=TEMPLATE, tool_parser="auto"),
                            model_config("thinker", source, chat_template=TEMPLATE, reasoning_parser="deepseek_r1")],
                           responses_store_max=STORE_MAX)
    with run_inprocess(config) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def _chat_text(client, messages, max_tokens):
    return client.chat.completions.create(model="plain", messages=messages, max_tokens=max_tokens,
                                          temperature=0).choices[0].message.content


def test_plain_response_matches_chat(client):
    response = client.responses.create(model="plain", input="Hello there", instructions="Be brief.",
                                       max_output_tokens=12, temperature=0, metadata={"k": "v"})
    assert response.id.startswith("resp_") and response.object == "response" and response.metadata == {"k": "v"}
    assert response.status in ("completed", "incomplete")
    assert (response.incomplete_details is not None) == (response.status == "incomplete")
    (message,) = response.output
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_")
    chat = client.chat.completions.create(model="plain", max_tokens=12, temperature=0, messages=[
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello there"}])
    assert response.output_text == chat.choices[0].message.content
    assert response.usage.input_tokens == chat.usage.prompt_tokens
    assert response.usage.output_tokens == chat.usage.completion_tokens <= 12
    assert response.usage.total_tokens == response.usage.input_tokens + response.usage.output_tokens


def test_stream_events_assemble_the_response(client):
    whole = client.responses.create(model="plain", input=[{"role": "user", "content": "Tell me"}],
                                    max_output_tokens=16, temperature=0)
    events = list(client.responses.create(model="plain", input=[{"role": "user", "content": "Tell me"}],
                                          max_output_tokens=16, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:5] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added", "response.output_text.delta"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    done = next(e for e in events if e.type == "response.output_text.done")
    final = events[-1].response
    assert text == done.text == final.output_text == whole.output_text
    assert final.usage.output_tokens == whole.usage.output_tokens and final.id.startswith("resp_")
    assert client.responses.retrieve(final.id).output_text == text


@pytest.mark.parametrize("stream", [False, True])
def test_forced_tool_call(client, stream):
    kwargs = dict(model="plain", input="Weather in Paris?", tools=FUNCTION_TOOLS, max_output_tokens=60,
                  extra_body={"seed": 3}, tool_choice={"type": "function", "name": "get_weather"})
    if not stream:
        (call,) = client.responses.create(**kwargs).output
    else:
        events = list(client.responses.create(**kwargs, stream=True))
        call = events[-1].response.output[0]
        deltas = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
        (args_done,) = [e for e in events if e.type == "response.function_call_arguments.done"]
        assert deltas == args_done.arguments == call.arguments
    assert call.type == "function_call" and call.name == "get_weather" and call.call_id.startswith("call_")
    jsonschema.validate(json.loads(call.arguments), WEATHER)


def test_required_tool_calls_validate(client):
    response = client.responses.create(model="plain", input="Weather?", tools=FUNCTION_TOOLS, tool_choice="required",
                                       max_output_tokens=300, extra_body={"seed": 2})
    calls = [item for item in response.output if item.type == "function_call"]
    assert calls and response.status == "completed"
    for call in calls:
        jsonschema.validate(json.loads(call.arguments), SCHEMAS[call.name])


def test_text_format_json_schema(client):
    response = client.responses.create(model="plain", input="Weather as JSON", max_output_tokens=80,
                                       extra_body={"seed": 1},
                                       text={"format": {"type": "json_schema", "name": "w", "schema": WEATHER}})
    assert response.status == "completed" and response.text.format.type == "json_schema"
    jsonschema.validate(json.loads(response.output_text), WEATHER)


def test_previous_response_id_continues_the_conversation(client):
    first = client.responses.create(model="plain", input="Hi", instructions="Old rules.", max_output_tokens=6,
                                    temperature=0)
    second = client.responses.create(model="plain", input="And then?", previous_response_id=first.id,
                                     max_output_tokens=6, temperature=0)
    assert second.previous_response_id == first.id
    # instructions are not carried over (OpenAI's rule): the history is the user turn and the reply
    assert second.output_text == _chat_text(client, [
        {"role": "user", "content": "Hi"}, {"role": "assistant", "content": first.output_text},
        {"role": "user", "content": "And then?"}], 6)


def test_tool_round_trip_by_id_equals_items_sent_back(client):
    forced = dict(tools=FUNCTION_TOOLS, tool_choice={"type": "function", "name": "get_time"})
    first = client.responses.create(model="plain", input="Time?", max_output_tokens=30, extra_body={"seed": 5},
                                    **forced)
    (call,) = first.output
    answer = {"type": "function_call_output", "call_id": call.call_id, "output": "12:00"}
    by_id = client.responses.create(model="plain", input=[answer], previous_response_id=first.id,
                                    tools=FUNCTION_TOOLS, max_output_tokens=5, temperature=0)
    by_items = client.responses.create(model="plain", tools=FUNCTION_TOOLS, max_output_tokens=5, temperature=0,
                                       input=[{"role": "user", "content": "Time?"}, *first.output, answer])
    assert by_id.usage.input_tokens == by_items.usage.input_tokens
    assert by_id.output_text == by_items.output_text


def test_reasoning_items(client):
    response = client.responses.create(model="thinker", input="Think", max_output_tokens=8, temperature=0)
    (item,) = response.output  # a random model never closes </think>: all of it is reasoning
    assert item.type == "reasoning" and item.content[0].text
    assert 0 < response.usage.output_tokens_details.reasoning_tokens <= response.usage.output_tokens
    events = list(client.responses.create(model="thinker", input="Think", max_output_tokens=8, temperature=0,
                                          stream=True))
    deltas = "".join(e.delta for e in events if e.type == "response.reasoning_text.delta")
    assert deltas == item.content[0].text == events[-1].response.output[0].content[0].text


def test_store_is_bounded_and_deletable(client, server):
    kept = [client.responses.create(model="plain", input=f"n{i}", max_output_tokens=1) for i in range(STORE_MAX + 1)]
    with pytest.raises(openai.NotFoundError) as error:
        client.responses.create(model="plain", input="x", previous_response_id=kept[0].id, max_output_tokens=1)
    assert error.value.body["param"] == "previous_response_id"
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept[0].id)
    assert client.responses.retrieve(kept[-1].id).id == kept[-1].id
    client.responses.delete(kept[-1].id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(kept[-1].id)
    unstored = client.responses.create(model="plain", input="x", max_output_tokens=1, store=False)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unstored.id)


@pytest.mark.parametrize("body, param", [
    ({"frobnicate": 1}, "frobnicate"),
    ({"input": []}, "input"),
    ({"input": [{"role": "user", "content": "x", "output": "y"}]}, "input[0].output"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f"}]}, "input[0].arguments"),
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "http://x/y.png"}]}]},
     "input[0].content[0].image_url"),
    ({"input": [{"role": "user", "content": [{"type": "input_file"}]}]}, "input[0].content[0].type"),
    ({"max_output_tokens": 100_000}, "max_output_tokens"),
    ({"temperature": 3}, "temperature"),
    ({"tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"tools": FUNCTION_TOOLS, "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice.name"),
    ({"text": {"format": {"type": "json_schema", "schema": WEATHER}}}, "text.format.name"),
    ({"text": {"format": {"type": "json_schema", "name": "w", "schema": {"type": "wat"}}}}, "text.format.schema"),
    ({"previous_response_id": "resp_missing"}, "previous_response_id"),
    ({"include": ["reasoning.encrypted_content"]}, "include[0]"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"include": ["message.output_text.logprobs"], "top_logprobs": 1000}, "top_logprobs"),
])
def test_bad_requests_name_their_param(server, body, param):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        response = http.post("/v1/responses", json={"model": "plain", "input": "Hi", **body})
    assert response.status_code in (400, 404), response.text
    error = response.json()["error"]
    assert error["param"] == param, error
    assert error["type"] == "invalid_request_error"


def _validated(events):
    """Each event as the SDK's typed model validates it (strictly: a missing or ill-typed field fails)."""
    adapter = pydantic.TypeAdapter(Annotated[ResponseStreamEvent, pydantic.Field(discriminator="type")])
    return [adapter.validate_python(e.model_dump(exclude_unset=True)) for e in events]


def _pairs(logprobs):
    return [(lp.token, lp.logprob, [(t.token, t.logprob) for t in lp.top_logprobs]) for lp in logprobs]


LOGPROBS = dict(include=["message.output_text.logprobs"], top_logprobs=3)


def test_logprobs_equal_chats_and_stream_carries_them(client):
    kwargs = dict(model="plain", input="Count with me", max_output_tokens=10, temperature=0)
    whole = client.responses.create(**kwargs, **LOGPROBS)
    part = whole.output[0].content[0]
    chat = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "Count with me"}],
                                          max_tokens=10, temperature=0, logprobs=True, top_logprobs=3)
    assert len(part.logprobs) == whole.usage.output_tokens
    assert _pairs(part.logprobs) == _pairs(chat.choices[0].logprobs.content)
    assert [lp.bytes for lp in part.logprobs] == [lp.bytes for lp in chat.choices[0].logprobs.content]
    assert all(len(lp.top_logprobs) == 3 for lp in part.logprobs) and whole.top_logprobs == 3
    assert client.responses.create(**kwargs).output[0].content[0].logprobs == []  # not included: none

    # streamed, the text deltas carry them all; also with a stop string, whose held-back tokens never show as text
    stop = part.text[len(part.text) // 2:][:3]
    for extra in ({}, {"extra_body": {"stop": [stop]}}):
        whole = client.responses.create(**kwargs, **LOGPROBS, **extra).output[0].content[0]
        events = _validated(client.responses.create(**kwargs, **LOGPROBS, **extra, stream=True))
        deltas = [lp for e in events if e.type == "response.output_text.delta" for lp in e.logprobs]
        (done,) = [e for e in events if e.type == "response.output_text.done"]
        final = events[-1].response.output[0].content[0]
        assert _pairs(deltas) == _pairs(done.logprobs) == _pairs(final.logprobs) == _pairs(whole.logprobs)
        assert final.text == whole.text and (not extra or len(whole.text) < len(part.text))


def _replay(client, response_id, **kwargs):
    return _validated(client.responses.retrieve(response_id, stream=True, **kwargs))


@pytest.mark.parametrize("model, extra", [
    ("plain", LOGPROBS),
    ("plain", dict(tools=FUNCTION_TOOLS, tool_choice={"type": "function", "name": "get_weather"},
                   extra_body={"seed": 3})),
    ("thinker", {}),
])
def test_retrieve_stream_replays_the_stored_response(client, model, extra):
    stored = client.responses.create(model=model, input="Weather?", max_output_tokens=40, temperature=0, **extra)
    events = _replay(client, stored.id)
    assert [e.sequence_number for e in events] == list(range(len(events)))
    assert [e.type for e in events[:2]] == ["response.created", "response.in_progress"]
    assert events[0].response.status == "in_progress" and events[0].response.output == []
    assert events[-1].type == f"response.{stored.status}"
    retrieved = client.responses.retrieve(stored.id, include=["message.output_text.logprobs"])  # include: as stored
    assert events[-1].response.model_dump() == retrieved.model_dump() == stored.model_dump()
    done = [e.item for e in events if e.type == "response.output_item.done"]
    assert [item.model_dump() for item in done] == [item.model_dump() for item in stored.output]
    for item in stored.output:  # the deltas rebuild each item
        deltas = [e for e in events if getattr(e, "item_id", None) == item.id and e.type.endswith(".delta")]
        text = "".join(e.delta for e in deltas)
        assert text == (item.arguments if item.type == "function_call" else item.content[0].text)
        if item.type == "message":
            assert _pairs(lp for e in deltas for lp in e.logprobs) == _pairs(item.content[0].logprobs)
    tail = _replay(client, stored.id, starting_after=3)
    assert [e.model_dump() for e in tail] == [e.model_dump() for e in events[4:]]


def test_retrieve_stream_of_unknown_response_is_404(server):
    with httpx.Client(base_url=server.base_url, headers={"Authorization": f"Bearer {API_KEY}"}) as http:
        missing = http.get("/v1/responses/resp_missing", params={"stream": "true"})
        stored = http.post("/v1/responses", json={"model": "plain", "input": "x", "max_output_tokens": 1}).json()
        bad = http.get(f"/v1/responses/{stored['id']}", params={"stream": "true", "starting_after": -2})
    assert missing.status_code == 404 and missing.json()["error"]["param"] == "response_id"
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "starting_after"
