"""A Responses API reply: the response object around its output items, usage in input/output tokens, the assistant
turn it adds to the conversation, and its storing. `Responder` is shared by the whole reply (`appliance.openai.
responses`) and the event stream (`appliance.openai.responses_stream`)."""

from __future__ import annotations

import uuid

from appliance.openai.context import ServingContext
from appliance.openai.prompts import chat_messages
from appliance.openai.protocol import (AssistantMessage, ChatMessage, FunctionCall, TokenLogprob, ToolCall, Usage,
                                       now)
from appliance.openai.responses_protocol import (FunctionCallItem, InputTokensDetails, OutputItem, OutputMessage,
                                                 OutputText, OutputTokensDetails, ReasoningItem, ReasoningText,
                                                 ResponseObject, ResponsesRequest, ResponseUsage, TextConfig,
                                                 TextFormat)
from appliance.openai.responses_store import Stored


def item_id(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex}"


def output_items(message: AssistantMessage, status: str, logprobs: list[TokenLogprob] = ()) -> list[OutputItem]:
    """A whole reply's items, in the order the model wrote them: reasoning, text (with `logprobs`), calls."""
    items: list[OutputItem] = []
    if message.reasoning_content is not None:
        items.append(ReasoningItem(id=item_id("rs"), content=[ReasoningText(text=message.reasoning_content)],
                                   status=status))
    if message.content or not items and not message.tool_calls:  # an empty reply is still a message
        items.append(OutputMessage(id=item_id("msg"), status=status, content=[OutputText(text=message.content or "",
                                                                               logprobs=list(logprobs))]))
    items.extend(FunctionCallItem(id=item_id("fc"), call_id=c.id, name=c.function.name,
                                  arguments=c.function.arguments, status=status) for c in message.tool_calls or [])
    return items


def status_of(finish_reason: str | None) -> str:
    return "incomplete" if finish_reason == "length" else "completed"


class Responder:
    """One request's response object, from its start (status in_progress) to its end, when it is stored (unless
    the request said `store: false`) with the conversation it ends."""

    def __init__(self, req: ResponsesRequest, response_id: str, conversation: list[dict], tokenizer,
                 context: ServingContext):
        self.req, self.id, self.created_at = req, response_id, now()
        self.conversation, self.tokenizer, self.context = conversation, tokenizer, context

    def response(self, status: str, output: list[OutputItem], usage: ResponseUsage | None = None,
                 error: dict | None = None) -> ResponseObject:
        req = self.req
        text = req.text if req.text is not None and req.text.format is not None else TextConfig(
            format=TextFormat(type="text"))
        return ResponseObject(
            id=self.id, created_at=self.created_at, status=status, error=error,
            incomplete_details={"reason": "max_output_tokens"} if status == "incomplete" else None,
            instructions=req.instructions, max_output_tokens=req.max_output_tokens, model=req.model, output=output,
            parallel_tool_calls=req.parallel_tool_calls is not False, previous_response_id=req.previous_response_id,
            temperature=req.temperature, top_p=req.top_p, tool_choice=req.tool_choice or (
                "auto" if req.tools else "none"), tools=req.tools or [], text=text, store=req.store, usage=usage,
            user=req.user, metadata=req.metadata or {}, top_logprobs=req.top_logprobs)

    def finish(self, output: list[OutputItem], finish_reason: str | None, usage: Usage) -> ResponseObject:
        """The final response object, stored with the conversation it ends."""
        reasoning = "".join(c.text for item in output if isinstance(item, ReasoningItem) for c in item.content)
        num_reasoning = len(self.tokenizer.encode(reasoning, add_special_tokens=False)) if reasoning else 0
        response = self.response(status_of(finish_reason), output, ResponseUsage(
            usage.prompt_tokens, InputTokensDetails(usage.prompt_tokens_details.cached_tokens),
            usage.completion_tokens, OutputTokensDetails(min(num_reasoning, usage.completion_tokens)),
            usage.total_tokens))
        capacity = self.context.server.responses_store_max
        if self.req.store and capacity:
            self.context.responses.put(Stored(response, [*self.conversation, assistant_turn(output)]), capacity)
        return response


def assistant_turn(output: list[OutputItem]) -> dict:
    """The reply as the conversation's next assistant message (what a chat template sees)."""
    texts = [part.text for item in output if isinstance(item, OutputMessage) for part in item.content]
    reasoning = [part.text for item in output if isinstance(item, ReasoningItem) for part in item.content]
    calls = [ToolCall(item.call_id, FunctionCall(item.name, item.arguments)) for item in output
             if isinstance(item, FunctionCallItem)]
    return chat_messages([ChatMessage(role="assistant", content="".join(texts) if texts else None,
                                      tool_calls=calls or None,
                                      reasoning_content="".join(reasoning) if reasoning else None)])[0]
