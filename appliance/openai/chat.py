"""POST /v1/chat/completions: messages rendered with the model's chat template (`appliance.openai.prompts`), and
chat's response, chunk and logprobs formats."""

from __future__ import annotations

import asyncio

from litestar import Request, Response, post

from appliance.errors import APIError
from appliance.openai import structured, tools
from appliance.openai.chat_reply import ReplyShaper
from appliance.openai.context import serving_context
from appliance.openai.generation import collect, stream_response
from appliance.openai.logprobs import chat_logprobs
from appliance.openai.prompts import chat_messages, render_prompt, template_text
from appliance.openai.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                       ChatCompletionChunk, ChatCompletionRequest, Delta, Usage, now)
from appliance.openai.serving import check_limits, open_model, read_request, sampling_params, start
from appliance.request_ids import request_id
from engine.output_processor import CompletionOutput, RequestOutput


@post("/v1/chat/completions", status_code=200)
async def create_chat_completion(request: Request) -> Response:
    req: ChatCompletionRequest = await read_request(request, ChatCompletionRequest)
    if req.chat_template is not None:
        raise APIError.invalid("chat_template", "requests cannot supply a chat template; the server's operator "
                                                "configures it per model")
    messages = chat_messages(req.messages)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError.invalid("top_logprobs", "top_logprobs requires logprobs: true")
    max_tokens = (("max_completion_tokens", req.max_completion_tokens) if req.max_completion_tokens is not None
                  else ("max_tokens", req.max_tokens))
    context = serving_context(request)
    server = context.server
    check_limits(server, req, max_tokens=max_tokens, logprobs=("top_logprobs", req.top_logprobs),
                 prompt_chars=("messages", sum(len(m["content"]) for m in messages)))
    target = open_model(context.supervisor, req.model)
    num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    spec = target.model.spec
    tool_plan = tools.plan(req, spec.tool_parser, template_text(target.model))
    # Chat's default is "as many as fit": the server's cap, which the engine lowers to what the context leaves.
    params = sampling_params(req, spec, max_tokens=max_tokens[1], default_max_tokens=server.max_tokens,
                             logprobs=num_logprobs,
                             structured_outputs=await structured.for_chat(req, tool_plan, target, server))
    if tool_plan is not None and tool_plan.parser is not None:
        params.skip_special_tokens = False  # a format's markers (<tool_call>, [TOOL_CALLS]) may be special tokens
    prompt = await asyncio.to_thread(render_prompt, target.model, messages, req.add_generation_prompt,
                                     tool_plan.template_tools if tool_plan else None, req.chat_template_kwargs)
    generation = start(context, request_id(request), target, [prompt], params, "messages", req.priority)
    choices = _Choices(f"chatcmpl-{generation.request_id}", req.model, target.model.tokenizer, num_logprobs,
                       ReplyShaper(tool_plan, spec.reasoning_parser))
    if req.stream:
        return stream_response(generation, choices.chunk, choices.usage_chunk if req.include_usage else None)
    outputs = await collect(request, generation)
    return Response(choices.response(outputs[0], generation.usage()))


class _Choices:
    def __init__(self, response_id: str, model: str, tokenizer, num_logprobs: int | None, shaper: ReplyShaper):
        self.id, self.created, self.model = response_id, now(), model
        self.tokenizer, self.num_logprobs, self.shaper = tokenizer, num_logprobs, shaper
        self._started: set[int] = set()  # choices whose first chunk (the one naming the role) went out

    def response(self, output: RequestOutput, usage: Usage) -> ChatCompletion:
        choices = [ChatChoice(c.index, message, self._logprobs(c.logprobs), finish_reason, c.stop_reason)
                   for c in output.outputs for message, finish_reason in [self._message(c)]]
        return ChatCompletion(self.id, self.created, self.model, choices, usage)

    def chunk(self, choice: int, completion: CompletionOutput, output: RequestOutput) -> ChatCompletionChunk:
        role = None if choice in self._started else "assistant"
        self._started.add(choice)
        if self.shaper.active:
            delta, finish_reason = self.shaper.delta(choice, completion.delta_text, completion.finish_reason, role)
        else:
            delta, finish_reason = Delta(role=role, content=completion.delta_text), completion.finish_reason
        return ChatCompletionChunk(self.id, self.created, self.model, [ChatChunkChoice(
            choice, delta, self._logprobs(completion.delta_logprobs), finish_reason, completion.stop_reason)])

    def _message(self, c: CompletionOutput) -> tuple[AssistantMessage, str | None]:
        if self.shaper.active:
            return self.shaper.message(c.text, c.finish_reason)
        return AssistantMessage(c.text), c.finish_reason

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.id, self.created, self.model, [], usage)

    def _logprobs(self, entries):
        return None if self.num_logprobs is None else chat_logprobs(self.tokenizer, entries or [],
                                                                    self.num_logprobs)
