"""The qwen3_coder tool parser (Qwen3-Coder's `<function=...><parameter=...>` calls) on known texts: values typed by
the tool's schema, several calls, text before them kept as content, malformed text left as content, the template
detection of `auto`, and streams split at every character giving the same calls."""

import json

import pytest

from appliance.openai.tool_parsers import Qwen3CoderParser, parser_for
from appliance.openai.tools import ToolPlan, ToolStream

TOOLS = [{"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"},
                                     "metric": {"type": "boolean"}, "hours": {"type": "array"},
                                     "note": {"type": ["string", "null"]}, "ratio": {"type": "number"}}}}},
         {"type": "function", "function": {"name": "get_time", "parameters": {
             "type": "object", "properties": {"zone": {"type": "string"}}}}}]
CALL = ("<tool_call>\n<function=get_weather>\n<parameter=city>\nNew York\n</parameter>\n<parameter=days>\n3\n"
        "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n<parameter=hours>\n[1, 2]\n</parameter>\n"
        "<parameter=note>\n007\n</parameter>\n<parameter=ratio>\n0.5\n</parameter>\n</function>\n</tool_call>")
WEATHER_ARGS = {"city": "New York", "days": 3, "metric": True, "hours": [1, 2], "note": "007", "ratio": 0.5}
TWO = "Let me check.\n" + CALL + "\n<tool_call>\n<function=get_time>\n<parameter=zone>\n123\n</parameter>\n" \
                                 "</function>\n</tool_call>"


def _calls(parsed):
    return [(c.name, json.loads(c.arguments)) for c in parsed.calls]


def test_values_are_typed_by_the_schema():
    parsed = Qwen3CoderParser(TOOLS).parse(CALL)
    assert parsed.content == "" and _calls(parsed) == [("get_weather", WEATHER_ARGS)]


def test_several_calls_and_content_before_them():
    parsed = Qwen3CoderParser(TOOLS).parse(TWO)
    assert parsed.content == "Let me check."
    assert _calls(parsed) == [("get_weather", WEATHER_ARGS), ("get_time", {"zone": "123"})]  # a string stays text


@pytest.mark.parametrize("text, expected", [
    # no closing tags (cut short, or a model that leaves them out): the values still end where the next begins
    ("<tool_call>\n<function=get_time>\n<parameter=zone>\nUTC\n", [("get_time", {"zone": "UTC"})]),
    ("<tool_call><function=get_weather><parameter=days>2<parameter=city>Oslo</function></tool_call>",
     [("get_weather", {"days": 2, "city": "Oslo"})]),
    # an unknown function's parameters stay text; a multi-line string keeps its inner newlines
    ("<tool_call>\n<function=other>\n<parameter=x>\n1\n</parameter>\n</function>\n</tool_call>",
     [("other", {"x": "1"})]),
    ("<tool_call>\n<function=get_time>\n<parameter=zone>\na\nb\n</parameter>\n</function>\n</tool_call>",
     [("get_time", {"zone": "a\nb"})]),
    ("<tool_call>\n<function=get_weather>\n<parameter=days>\nnull\n</parameter>\n</function>\n</tool_call>",
     [("get_weather", {"days": None})]),
])
def test_known_strings(text, expected):
    assert _calls(Qwen3CoderParser(TOOLS).parse(text)) == expected


@pytest.mark.parametrize("text", ["no calls here", "<tool_call>{\"name\": \"get_time\"}</tool_call>"])
def test_text_that_is_not_a_call_stays_content(text):
    assert Qwen3CoderParser(TOOLS).parse(text) == (text, [])


def test_auto_recognizes_the_template():
    template = "{% for tool in tools %}...{% endfor %}<tool_call>\n<function=example_function_name>\n<parameter="
    assert isinstance(parser_for("auto", template, TOOLS), Qwen3CoderParser)


@pytest.mark.parametrize("step", [1, 2, 5, 13])
def test_stream_splits_give_the_same_calls(step):
    stream = ToolStream(ToolPlan("auto", TOOLS, parser_for("qwen3_coder", None, TOOLS)))
    content, deltas = "", []
    for i in range(0, len(TWO), step):
        piece = TWO[i:i + step]
        text, calls = stream.feed(piece, final=i + step >= len(TWO))
        content += text
        deltas += calls or []
    assert content == "Let me check.\n"  # a stream sends the text before the call as it comes
    assert [(d.function["name"], json.loads(d.function["arguments"])) for d in deltas] == [
        ("get_weather", WEATHER_ARGS), ("get_time", {"zone": "123"})]
    assert all(d.id.startswith("call_") for d in deltas)
