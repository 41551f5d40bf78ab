"""POST /v1/completions: one or several prompts (text or token ids), `echo`, and the legacy logprobs format."""

from __future__ import annotations

import asyncio

from litestar import Request, Response, post

from appliance.openai import structured
from appliance.openai.context import serving_context
from appliance.openai.generation import collect, stream_response
from appliance.openai.logprobs import completion_logprobs
from appliance.openai.prompts import Prompt, prompt_inputs, tokenize_inputs
from appliance.openai.protocol import Completion, CompletionChoice, CompletionRequest, Usage, now
from appliance.openai.serving import check_limits, open_model, read_request, sampling_params, start
from appliance.request_ids import request_id
from engine.output_processor import CompletionOutput, RequestOutput

OPENAI_DEFAULT_MAX_TOKENS = 16  # the completions API's default; chat's is "as many as fit"


@post("/v1/completions", status_code=200)
async def create_completion(request: Request) -> Response:
    req: CompletionRequest = await read_request(request, CompletionRequest)
    inputs = prompt_inputs(req.prompt)
    context = serving_context(request)
    check_limits(context.server, req, max_tokens=("max_tokens", req.max_tokens), logprobs=("logprobs", req.logprobs),
                 prompt_chars=("prompt", sum(len(p) for p in inputs if isinstance(p, str))))
    target = open_model(context.supervisor, req.model)
    params = sampling_params(req, target.model.spec, max_tokens=req.max_tokens,
                             default_max_tokens=OPENAI_DEFAULT_MAX_TOKENS, logprobs=req.logprobs,
                             prompt_logprobs=req.logprobs if req.echo else None,
                             structured_outputs=await structured.for_request(req, target, context.server))
    # Tokenizing text runs off the event loop; token-id prompts need nothing (their text only to echo it), and a
    # thread hop would queue them behind every request the loop has not parsed yet.
    tokenizer = target.model.tokenizer
    needs_tokenizer = req.echo or any(isinstance(p, str) for p in inputs)
    prompts = (await asyncio.to_thread(tokenize_inputs, tokenizer, inputs, req.echo) if needs_tokenizer
               else [(None, p) for p in inputs])
    generation = start(context, request_id(request), target, prompts, params, "prompt", req.priority)
    choices = _Choices(f"cmpl-{generation.request_id}", req.model, tokenizer, prompts, params.n, req.echo,
                       req.logprobs is not None)
    if req.stream:
        return stream_response(generation, choices.chunk, choices.usage_chunk if req.include_usage else None)
    outputs = await collect(request, generation)
    return Response(choices.response(outputs, generation.usage()))


class _Choices:
    """Builds the response's choices, whole or as stream chunks; a stream's first chunk of a choice carries the
    echoed prompt, and its logprobs' text offsets continue from chunk to chunk."""

    def __init__(self, response_id: str, model: str, tokenizer, prompts: list[Prompt], n: int, echo: bool,
                 logprobs: bool):
        self.id, self.created, self.model = response_id, now(), model
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
