"""Reading tool calls out of a model's text (tool_choice auto), one parser per format, chosen per model in YAML.

- hermes (Hermes, Qwen 2.5/3): `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, any number of them.
- llama3_json (Llama 3.1-3.3): an optional `<|python_tag|>`, then `{"name": ..., "parameters": {...}}` objects
  separated by `;`; only when the whole reply is calls (text before them is prose, not a call).
- mistral: `[TOOL_CALLS]` then a JSON list of {"name", "arguments"}, or (newer templates) `name[ARGS]{...}` pairs.
- qwen3_coder (Qwen3-Coder): `<tool_call><function=NAME><parameter=KEY>VALUE</parameter>...</function></tool_call>`,
  values written raw, typed by the tool's schema (a string property keeps the text; others are read as JSON).
- auto: picked from the chat template's text.

A parser returns the text before the calls (the message's content) and the calls; text that does not parse as a
call stays content, so nothing the model wrote is lost. `start_marker` tells a stream where buffering must begin.
"""

from __future__ import annotations

import json
import re
from typing import NamedTuple


class ParsedCall(NamedTuple):
    name: str
    arguments: str  # JSON text


class Parsed(NamedTuple):
    content: str
    calls: list[ParsedCall]


def _call(obj, arguments_key: str) -> ParsedCall | None:
    if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
        return None
    arguments = obj.get(arguments_key, {})
    return ParsedCall(obj["name"], arguments if isinstance(arguments, str) else json.dumps(arguments,
                                                                                          ensure_ascii=False))


def _json_values(text: str) -> list:
    """Consecutive JSON values in `text` (separated by whitespace, `;` or `,`); [] when any part is not JSON."""
    decoder, values, i = json.JSONDecoder(), [], 0
    while True:
        while i < len(text) and text[i] in " \t\r\n;,":
            i += 1
        if i == len(text):
            return values
        try:
            value, i = decoder.raw_decode(text, i)
        except json.JSONDecodeError:
            return []
        values.append(value)


class _Parser:
    def __init__(self, tools: list[dict] | None = None):
        self.schemas = {t["function"]["name"]: t["function"].get("parameters") or {} for t in tools or []}


class HermesParser(_Parser):
    start_marker = "<tool_call>"
    _block = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)

    def parse(self, text: str) -> Parsed:
        start = text.find(self.start_marker)
        if start < 0:
            return Parsed(text, [])
        calls = [_call(v, "arguments") for block in self._block.findall(text[start:]) for v in _json_values(block)]
        if not calls or None in calls:
            return Parsed(text, [])
        return Parsed(text[:start].rstrip(), calls)


class Llama3JsonParser(_Parser):
    start_marker = "<|python_tag|>"

    def parse(self, text: str) -> Parsed:
        body = text.strip()
        body = body[len(self.start_marker):] if body.startswith(self.start_marker) else body
        if not body.startswith("{"):
            return Parsed(text, [])
        calls = [_call(v, "parameters") or _call(v, "arguments") for v in _json_values(body)]
        if not calls or None in calls:
            return Parsed(text, [])
        return Parsed("", calls)


class MistralParser(_Parser):
    start_marker = "[TOOL_CALLS]"
    _named = re.compile(r"([A-Za-z0-9_.-]+)\[ARGS\]")

    def parse(self, text: str) -> Parsed:
        start = text.find(self.start_marker)
        if start < 0:
            return Parsed(text, [])
        body = text[start + len(self.start_marker):].strip()
        calls = self._list_form(body) if body.startswith("[") else self._named_form(body)
        if not calls or None in calls:
            return Parsed(text, [])
        return Parsed(text[:start].rstrip(), calls)

    @staticmethod
    def _list_form(body: str) -> list[ParsedCall | None]:
        values = _json_values(body)
        return [_call(v, "arguments") for value in values for v in (value if isinstance(value, list) else [value])]

    def _named_form(self, body: str) -> list[ParsedCall | None]:
        calls, decoder, i = [], json.JSONDecoder(), 0
        while match := self._named.match(body, i):
            try:
                arguments, i = decoder.raw_decode(body, match.end())
            except json.JSONDecodeError:
                return []
            calls.append(ParsedCall(match.group(1), json.dumps(arguments, ensure_ascii=False)))
            while i < len(body) and body[i] in " \n" or body.startswith(self.start_marker, i):
                i += len(self.start_marker) if body.startswith(self.start_marker, i) else 1
        return calls if i == len(body) else []


class Qwen3CoderParser(_Parser):
    start_marker = "<tool_call>"
    _function = re.compile(r"<tool_call>\s*<function=([^>\n]+)>(.*?)(?:</function>\s*(?:</tool_call>|$)|$)",
                           re.DOTALL)
    # A value runs to its closing tag, or (a model that left it out) to the next parameter or the function's end.
    _parameter = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?(?:</parameter>|(?=<parameter=)|$)", re.DOTALL)

    def parse(self, text: str) -> Parsed:
        start = text.find(self.start_marker)
        if start < 0:
            return Parsed(text, [])
        calls = [ParsedCall(name.strip(), json.dumps(self._arguments(name.strip(), body), ensure_ascii=False))
                 for name, body in self._function.findall(text[start:])]
        return Parsed(text[:start].rstrip(), calls) if calls else Parsed(text, [])

    def _arguments(self, name: str, body: str) -> dict:
        properties = self.schemas.get(name, {}).get("properties") or {}
        return {key.strip(): _typed(value, properties.get(key.strip())) for key, value in self._parameter.findall(body)}


def _typed(value: str, schema: dict | None):
    """A raw parameter value as its schema's type says: text for strings (and unknown parameters), else JSON."""
    kinds = (schema or {}).get("type", "string")
    kinds = kinds if isinstance(kinds, list) else [kinds]
    if value.strip() == "null" and "string" not in kinds:
        return None
    if "string" in kinds:
        return value
    try:
        return json.loads(value)
    except ValueError:
        if "boolean" in kinds and value.strip().lower() in ("true", "false"):
            return value.strip().lower() == "true"
        return value


PARSERS = {"hermes": HermesParser, "llama3_json": Llama3JsonParser, "mistral": MistralParser,
           "qwen3_coder": Qwen3CoderParser}


def parser_for(name: str | None, chat_template: str | None, tools: list[dict] | None = None):
    """The configured parser for these tools; `auto` picks one from the chat template (None when no format is
    recognized)."""
    if name == "auto":
        template = chat_template or ""
        name = ("qwen3_coder" if "<function=" in template else "hermes" if "<tool_call>" in template
                else "mistral" if "[TOOL_CALLS]" in template
                else "llama3_json" if "<|python_tag|>" in template or "ipython" in template else None)
    return PARSERS[name](tools) if name is not None else None
