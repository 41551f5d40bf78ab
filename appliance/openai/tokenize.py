"""POST /tokenize and /detokenize, in vLLM's shapes: a prompt or chat messages to token ids, and back."""

from __future__ import annotations

import asyncio

from litestar import Request, post

from appliance.errors import APIError
from appliance.openai.context import serving_context
from appliance.openai.openapi import request_body
from appliance.openai.prompts import chat_messages, check_continuation, render_prompt
from appliance.openai.protocol import DetokenizeRequest, DetokenizeResponse, TokenizeRequest, TokenizeResponse
from appliance.openai.serving import read_request
from appliance.supervisor import ModelRuntime, ModelUnavailableError, Supervisor


@post("/tokenize", status_code=200, operation_class=request_body(TokenizeRequest))
async def tokenize(request: Request) -> TokenizeResponse:
    req: TokenizeRequest = await read_request(request, TokenizeRequest)
    if (req.prompt is None) == (req.messages is None):
        raise APIError.invalid("prompt", "give either prompt or messages")
    messages = chat_messages(req.messages) if req.messages is not None else None
    if messages is not None:
        check_continuation(messages, req.add_generation_prompt, req.continue_final_message)
    num_chars = len(req.prompt) if messages is None else sum(len(m["content"]) for m in messages)
    context = serving_context(request)
    limit = context.server.max_prompt_chars
    if num_chars > limit:
        raise APIError.invalid("prompt" if messages is None else "messages",
                               f"the prompt has {num_chars} characters; this server allows at most {limit}")
    model = _model(context.supervisor, req.model)
    if messages is None:
        tokens = await asyncio.to_thread(model.tokenizer.encode, req.prompt, add_special_tokens=req.add_special_tokens)
    else:
        _, tokens = await asyncio.to_thread(render_prompt, model, messages, req.add_generation_prompt,
                                            continue_final_message=req.continue_final_message,
                                            template_kwargs=req.chat_template_kwargs)
    info = model.info
    return TokenizeResponse(len(tokens), info.max_model_len if info is not None else None, tokens,
                            model.tokenizer.convert_ids_to_tokens(tokens) if req.return_token_strs else None)


@post("/detokenize", status_code=200, operation_class=request_body(DetokenizeRequest))
async def detokenize(request: Request) -> DetokenizeResponse:
    req: DetokenizeRequest = await read_request(request, DetokenizeRequest)
    model = _model(serving_context(request).supervisor, req.model)
    vocab_size = len(model.tokenizer)
    if any(not 0 <= t < vocab_size for t in req.tokens):
        raise APIError.invalid("tokens", f"token ids must be in [0, {vocab_size})")
    return DetokenizeResponse(await asyncio.to_thread(model.tokenizer.decode, req.tokens))


def _model(supervisor: Supervisor, name: str | None) -> ModelRuntime:
    """The named model (an adapter name means its base model, whose tokenizer it shares); the name may be left out
    when the server has only one."""
    if name is None:
        if len(supervisor.models) != 1:
            raise APIError.invalid("model", "this server has several models; name one")
        name = next(iter(supervisor.models))
    model, _ = supervisor.resolve(name)
    if model.tokenizer is None:
        raise ModelUnavailableError(name, model.status)
    return model
