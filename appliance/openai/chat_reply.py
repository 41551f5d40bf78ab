"""A chat choice's text -> what the reply says: reasoning (`reasoning_parser`), content and tool calls
(`appliance.openai.tools`), whole or as stream deltas. Without either feature the text is the content, unchanged."""

from __future__ import annotations

from appliance.openai.protocol import AssistantMessage, Delta
from appliance.openai.reasoning import ReasoningStream, split_reasoning
from appliance.openai.tools import ToolPlan, ToolStream, tool_calls


class ReplyShaper:
    def __init__(self, tool_plan: ToolPlan | None, reasoning_parser: str | None):
        self.tool_plan, self.reasoning_parser = tool_plan, reasoning_parser
        self._streams: dict[int, tuple[ReasoningStream | None, ToolStream | None]] = {}

    @property
    def active(self) -> bool:
        return self.tool_plan is not None or self.reasoning_parser is not None

    def message(self, text: str, finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
        reasoning = None
        if self.reasoning_parser is not None:
            reasoning, text = split_reasoning(self.reasoning_parser, text)
        calls = None
        if self.tool_plan is not None:
            parsed = self.tool_plan.parse(text)
            text, calls = parsed.content, tool_calls(parsed.calls)
            finish_reason = self.tool_plan.finish_reason(finish_reason, parsed.calls)
        content = None if calls and not text else text
        return AssistantMessage(content, tool_calls=calls, reasoning_content=reasoning), finish_reason

    def delta(self, choice: int, text: str, finish_reason: str | None, role: str | None) -> tuple[Delta, str | None]:
        reasoning_stream, tool_stream = self._streams.setdefault(choice, (
            ReasoningStream(self.reasoning_parser) if self.reasoning_parser else None,
            ToolStream(self.tool_plan) if self.tool_plan else None))
        final = finish_reason is not None
        reasoning = None
        if reasoning_stream is not None:
            reasoning, text = reasoning_stream.feed(text, final)
        calls = None
        if tool_stream is not None:
            text, calls = tool_stream.feed(text, final)
            if final:
                finish_reason = self.tool_plan.finish_reason(finish_reason, tool_stream.calls)
        return Delta(role=role, content=text or None, reasoning_content=reasoning or None,
                     tool_calls=calls), finish_reason
