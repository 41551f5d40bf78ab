"""The Responses API's payloads (`POST /v1/responses`, OpenAI's shapes): the request, its input items and tools, and
the response object with its output items. Decoded strictly like every request (`appliance.openai.strict`).

An input item is one struct whose `type` says which of its fields apply (`appliance.openai.responses_input` refuses
the others): OpenAI lets a message item leave `type` out, which a tagged union cannot express.
"""

from __future__ import annotations

from typing import Any, Literal

import msgspec

from appliance.openai.protocol import Int64, Strict, TokenLogprob


# ---- requests ----
class InputPart(Strict, kw_only=True):
    # Image, file and audio parts are named so that the refusal can say why (kvbox serves text-only models).
    type: Literal["input_text", "output_text", "refusal", "reasoning_text", "summary_text", "input_image",
                  "input_file", "input_audio"]
    text: str | None = None
    refusal: str | None = None
    annotations: list[Any] | None = None  # an output_text part sent back as it came
    logprobs: list[Any] | None = None


class InputItem(Strict, kw_only=True):
    type: Literal["message", "function_call", "function_call_output", "reasoning"] = "message"
    id: str | None = None
    status: Literal["in_progress", "completed", "incomplete"] | None = None
    # message
    role: Literal["user", "assistant", "system", "developer"] | None = None
    content: str | list[InputPart] | None = None  # reasoning: its reasoning_text parts
    # function_call, function_call_output
    call_id: str | None = None
    name: str | None = None
    arguments: str | None = None
    output: str | list[InputPart] | None = None
    # reasoning
    summary: list[InputPart] | None = None
    encrypted_content: str | None = None  # kvbox never sends any, so it can read none


class FunctionTool(Strict, kw_only=True):
    type: Literal["function"]  # OpenAI's built-in tools (web_search, file_search, ...) run on OpenAI's servers
    name: str
    description: str | None = None
    parameters: dict | None = None
    strict: bool | None = None  # kvbox's forced calls always follow the schema


class FunctionToolChoice(Strict, kw_only=True):
    type: Literal["function"]
    name: str


class TextFormat(Strict, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    name: str | None = None  # json_schema's, required there
    schema: dict | None = None
    description: str | None = None
    strict: bool | None = None


class TextConfig(Strict, kw_only=True):
    format: TextFormat | None = None


class ResponsesRequest(Strict, kw_only=True):
    model: str
    input: str | list[InputItem]
    instructions: str | None = None  # a system message first; not carried over by previous_response_id
    max_output_tokens: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    tools: list[FunctionTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | FunctionToolChoice | None = None
    parallel_tool_calls: bool | None = None
    text: TextConfig | None = None
    previous_response_id: str | None = None
    store: bool = True
    stream: bool = False
    metadata: dict[str, str] | None = None
    user: str | None = None
    truncation: Literal["disabled"] | None = None  # "auto" (dropping the conversation's start) is not offered
    # The other includables name OpenAI's hosted tools, images or encrypted reasoning, none of which kvbox has.
    include: list[Literal["message.output_text.logprobs"]] | None = None
    top_logprobs: Int64 | None = None  # per token, with the output_text's logprobs (0 without)
    # vLLM's extras
    seed: Int64 | None = None
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    stop: str | list[str] | None = None
    priority: Int64 = 0
    cache_salt: str | None = None


# ---- the response ----
class OutputText(msgspec.Struct, kw_only=True):
    type: str = "output_text"
    text: str
    annotations: list = msgspec.field(default_factory=list)
    logprobs: list[TokenLogprob] = msgspec.field(default_factory=list)  # chat's per-token shape, bytes included


class ReasoningText(msgspec.Struct, kw_only=True):
    type: str = "reasoning_text"
    text: str


class OutputMessage(msgspec.Struct, kw_only=True, tag_field="type", tag="message"):
    id: str
    status: str
    role: str = "assistant"
    content: list[OutputText]


class FunctionCallItem(msgspec.Struct, kw_only=True, tag_field="type", tag="function_call"):
    id: str
    call_id: str
    name: str
    arguments: str
    status: str


class ReasoningItem(msgspec.Struct, kw_only=True, tag_field="type", tag="reasoning"):
    id: str
    summary: list = msgspec.field(default_factory=list)
    content: list[ReasoningText]
    status: str


OutputItem = OutputMessage | FunctionCallItem | ReasoningItem


class InputTokensDetails(msgspec.Struct):
    cached_tokens: int
    # OpenAI's count of prompt tokens written to its cache at a surcharge; kvbox's prefix cache has none.
    cache_write_tokens: int = 0


class OutputTokensDetails(msgspec.Struct):
    reasoning_tokens: int


class ResponseUsage(msgspec.Struct):
    input_tokens: int
    input_tokens_details: InputTokensDetails
    output_tokens: int
    output_tokens_details: OutputTokensDetails
    total_tokens: int


class ResponseObject(msgspec.Struct, kw_only=True):
    id: str
    object: str = "response"
    created_at: int
    status: Literal["in_progress", "completed", "incomplete", "failed"]
    error: dict | None = None
    incomplete_details: dict | None = None
    instructions: str | None
    max_output_tokens: int | None
    model: str
    output: list[OutputItem]
    parallel_tool_calls: bool
    previous_response_id: str | None
    temperature: float | None
    top_p: float | None
    tool_choice: str | FunctionToolChoice
    tools: list[FunctionTool]
    text: TextConfig
    truncation: str = "disabled"
    store: bool
    usage: ResponseUsage | None = None
    user: str | None = None
    metadata: dict[str, str]
    top_logprobs: int | None = None


class DeletedResponse(msgspec.Struct):
    id: str
    object: str = "response.deleted"
    deleted: bool = True
