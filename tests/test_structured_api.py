"""Structured outputs through HTTP with the official `openai` client, against an in-process server: OpenAI's
`response_format` (and the SDK's `parse` with a pydantic model), vLLM's `structured_outputs` and `guided_*` on chat
and completions, streaming, and bad schemas, regexes and grammars refused with 400 naming the field."""

import json
import re
from typing import Literal

import jsonschema
import openai
import pydantic
import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import model_config, run_inprocess, server_config

SCHEMA = {
    "type": "object",
    "properties": {"city": {"type": "string", "pattern": "^[A-Za-z]{1,8}$"},
                   "rain": {"type": "boolean"}, "degrees": {"type": "integer", "minimum": -50, "maximum": 60}},
    "required": ["city", "rain", "degrees"],
    "additionalProperties": False,
}
MESSAGES = [{"role": "user", "content": "Weather in Paris, as JSON."}]


class Weather(pydantic.BaseModel):
    city: str = pydantic.Field(pattern="^[A-Za-z]{1,8}$")
    sky: Literal["sun", "cloud", "rain"]
    degrees: int = pydantic.Field(ge=-50, le=60)


@pytest.fixture(scope="module")
def server(tiny_model):
    config = server_config([model_config("llama", tiny_model("llama", max_position_embeddings=512))],
                           max_grammar_compile_s=5)
    with run_inprocess(config) as server:
        yield server


@pytest.fixture(scope="module")
def client(server):
    return server.client()


def test_response_format_json_schema_validates(client):
    response = client.chat.completions.create(
        model="llama", messages=MESSAGES, n=2, seed=3, max_tokens=80,
        response_format={"type": "json_schema", "json_schema": {"name": "weather", "schema": SCHEMA, "strict": True}})
    for choice in response.choices:
        assert choice.finish_reason == "stop"
        jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_sdk_parse_with_a_pydantic_model(client):
    completion = client.chat.completions.parse(model="llama", messages=MESSAGES, max_tokens=80, seed=1,
                                               response_format=Weather)
    parsed = completion.choices[0].message.parsed
    assert isinstance(parsed, Weather)
    jsonschema.validate(json.loads(completion.choices[0].message.content), Weather.model_json_schema())


def test_json_object_streamed(client):
    stream = client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=60, temperature=0,
                                            response_format={"type": "json_object"}, stream=True)
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.startswith("{")


def test_vllm_fields_on_completions(client):
    regex = client.completions.create(model="llama", prompt="Call", max_tokens=20, seed=2,
                                      extra_body={"structured_outputs": {"regex": r"\+33 [0-9]{3}"}})
    assert re.fullmatch(r"\+33 [0-9]{3}", regex.choices[0].text)
    choice = client.completions.create(model="llama", prompt="Pick", max_tokens=10, n=3, seed=4,
                                       extra_body={"guided_choice": ["alpha", "beta"]})
    assert {c.text for c in choice.choices} <= {"alpha", "beta"}
    grammar = client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=10, seed=5,
                                             extra_body={"guided_grammar": 'root ::= "yes" | "no"'})
    assert grammar.choices[0].message.content in ("yes", "no")
    guided = client.chat.completions.create(model="llama", messages=MESSAGES, max_tokens=80, seed=6,
                                            extra_body={"guided_json": SCHEMA})
    jsonschema.validate(json.loads(guided.choices[0].message.content), SCHEMA)


@pytest.mark.parametrize("body, param", [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "wat"}}}},
     "response_format.json_schema.schema"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"structured_outputs": {"regex": "a(b"}}, "structured_outputs.regex"),
    ({"structured_outputs": {"grammar": "root ::= undefined_rule"}}, "structured_outputs.grammar"),
    ({"structured_outputs": {"regex": "a", "choice": ["b"]}}, "structured_outputs"),
    ({"structured_outputs": {"regexp": "a"}}, "structured_outputs.regexp"),
    ({"guided_regex": "(", "guided_choice": ["a"]}, "guided_choice"),
    ({"guided_json": "{not json"}, "guided_json"),
    ({"guided_choice": []}, "guided_choice"),
])
def test_bad_structure_is_a_400_naming_the_field(server, body, param):
    with server.http() as http:
        response = http.post("/v1/chat/completions", json={"model": "llama", "messages": MESSAGES, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error", error


def test_a_grammar_slower_than_the_bound_is_a_400(tiny_model):
    config = server_config([model_config("llama", tiny_model("llama", max_position_embeddings=512))],
                           max_grammar_compile_s=0.001)
    with run_inprocess(config) as server, pytest.raises(openai.BadRequestError, match="did not compile"):
        server.client().chat.completions.create(
            model="llama", messages=MESSAGES, max_tokens=5,
            response_format={"type": "json_schema", "json_schema": {"name": "big", "schema": {
                "type": "object", "properties": {f"p{i}": {"type": "string", "pattern": f"^[a-z]{{{i}}}x$"}
                                                 for i in range(1, 60)}}}})
