"""POST /v1/completions: one or several prompts (text or token ids), `echo`, the legacy logprobs format, vLLM's
`prompt_logprobs` (asked for, or implied by echo with logprobs), `best_of` (appliance.openai.best_of) and
`use_beam_search` (appliance.openai.beam_search)."""

from __future__ import annotations

import asyncio

from litestar import Request, Response, post
from msgspec import UNSET

from appliance.openai import beam_search, best_of, structured
from appliance.openai.context import serving_context
from appliance.openai.generation import collect, stream_response
from appliance.openai.logprobs import completion_logprobs, prompt_logprobs
from appliance.openai.openapi import request_body
from appliance.openai.prompts import Prompt, prompt_inputs, tokenize_inputs, truncate
from appliance.openai.protocol import Completion, CompletionChoice, CompletionRequest, Usage, now
from appliance.openai.serving import (check_limits, fingerprint, open_model, read_request, sampling_params,
                                      start)
from appliance.request_ids import request_id
from engine.output_processor import CompletionOutput, RequestOutput

OPENAI_DEFAULT_MAX_TOKENS = 16  # the completions API's default; chat's is "as many as fit"


@post("/v1/completions", status_code=200, operation_class=request_body(CompletionRequest))
async def create_completion(request: Request) -> Response:
    req: CompletionRequest = await read_request(request, CompletionRequest)
    inputs = prompt_inputs(req.prompt)
    context = serving_context(request)
    check_limits(context.server, req, max_tokens=("max_tokens", req.max_tokens), logprobs=("logprobs", req.logprobs),
                 prompt_chars=("prompt", sum(len(p) for p in inputs if isinstance(p, str))))
    best_of.check(context.server, req)
    beam_search.check(req)
    target = await open_model(context, req.model)
    num_prompt_logprobs = _num_prompt_logprobs(req)
    params = sampling_params(req, target.model.sampling_defaults, max_tokens=req.max_tokens,
                             default_max_tokens=OPENAI_DEFAULT_MAX_TOKENS, logprobs=req.logprobs,
                             prompt_logprobs=num_prompt_logprobs,
                             structured_outputs=await structured.for_request(req, target, context.server))
    n, params = params.n, best_of.widen(req, params)
    # Tokenizing text runs off the event loop; token-id prompts need nothing (their text only to echo it), and a
    # thread hop would queue them behind every request the loop has not parsed yet.
    tokenizer = target.model.tokenizer
    needs_tokenizer = req.echo or req.bad_words or any(isinstance(p, str) for p in inputs)
    prompts = (await asyncio.to_thread(_prompts, tokenizer, inputs, req, params) if needs_tokenizer
               else truncate([(None, p) for p in inputs], req.truncate_prompt_tokens, tokenizer))
    if req.use_beam_search:
        results = await beam_search.run(request, context, request_id(request), target, req, prompts,
                                        params.max_tokens, "prompt")
        choices = [CompletionChoice(i * n + j, sequence.text, None, beam_search.finish_reason(sequence))
                   for i, result in enumerate(results) for j, sequence in enumerate(result.sequences)]
        return Response(Completion(f"cmpl-{request_id(request)}", now(), req.model, choices,
                                   beam_search.usage(prompts, results), fingerprint(target.model)))
    generation = start(context, request_id(request), target, prompts, params, req, "prompt",
                       "max_tokens" if req.max_tokens is not None else None)
    choices = _Choices(f"cmpl-{generation.request_id}", req, tokenizer, prompts, n,
                       num_prompt_logprobs is not None, fingerprint(target.model))
    if req.stream:
        return stream_response(generation, choices.chunk, choices.usage_chunk if req.include_usage else None)
    outputs = await collect(request, generation)
    usage = generation.usage()  # every sample drawn, best_of's included (as OpenAI bills them)
    return Response(choices.response(best_of.pick(outputs, n, req.logprobs is not None), usage))


def _num_prompt_logprobs(req: CompletionRequest) -> int | None:
    """Echo with logprobs implies prompt logprobs (the echoed tokens get theirs), as in vLLM."""
    implied = req.logprobs if req.echo else None
    if req.prompt_logprobs is None or implied is None:
        return implied if req.prompt_logprobs is None else req.prompt_logprobs
    return max(req.prompt_logprobs, implied)


def _prompts(tokenizer, inputs: list[str | list[int]], req: CompletionRequest, params) -> list[Prompt]:
    """The prompts tokenized and truncated, and the bad words tokenized; blocking."""
    params.update_from_tokenizer(tokenizer)
    return truncate(tokenize_inputs(tokenizer, inputs, req.echo), req.truncate_prompt_tokens, tokenizer)


class _Choices:
    """Builds the response's choices, whole or as stream chunks; a stream's first chunk of a choice carries the
    echoed prompt, and its logprobs' text offsets continue from chunk to chunk."""

    def __init__(self, response_id: str, req: CompletionRequest, tokenizer, prompts: list[Prompt], n: int,
                 with_prompt_logprobs: bool, system_fingerprint: str):
        self.id, self.created, self.model, self.fingerprint = response_id, now(), req.model, system_fingerprint
        self.tokenizer, self.prompts, self.n, self.echo = tokenizer, prompts, n, req.echo
        self.logprobs, self.with_prompt_logprobs = req.logprobs is not None, with_prompt_logprobs
        self.chunk_usage = None if req.include_usage else UNSET  # as chat's
        self._text_offsets: dict[int, int] = {}  # choice -> offset after the text streamed so far

    def response(self, outputs: list[RequestOutput], usage: Usage) -> Completion:
        choices = [self._choice(i * self.n + c.index, c, o, whole=True) for i, o in enumerate(outputs)
                   for c in o.outputs]
        return Completion(self.id, self.created, self.model, choices, usage, self.fingerprint)

    def chunk(self, choice: int, completion: CompletionOutput, output: RequestOutput) -> Completion:
        return Completion(self.id, self.created, self.model, [self._choice(choice, completion, output, whole=False)],
                          self.chunk_usage, self.fingerprint)

    def usage_chunk(self, usage: Usage) -> Completion:
        return Completion(self.id, self.created, self.model, [], usage, self.fingerprint)

    def _choice(self, choice: int, completion: CompletionOutput, output: RequestOutput,
                whole: bool) -> CompletionChoice:
        text = completion.text if whole else completion.delta_text
        token_ids = completion.token_ids if whole else completion.delta_token_ids
        entries = (completion.logprobs if whole else completion.delta_logprobs) or []
        is_first_chunk = choice not in self._text_offsets
        if self.echo and (whole or is_first_chunk):
            text = self.prompts[choice // self.n][0] + text
            token_ids = output.prompt_token_ids + token_ids
            entries = (output.prompt_logprobs or []) + entries
        logprobs, text_offset = None, 0
        if self.logprobs:
            logprobs, text_offset = completion_logprobs(self.tokenizer, token_ids, entries,
                                                        0 if whole else self._text_offsets.get(choice, 0))
        self._text_offsets[choice] = text_offset
        prompt_entries = (prompt_logprobs(self.tokenizer, output.prompt_token_ids, output.prompt_logprobs)
                          if self.with_prompt_logprobs and whole else UNSET)
        return CompletionChoice(choice, text, logprobs, completion.finish_reason, completion.stop_reason,
                                prompt_entries)
