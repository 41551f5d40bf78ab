"""The wire format of every route's payloads as msgspec Structs: OpenAI's (completions, chat, models, the error
object), vLLM's (tokenize, LoRA adapters) and the admin API's LoRA changes.

Requests are decoded by `appliance.openai.serving.read_request`, which turns msgspec's errors into `APIError`s whose
`param` names the field. Optional request fields default to None so that "not given" stays distinguishable from a
value: a model's configured sampling defaults fill exactly the fields a request leaves out. Unknown fields are
refused (`forbid_unknown_fields`): a misspelt or unsupported field silently ignored would change the answer without a
word (`server.ignore_unknown_fields` relaxes this). Integers are bounded to int64 here, so that nothing larger reaches
the engine's tensors. The same structs describe the request bodies in the OpenAPI document.
"""

from __future__ import annotations

import time
from typing import Annotated, Any, Literal

import msgspec
from msgspec import UNSET, Meta, UnsetType

Int64 = Annotated[int, Meta(ge=-(2**63), le=2**63 - 1)]
TokenId = Annotated[int, Meta(ge=0, le=2**63 - 1)]


# ---- requests ----
class Strict(msgspec.Struct, forbid_unknown_fields=True):
    """Every request struct: unknown fields are refused."""


class StreamOptions(Strict, kw_only=True):
    include_usage: bool = False


class JsonSchemaFormat(Strict, kw_only=True):
    name: str
    schema: dict | None = None  # OpenAI: absent means any JSON object
    description: str | None = None
    strict: bool | None = None  # kvbox is always strict: outputs follow the schema's named properties only


class ResponseFormat(Strict, kw_only=True):
    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None


class StructuredOutputsRequest(Strict, kw_only=True):
    """vLLM's `structured_outputs`: exactly one of these (see engine.structured_output.params)."""
    json: dict | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None


class SamplingFields(Strict, kw_only=True):
    """Fields that completions and chat share; `appliance.openai.serving.sampling_params` maps them."""

    model: str
    n: Int64 | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    logit_bias: dict[str, float] | None = None  # token id (as a string, JSON keys are strings) -> bias
    seed: Int64 | None = None
    stop: str | list[str] | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # vLLM's extras
    top_k: Int64 | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    ignore_eos: bool = False
    min_tokens: Int64 = 0
    stop_token_ids: list[TokenId] | None = None
    bad_words: list[str] | None = None
    allowed_token_ids: list[TokenId] | None = None
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    prompt_logprobs: Int64 | None = None
    truncate_prompt_tokens: Int64 | None = None  # keep the prompt's last k tokens
    cache_salt: str | None = None  # prompts share cached KV blocks only with requests of the same salt
    priority: Int64 = 0
    # Structured outputs (appliance.openai.structured): OpenAI's, vLLM's, and vLLM's older guided_* fields.
    response_format: ResponseFormat | None = None
    structured_outputs: StructuredOutputsRequest | None = None
    guided_json: dict | str | None = None
    guided_regex: str | None = None
    guided_choice: list[str] | None = None
    guided_grammar: str | None = None
    # vLLM's beam search: n beams (appliance.openai.beam_search).
    use_beam_search: bool = False
    length_penalty: float = 1.0
    early_stopping: bool = False

    @property
    def include_usage(self) -> bool:
        return self.stream_options is not None and self.stream_options.include_usage


class CompletionRequest(SamplingFields, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of token-id lists (checked in completions.py;
    # msgspec unions cannot hold several list types).
    prompt: str | list[str | TokenId | list[TokenId]]
    max_tokens: Int64 | None = None
    logprobs: Int64 | None = None
    echo: bool = False
    best_of: Annotated[int, Meta(ge=1, le=2**63 - 1)] | None = None  # n of best_of samples, by cumulative logprob


class TextPart(Strict, kw_only=True):
    type: Literal["text"]  # a field rather than a tag: a tag may be left out, and a part must say what it is
    text: str


class FunctionCall(Strict):
    name: str
    arguments: str  # JSON text, as OpenAI sends it


class ToolCall(Strict):
    id: str
    function: FunctionCall
    type: Literal["function"] = "function"


class ChatMessage(Strict, kw_only=True):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[TextPart] | None = None  # text parts only: kvbox serves no multimodal models
    name: str | None = None
    tool_call_id: str | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls, sent back with the tools' answers
    reasoning_content: str | None = None


class FunctionDefinition(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    name: str
    description: str | None = None
    parameters: dict | None = None  # a JSON schema; absent: no arguments
    strict: bool | None = None  # kvbox's forced calls always follow the schema


class ChatTool(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: FunctionDefinition


class NamedFunction(msgspec.Struct, forbid_unknown_fields=True):
    name: str


class NamedToolChoice(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    type: Literal["function"]
    function: NamedFunction


class ChatCompletionRequest(SamplingFields, kw_only=True):
    messages: list[ChatMessage]
    max_tokens: Int64 | None = None  # deprecated by OpenAI in favour of max_completion_tokens
    max_completion_tokens: Int64 | None = None
    logprobs: bool = False
    top_logprobs: Int64 | None = None
    add_generation_prompt: bool = True
    continue_final_message: bool = False  # the last (assistant) message is continued, not closed
    documents: list[dict[str, str]] | None = None  # for retrieval-augmented templates (vLLM's shape)
    chat_template_kwargs: dict[str, Any] | None = None  # extra variables for the model's chat template
    chat_template: str | None = None  # refused: templates run code, so only the operator may set them
    chat_template_kwargs: dict | None = None  # extra template variables, e.g. {"enable_thinking": false}
    tools: list[ChatTool] | None = None
    tool_choice: Literal["none", "auto", "required"] | NamedToolChoice | None = None
    parallel_tool_calls: bool | None = None


class TokenizeRequest(Strict, kw_only=True):
    model: str | None = None
    prompt: str | None = None
    messages: list[ChatMessage] | None = None
    add_special_tokens: bool = True
    add_generation_prompt: bool = True
    continue_final_message: bool = False
    chat_template_kwargs: dict[str, Any] | None = None
    return_token_strs: bool = False


class DetokenizeRequest(Strict, kw_only=True):
    model: str | None = None
    tokens: list[TokenId]


# ---- responses ----
def now() -> int:
    return int(time.time())


class PromptTokensDetails(msgspec.Struct):
    cached_tokens: int = 0


class Usage(msgspec.Struct):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails


class CompletionLogprobs(msgspec.Struct):
    """OpenAI's legacy completions format: parallel lists, one entry per token."""

    tokens: list[str] = msgspec.field(default_factory=list)
    token_logprobs: list[float | None] = msgspec.field(default_factory=list)
    top_logprobs: list[dict[str, float] | None] = msgspec.field(default_factory=list)
    text_offset: list[int] = msgspec.field(default_factory=list)


class PromptLogprob(msgspec.Struct):
    """vLLM's per-token entry of `prompt_logprobs`."""

    logprob: float
    rank: int
    decoded_token: str


# vLLM's `prompt_logprobs`: per prompt token, token id (a string: JSON keys are) -> its entry; None for the first
PromptLogprobs = list[dict[str, PromptLogprob] | None]


class CompletionChoice(msgspec.Struct):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET  # present when asked for (or echo with logprobs)


class Completion(msgspec.Struct):
    """A whole completion, and also each streamed chunk (OpenAI uses the same object for both)."""

    id: str
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | UnsetType = UNSET  # a chunk has none unless the stream asked for usage (then null)
    system_fingerprint: str | None = None
    object: str = "text_completion"


class TopLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(msgspec.Struct):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(msgspec.Struct):
    content: list[TokenLogprob]


class AssistantMessage(msgspec.Struct):
    content: str | None
    role: str = "assistant"
    tool_calls: list[ToolCall] | None = None
    reasoning_content: str | None = None


class ToolCallDelta(msgspec.Struct, omit_defaults=True):
    index: int
    id: str | None = None
    type: str | None = None
    function: dict | None = None  # {"name": ..., "arguments": ...}, either part left out when not in this chunk


class ChatChoice(msgspec.Struct):
    index: int
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletion(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    system_fingerprint: str | None = None
    prompt_logprobs: PromptLogprobs | UnsetType = UNSET
    object: str = "chat.completion"


class Delta(msgspec.Struct, omit_defaults=True):
    role: str | None = None
    content: str | None = None
    reasoning_content: str | None = None
    tool_calls: list[ToolCallDelta] | None = None


class ChatChunkChoice(msgspec.Struct):
    index: int
    delta: Delta
    logprobs: ChatLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None


class ChatCompletionChunk(msgspec.Struct):
    id: str
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | UnsetType = UNSET  # as in `Completion`
    system_fingerprint: str | None = None
    object: str = "chat.completion.chunk"


class ModelCard(msgspec.Struct):
    id: str
    created: int
    root: str
    max_model_len: int | None
    owned_by: str = "kvbox"
    object: str = "model"
    parent: str | None = None  # a LoRA adapter's base model (vLLM's field); None for a base model


class ModelList(msgspec.Struct):
    data: list[ModelCard]
    object: str = "list"


class TokenizeResponse(msgspec.Struct):
    count: int
    max_model_len: int | None
    tokens: list[int]
    token_strs: list[str] | None = None


class DetokenizeResponse(msgspec.Struct):
    prompt: str


# ---- LoRA adapters ----
class LoadLoraAdapterRequest(Strict, kw_only=True):
    lora_name: str
    lora_path: str
    base_model: str | None = None


class UnloadLoraAdapterRequest(Strict, kw_only=True):
    lora_name: str
    lora_int_id: Int64 | None = None  # vLLM's; ignored
    base_model: str | None = None


class AdminLoadLora(Strict, kw_only=True):
    name: str
    path: str


# ---- errors ----
class ErrorDetail(msgspec.Struct):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(msgspec.Struct):
    error: ErrorDetail
