"""A Responses API request as chat: its input items -> chat messages (the dicts a chat template sees, made by
`appliance.openai.prompts.chat_messages`), and its fields -> a `ChatCompletionRequest`, so that tools, structured
outputs, sampling and limits run through chat's code. `chat_param` names a chat error's field as the request
spelled it.

Items become messages as the model wrote them: an assistant message and the function_call items after it form one
assistant turn with tool calls (a reasoning item before them becomes that turn's reasoning_content), a
function_call_output a `tool` message.
"""

from __future__ import annotations

from appliance.errors import APIError
from appliance.openai.prompts import chat_messages
from appliance.openai.protocol import (ChatCompletionRequest, ChatMessage, ChatTool, FunctionCall,
                                       FunctionDefinition, JsonSchemaFormat, NamedFunction, NamedToolChoice,
                                       ResponseFormat, ToolCall)
from appliance.openai.responses_protocol import FunctionToolChoice, InputItem, InputPart, ResponsesRequest

# Fields an item of each type may carry besides `type`; the first ones listed are required.
_FIELDS = {"message": (("role", "content"), ("id", "status")),
           "function_call": (("call_id", "name", "arguments"), ("id", "status")),
           "function_call_output": (("call_id", "output"), ("id", "status")),
           "reasoning": ((), ("id", "status", "summary", "content"))}
_TEXT_PARTS = {"input_text", "output_text", "reasoning_text", "summary_text"}
# A chat error's field -> the Responses request's name for it (prefixes).
_PARAMS = (("max_completion_tokens", "max_output_tokens"), ("messages", "input"),
           ("response_format.json_schema.schema", "text.format.schema"), ("response_format", "text.format"),
           ("tool_choice.function.name", "tool_choice.name"))


def input_messages(req: ResponsesRequest) -> list[dict]:
    """The request's instructions and input as chat messages (instructions first, as a system message)."""
    messages = [ChatMessage(role="system", content=req.instructions)] if req.instructions is not None else []
    if isinstance(req.input, str):
        messages.append(ChatMessage(role="user", content=req.input))
    else:
        reasoning = None
        for i, item in enumerate(req.input):
            _check_item(i, item)
            if item.type == "reasoning":
                reasoning = _text(f"input[{i}].content", item.content or [])
                continue
            if item.type == "function_call" and reasoning is None and messages and messages[-1].role == "assistant":
                # the calls that follow an assistant's text are the same turn's
                calls = messages[-1].tool_calls = messages[-1].tool_calls or []
                calls.append(ToolCall(item.call_id, FunctionCall(item.name, item.arguments)))
                continue
            messages.append(_message(i, item, reasoning))
            reasoning = None
    if not messages:
        raise APIError.invalid("input", "the input has no items")
    return chat_messages(messages)


def _check_item(i: int, item: InputItem) -> None:
    required, optional = _FIELDS[item.type]
    for name in required:
        if getattr(item, name) is None:
            raise APIError.invalid(f"input[{i}].{name}", f"a {item.type} item needs {name}")
    for name in item.__struct_fields__:
        if getattr(item, name) is not None and name not in (*required, *optional, "type"):
            raise APIError.invalid(f"input[{i}].{name}", f"a {item.type} item has no field {name}")
    if item.encrypted_content is not None:
        raise APIError.invalid(f"input[{i}].encrypted_content", "kvbox never encrypts reasoning, so it cannot read "
                                                                "encrypted_content; send the reasoning's content")


def _message(i: int, item: InputItem, reasoning: str | None) -> ChatMessage:
    if item.type == "function_call":
        return ChatMessage(role="assistant", tool_calls=[ToolCall(item.call_id, FunctionCall(item.name,
                                                                                             item.arguments))],
                           reasoning_content=reasoning)
    if item.type == "function_call_output":
        output = item.output if isinstance(item.output, str) else _text(f"input[{i}].output", item.output)
        return ChatMessage(role="tool", content=output, tool_call_id=item.call_id)
    content = item.content if isinstance(item.content, str) else _text(f"input[{i}].content", item.content)
    return ChatMessage(role=item.role, content=content,
                       reasoning_content=reasoning if item.role == "assistant" else None)


def _text(param: str, parts: list[InputPart]) -> str:
    for j, part in enumerate(parts):
        if part.type not in _TEXT_PARTS and part.type != "refusal":
            raise APIError.invalid(f"{param}[{j}].type", f"kvbox serves text-only models: {part.type} parts are "
                                                         f"not supported")
        if (part.refusal if part.type == "refusal" else part.text) is None:
            raise APIError.invalid(f"{param}[{j}]", f"a {part.type} part needs "
                                                    f"{'refusal' if part.type == 'refusal' else 'text'}")
    return "".join(p.refusal if p.type == "refusal" else p.text for p in parts)


def chat_request(req: ResponsesRequest) -> ChatCompletionRequest:
    """The request's generation fields as chat's (its messages are passed on separately)."""
    choice = req.tool_choice
    if isinstance(choice, FunctionToolChoice):
        choice = NamedToolChoice(type="function", function=NamedFunction(choice.name))
    tools = None if req.tools is None else [ChatTool(type="function", function=FunctionDefinition(
        name=t.name, description=t.description, parameters=t.parameters, strict=t.strict)) for t in req.tools]
    logprobs = "message.output_text.logprobs" in (req.include or [])
    if req.top_logprobs is not None and not logprobs:
        raise APIError.invalid("top_logprobs", 'top_logprobs needs include: ["message.output_text.logprobs"]')
    return ChatCompletionRequest(
        model=req.model, messages=[], max_completion_tokens=req.max_output_tokens, temperature=req.temperature,
        logprobs=logprobs, top_logprobs=req.top_logprobs if logprobs else None,
        top_p=req.top_p, tools=tools, tool_choice=choice, parallel_tool_calls=req.parallel_tool_calls,
        response_format=_response_format(req), stream=req.stream, user=req.user, seed=req.seed, top_k=req.top_k,
        min_p=req.min_p, repetition_penalty=req.repetition_penalty, stop=req.stop, priority=req.priority,
        cache_salt=req.cache_salt)


def _response_format(req: ResponsesRequest) -> ResponseFormat | None:
    fmt = req.text.format if req.text is not None else None
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_object":
        return ResponseFormat(type="json_object")
    if fmt.name is None:
        raise APIError.invalid("text.format.name", "a json_schema format needs a name")
    return ResponseFormat(type="json_schema", json_schema=JsonSchemaFormat(
        name=fmt.name, schema=fmt.schema, description=fmt.description, strict=fmt.strict))


def chat_param(param: str | None) -> str | None:
    """A chat error's `param` as the Responses request names it."""
    for chat, responses in _PARAMS:
        if param is not None and (param == chat or param.startswith(chat + ".") or param.startswith(chat + "[")):
            return responses + param[len(chat):]
    return param
