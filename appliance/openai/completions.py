"""POST /v1/completions: one or several prompts (text or token ids), `echo`, and the legacy logprobs format."""

from __future__ import annotations

import asyncio
import uuid

from litestar import Request, Response, post

from appliance.errors import APIError
from appliance.openai.logprobs import completion_logprobs
from appliance.openai.protocol import Completion, CompletionChoice, CompletionRequest, Usage, now
from appliance.openai.serving import (Prompt, check_limits, collect, open_model, read_request, sampling_params,
                                      server_config, start, stream_response)
from engine.output_processor import CompletionOutput, RequestOutput

OPENAI_DEFAULT_MAX_TOKENS = 16  # the completions API's default; chat's is "as many as fit"


@post("/v1/completions", status_code=200)
async def create_completion(request: Request) -> Response:
    req: CompletionRequest = await read_request(request, CompletionRequest)
    inputs = _prompt_inputs(req.prompt)
    check_limits(server_config(request), req, max_tokens=("max_tokens", req.max_tokens),
                 logprobs=("logprobs", req.logprobs),
                 prompt_chars=("prompt", sum(len(p) for p in inputs if isinstance(p, str))))
    model, client = open_model(request, req.model)
    params = sampling_params(req, model.spec, max_tokens=req.max_tokens, default_max_tokens=OPENAI_DEFAULT_MAX_TOKENS,
                             logprobs=req.logprobs, prompt_logprobs=req.logprobs if req.echo else None)
    # Tokenizing text runs off the event loop; token-id prompts need nothing (their text only to echo it), and a
    # thread hop would queue them behind every request the loop has not parsed yet.
    needs_tokenizer = req.echo or any(isinstance(p, str) for p in inputs)
    prompts = (await asyncio.to_thread(_tokenize, model.tokenizer, inputs, req.echo) if needs_tokenizer
               else [(None, p) for p in inputs])
    generation = start(request, model, client, prompts, params, "prompt", req.priority)
    choices = _Choices(req.model, model.tokenizer, prompts, params.n, req.echo, req.logprobs is not None)
    if req.stream:
        return stream_response(generation, choices.chunk, choices.usage_chunk if req.include_usage else None)
    outputs = await collect(request, generation)
    return Response(choices.response(outputs, generation.usage()))


def _prompt_inputs(prompt: str | list) -> list[str | list[int]]:
    if isinstance(prompt, str):
        return [prompt]
    if prompt and all(isinstance(p, int) for p in prompt):
        return [prompt]
    if prompt and (all(isinstance(p, str) for p in prompt) or all(isinstance(p, list) for p in prompt)):
        return list(prompt)
    raise APIError.invalid("prompt", "expected a string, a list of strings, a list of token ids or a list of "
                                     "token-id lists, none of them empty")


def _tokenize(tokenizer, inputs: list[str | list[int]], echo: bool) -> list[Prompt]:
    return [(p, tokenizer.encode(p)) if isinstance(p, str) else (tokenizer.decode(p) if echo else None, p)
            for p in inputs]


class _Choices:
    """Builds the response's choices, whole or as stream chunks; a stream's first chunk of a choice carries the
    echoed prompt, and its logprobs' text offsets continue from chunk to chunk."""

    def __init__(self, model: str, tokenizer, prompts: list[Prompt], n: int, echo: bool, logprobs: bool):
        self.id, self.created, self.model = f"cmpl-{uuid.uuid4().hex}", now(), model
        self.tokenizer, self.prompts, self.n, self.echo, self.logprobs = tokenizer, prompts, n, echo, logprobs
        self._text_offsets: dict[int, int] = {}  # choice -> offset after the text streamed so far

    def response(self, outputs: list[RequestOutput], usage: Usage) -> Completion:
        choices = [self._choice(i * self.n + c.index, c, o, whole=True) for i, o in enumerate(outputs)
                   for c in o.outputs]
        return Completion(self.id, self.created, self.model, choices, usage)

    def chunk(self, choice: int, completion: CompletionOutput, output: RequestOutput) -> Completion:
        return Completion(self.id, self.created, self.model, [self._choice(choice, completion, output, whole=False)])

    def usage_chunk(self, usage: Usage) -> Completion:
        return Completion(self.id, self.created, self.model, [], usage)

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
        return CompletionChoice(choice, text, logprobs, completion.finish_reason, completion.stop_reason)
