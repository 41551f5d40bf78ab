"""Tool calling on chat: `tools`, `tool_choice`, `parallel_tool_calls` -> a `ToolPlan`, and its replies.

- none: the tools are not shown to the model; it answers in text.
- auto: the tools go to the chat template and the model's `tool_parser` (appliance.openai.tool_parsers) reads calls
  out of its text: finish_reason "tool_calls" when it made any. Without a parser configured, auto is refused (as
  vLLM does), since the calls would come back as plain text.
- required / a named function: a grammar forces the output (engine structured outputs): a JSON list of
  {"name", "parameters"} (at most one with parallel_tool_calls false), or the named function's arguments alone;
  the arguments always validate against the tool's schema. finish_reason: "tool_calls" for required, "stop" for a
  named function (OpenAI answers so).
`ToolStream` turns one choice's streamed text into content and tool-call deltas.
"""

from __future__ import annotations

import json
import uuid

from appliance.errors import APIError
from appliance.openai.protocol import ChatCompletionRequest, FunctionCall, NamedToolChoice, ToolCall, ToolCallDelta
from appliance.openai.tool_parsers import Llama3JsonParser, Parsed, ParsedCall, parser_for
from engine.structured_output.params import StructuredOutputsParams

_NO_ARGUMENTS = {"type": "object", "properties": {}}


class ToolPlan:
    def __init__(self, mode: str, tools: list[dict], parser=None, name: str | None = None, parallel: bool = True):
        self.mode, self.tools, self.parser, self.name, self.parallel = mode, tools, parser, name, parallel

    @property
    def template_tools(self) -> list[dict] | None:
        return None if self.mode == "none" else self.tools

    @property
    def structured_outputs(self) -> StructuredOutputsParams | None:
        if self.mode == "named":
            function = next(t["function"] for t in self.tools if t["function"]["name"] == self.name)
            return StructuredOutputsParams(json=function.get("parameters") or _NO_ARGUMENTS)
        if self.mode != "required":
            return None
        calls = [{"type": "object", "properties": {"name": {"enum": [t["function"]["name"]]},
                                                   "parameters": t["function"].get("parameters") or _NO_ARGUMENTS},
                  "required": ["name", "parameters"], "additionalProperties": False} for t in self.tools]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutputsParams(json=schema)

    def parse(self, text: str) -> Parsed:
        if self.mode == "named":
            return Parsed("", [ParsedCall(self.name, text)])
        if self.mode == "required":
            try:
                return Parsed("", [ParsedCall(c["name"], json.dumps(c["parameters"], ensure_ascii=False))
                                   for c in json.loads(text)])
            except (ValueError, KeyError, TypeError):  # cut short by max_tokens
                return Parsed(text, [])
        if self.mode == "auto":
            parsed = self.parser.parse(text)
            return parsed if self.parallel else Parsed(parsed.content, parsed.calls[:1])
        return Parsed(text, [])

    def finish_reason(self, reason: str | None, calls: list) -> str | None:
        return "tool_calls" if calls and reason == "stop" and self.mode != "named" else reason


def plan(req: ChatCompletionRequest, tool_parser: str | None, chat_template: str | None) -> ToolPlan | None:
    choice = req.tool_choice
    if not req.tools:
        if choice is not None and choice != "none":
            raise APIError.invalid("tool_choice", "tool_choice needs tools")
        return None
    tools = [{"type": "function", "function": {k: v for k, v in (
        ("name", t.function.name), ("description", t.function.description),
        ("parameters", t.function.parameters)) if v is not None}} for t in req.tools]
    parallel = req.parallel_tool_calls is not False
    if isinstance(choice, NamedToolChoice):
        if choice.function.name not in {t["function"]["name"] for t in tools}:
            raise APIError.invalid("tool_choice.function.name", f"no tool is named {choice.function.name!r}")
        return ToolPlan("named", tools, name=choice.function.name, parallel=parallel)
    mode = choice or "auto"
    parser = parser_for(tool_parser, chat_template, tools) if mode == "auto" else None
    if mode == "auto" and parser is None:
        raise APIError.invalid("tool_choice", "tool_choice auto needs a tool_parser configured for this model; use "
                                              "required or a named function, or ask the operator to set one")
    return ToolPlan(mode, tools, parser, parallel=parallel)


def tool_calls(calls: list[ParsedCall]) -> list[ToolCall] | None:
    return [ToolCall(f"call_{uuid.uuid4().hex[:24]}", FunctionCall(c.name, c.arguments)) for c in calls] or None


class ToolStream:
    """One choice's stream: content deltas pass through until a call may be starting; from there the text is held
    and, at the end, parsed into tool-call deltas (a named function's arguments stream as they come)."""

    def __init__(self, plan: ToolPlan):
        self.plan = plan
        self.text = ""
        self._held_from: int | None = 0 if plan.mode == "required" else None
        self._named_id = f"call_{uuid.uuid4().hex[:24]}" if plan.mode == "named" else None
        self._sent = 0  # text sent as content so far
        self.calls: list = []

    def feed(self, delta: str, final: bool) -> tuple[str, list[ToolCallDelta] | None]:
        """(content delta, tool-call deltas) for the next piece of text."""
        first = not self.text
        self.text += delta
        if self._named_id is not None:
            deltas = [ToolCallDelta(0, self._named_id, "function", {"name": self.plan.name, "arguments": ""})] \
                if first else []
            if delta:
                deltas.append(ToolCallDelta(0, function={"arguments": delta}))
            self.calls = [self.plan.name]
            return "", deltas or None
        if self._held_from is None:
            self._held_from = self._call_start()
        if self._held_from is None:
            return self._content_upto(len(self.text) if final else len(self.text) - _partial_marker(
                self.text, self.plan.parser)), None
        content = self._content_upto(self._held_from)
        if not final:
            return content, None
        parsed = self.plan.parse(self.text[self._held_from:])
        self.calls = parsed.calls
        if not parsed.calls:
            return content + parsed.content, None
        return content + parsed.content, [
            ToolCallDelta(i, c.id, "function", {"name": c.function.name, "arguments": c.function.arguments})
            for i, c in enumerate(tool_calls(parsed.calls))]

    def _content_upto(self, end: int) -> str:
        out = self.text[self._sent:end]
        self._sent = max(self._sent, end)
        return out

    def _call_start(self) -> int | None:
        parser = self.plan.parser
        if parser is None:
            return None
        if isinstance(parser, Llama3JsonParser):  # a reply of calls only: its first character tells
            stripped = self.text.lstrip()
            return 0 if stripped[:1] in ("{", "<") else None
        index = self.text.find(parser.start_marker)
        return index if index >= 0 else None


def _partial_marker(text: str, parser) -> int:
    if parser is None:
        return 0
    marker = parser.start_marker
    for n in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-n:]):
            return n
    return 0
