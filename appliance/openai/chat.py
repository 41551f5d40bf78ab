"""POST /v1/chat/completions: messages rendered with the model's chat template (`appliance.openai.prompts`), and
chat's response, chunk and logprobs formats; `use_beam_search` runs `appliance.openai.beam_search` instead."""

from __future__ import annotations

import asyncio
from typing import NamedTuple

from litestar import Request, Response, post
from msgspec import UNSET

from appliance.errors import APIError
from appliance.openai import beam_search, structured, tools
from appliance.openai.chat_reply import ReplyShaper
from appliance.openai.context import serving_context
from appliance.openai.generation import Generation, collect, stream_response
from appliance.openai.logprobs import chat_logprobs, prompt_logprobs
from appliance.openai.openapi import request_body
from appliance.openai.prompts import Prompt, chat_messages, check_continuation, render_prompt, template_text, truncate
from appliance.openai.protocol import (AssistantMessage, ChatChoice, ChatChunkChoice, ChatCompletion,
                                       ChatCompletionChunk, ChatCompletionRequest, Delta, Usage, now)
from appliance.openai.serving import (Target, check_limits, fingerprint, open_model, read_request,
                                      sampling_params, start)
from appliance.openai.tools import ToolPlan
from appliance.request_ids import request_id
from engine.beam_search import BeamSearchSequence
from engine.output_processor import CompletionOutput, RequestOutput
from engine.sampling_params import SamplingParams


@post("/v1/chat/completions", status_code=200, operation_class=request_body(ChatCompletionRequest))
async def create_chat_completion(request: Request) -> Response:
    req: ChatCompletionRequest = await read_request(request, ChatCompletionRequest)
    if req.chat_template is not None:
        raise APIError.invalid("chat_template", "requests cannot supply a chat template; the server's operator "
                                                "configures it per model")
    beam_search.check(req)
    if req.use_beam_search:
        return Response(await _beam_search(request, req, chat_messages(req.messages)))
    run = await start_chat(request, req, chat_messages(req.messages))
    generation, params, target = run.generation, run.params, run.target
    choices = _Choices(f"chatcmpl-{generation.request_id}", req, target.model.tokenizer, run.num_logprobs,
                       fingerprint(target.model), ReplyShaper(run.tool_plan, target.model.spec.reasoning_parser))
    if req.stream:
        return stream_response(generation, choices.chunk, choices.usage_chunk if req.include_usage else None,
                               first=[choices.role_chunk(i) for i in range(params.n)])
    outputs = await collect(request, generation)
    return Response(choices.response(outputs[0], generation.usage()))


class ChatRun(NamedTuple):
    generation: Generation
    target: Target
    params: SamplingParams
    tool_plan: ToolPlan | None
    num_logprobs: int | None


class ChatPlan(NamedTuple):
    """A chat request checked and rendered, not started yet."""
    target: Target
    params: SamplingParams
    tool_plan: ToolPlan | None
    num_logprobs: int | None
    prompt: Prompt
    max_tokens_param: str | None  # the request's max_tokens field, if it gave one


async def start_chat(request: Request, req: ChatCompletionRequest, messages: list[dict]) -> ChatRun:
    """A chat request's checks, tools, structured outputs, sampling parameters and prompt, and its engine requests
    started; shared by chat and the Responses API (`appliance.openai.responses`), which converts to chat."""
    plan = await plan_chat(request, req, messages)
    generation = start(serving_context(request), request_id(request), plan.target, [plan.prompt], plan.params, req,
                       "messages", plan.max_tokens_param)
    return ChatRun(generation, plan.target, plan.params, plan.tool_plan, plan.num_logprobs)


async def _beam_search(request: Request, req: ChatCompletionRequest, messages: list[dict]) -> ChatCompletion:
    """`use_beam_search` (appliance.openai.beam_search): n choices, best first."""
    plan = await plan_chat(request, req, messages)
    results = await beam_search.run(request, serving_context(request), request_id(request), plan.target, req,
                                    [plan.prompt], plan.params.max_tokens, "messages")
    choices = _Choices(f"chatcmpl-{request_id(request)}", req, plan.target.model.tokenizer, None,
                       fingerprint(plan.target.model), ReplyShaper(None, plan.target.model.spec.reasoning_parser))
    return choices.beams(results[0].sequences, beam_search.usage([plan.prompt], results))


async def plan_chat(request: Request, req: ChatCompletionRequest, messages: list[dict]) -> ChatPlan:
    """Everything `start_chat` does but starting the engine requests."""
    check_continuation(messages, req.add_generation_prompt, req.continue_final_message)
    if req.top_logprobs is not None and not req.logprobs:
        raise APIError.invalid("top_logprobs", "top_logprobs requires logprobs: true")
    max_tokens = (("max_completion_tokens", req.max_completion_tokens) if req.max_completion_tokens is not None
                  else ("max_tokens", req.max_tokens))
    context = serving_context(request)
    server = context.server
    check_limits(server, req, max_tokens=max_tokens, logprobs=("top_logprobs", req.top_logprobs),
                 prompt_chars=("messages", sum(len(m["content"]) for m in messages)))
    target = await open_model(context, req.model)
    num_logprobs = (req.top_logprobs or 0) if req.logprobs else None
    spec = target.model.spec
    tool_plan = tools.plan(req, spec.tool_parser, template_text(target.model))
    # Chat's default is "as many as fit": the server's cap, which the engine lowers to what the context leaves.
    params = sampling_params(req, target.model.sampling_defaults, max_tokens=max_tokens[1],
                             default_max_tokens=server.max_tokens, logprobs=num_logprobs,
                             prompt_logprobs=req.prompt_logprobs,
                             structured_outputs=await structured.for_chat(req, tool_plan, target, server))
    if tool_plan is not None and tool_plan.parser is not None:
        params.skip_special_tokens = False  # a format's markers (<tool_call>, [TOOL_CALLS]) may be special tokens
    prompt = await asyncio.to_thread(_prompt, target, messages, req, params,
                                     tool_plan.template_tools if tool_plan else None)
    return ChatPlan(target, params, tool_plan, num_logprobs, prompt, max_tokens[0] if max_tokens[1] is not None
                    else None)


def _prompt(target, messages: list[dict], req: ChatCompletionRequest, params, template_tools: list[dict] | None
            ) -> Prompt:
    """The rendered, tokenized and truncated conversation, and the bad words tokenized; blocking."""
    params.update_from_tokenizer(target.model.tokenizer)
    prompt = render_prompt(target.model, messages, req.add_generation_prompt, template_tools,
                           continue_final_message=req.continue_final_message, documents=req.documents,
                           template_kwargs=req.chat_template_kwargs)
    return truncate([prompt], req.truncate_prompt_tokens, target.model.tokenizer)[0]


class _Choices:
    def __init__(self, response_id: str, req: ChatCompletionRequest, tokenizer, num_logprobs: int | None,
                 system_fingerprint: str, shaper: ReplyShaper):
        self.id, self.created, self.model, self.fingerprint = response_id, now(), req.model, system_fingerprint
        self.tokenizer, self.num_logprobs, self.num_prompt_logprobs = tokenizer, num_logprobs, req.prompt_logprobs
        self.shaper = shaper
        # OpenAI puts `"usage": null` on a stream's chunks only when the stream asked for usage; else no key.
        self.chunk_usage = None if req.include_usage else UNSET

    def response(self, output: RequestOutput, usage: Usage) -> ChatCompletion:
        choices = [ChatChoice(c.index, message, self._logprobs(c.logprobs), finish_reason, c.stop_reason)
                   for c in output.outputs for message, finish_reason in [self._message(c)]]
        return ChatCompletion(self.id, self.created, self.model, choices, usage, self.fingerprint,
                              UNSET if self.num_prompt_logprobs is None else prompt_logprobs(
                                  self.tokenizer, output.prompt_token_ids, output.prompt_logprobs))

    def beams(self, sequences: list[BeamSearchSequence], usage: Usage) -> ChatCompletion:
        choices = [ChatChoice(i, message, None, finish_reason) for i, sequence in enumerate(sequences)
                   for message, finish_reason in [self._reply(sequence.text, beam_search.finish_reason(sequence))]]
        return ChatCompletion(self.id, self.created, self.model, choices, usage, self.fingerprint)

    def role_chunk(self, choice: int) -> ChatCompletionChunk:
        """A choice's first chunk names the role and nothing else, as OpenAI's and vLLM's streams do (with an empty
        logprobs list when logprobs were asked for: every chunk of such a stream has one)."""
        return self._chunk([ChatChunkChoice(choice, Delta(role="assistant", content=""), self._logprobs([]))])

    def chunk(self, choice: int, completion: CompletionOutput, output: RequestOutput) -> ChatCompletionChunk:
        if self.shaper.active:
            delta, finish_reason = self.shaper.delta(choice, completion.delta_text, completion.finish_reason, None)
        else:
            delta, finish_reason = Delta(content=completion.delta_text), completion.finish_reason
        return self._chunk([ChatChunkChoice(choice, delta, self._logprobs(completion.delta_logprobs), finish_reason,
                                            completion.stop_reason)])

    def _message(self, c: CompletionOutput) -> tuple[AssistantMessage, str | None]:
        return self._reply(c.text, c.finish_reason)

    def _reply(self, text: str, finish_reason: str | None) -> tuple[AssistantMessage, str | None]:
        if self.shaper.active:
            return self.shaper.message(text, finish_reason)
        return AssistantMessage(text), finish_reason

    def usage_chunk(self, usage: Usage) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.id, self.created, self.model, [], usage, self.fingerprint)

    def _chunk(self, choices: list[ChatChunkChoice]) -> ChatCompletionChunk:
        return ChatCompletionChunk(self.id, self.created, self.model, choices, self.chunk_usage, self.fingerprint)

    def _logprobs(self, entries):
        return None if self.num_logprobs is None else chat_logprobs(self.tokenizer, entries or [],
                                                                    self.num_logprobs)
