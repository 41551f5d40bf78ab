"""The Responses API: `POST /v1/responses` (plain or streamed, `appliance.openai.responses_stream`),
`GET /v1/responses/{id}` (the stored response, or with `stream=true` its events replayed) and
`DELETE /v1/responses/{id}`.

A request runs as chat (`appliance.openai.chat.start_chat`, the request converted by
`appliance.openai.responses_input`): the same tools, structured outputs, sampling, limits and reasoning parser.
`previous_response_id` continues a stored response's conversation (`appliance.openai.responses_store`); one that
is not (or no longer) stored is a 404.
"""

from __future__ import annotations

from litestar import Request, Response, delete, get, post
from litestar.response import Stream

from appliance.errors import APIError, to_api_error
from appliance.openai import responses_stream
from appliance.openai.chat import start_chat
from appliance.openai.chat_reply import ReplyShaper
from appliance.openai.context import ServingContext, serving_context
from appliance.openai.generation import collect
from appliance.openai.logprobs import chat_logprobs
from appliance.openai.openapi import request_body
from appliance.openai.responses_input import chat_param, chat_request, input_messages
from appliance.openai.responses_output import Responder, output_items, status_of
from appliance.openai.responses_protocol import DeletedResponse, ResponsesRequest
from appliance.openai.responses_store import Stored
from appliance.openai.serving import read_request
from engine.sampling_params import InvalidParameterError


@post("/v1/responses", status_code=200, operation_class=request_body(ResponsesRequest))
async def create_response(request: Request) -> Response:
    req: ResponsesRequest = await read_request(request, ResponsesRequest)
    context = serving_context(request)
    history = [] if req.previous_response_id is None else _stored(
        context, req.previous_response_id, "previous_response_id").conversation
    messages = input_messages(req)
    instructions, new = (messages[:1], messages[1:]) if req.instructions is not None else ([], messages)
    try:
        run = await start_chat(request, chat_request(req), [*instructions, *history, *new])
    except (APIError, InvalidParameterError) as e:
        raise _renamed(to_api_error(e)) from None
    model = run.target.model
    responder = Responder(req, f"resp_{run.generation.request_id}", [*history, *new], model.tokenizer, context)
    shaper = ReplyShaper(run.tool_plan, model.spec.reasoning_parser)
    if req.stream:
        return responses_stream.stream(responder, run.generation, shaper, run.num_logprobs)
    completion = (await collect(request, run.generation))[0].outputs[0]
    message, finish_reason = shaper.message(completion.text, completion.finish_reason)
    logprobs = [] if run.num_logprobs is None else chat_logprobs(model.tokenizer, completion.logprobs,
                                                                 run.num_logprobs).content
    return Response(responder.finish(output_items(message, status_of(finish_reason), logprobs), finish_reason,
                                     run.generation.usage()))


@get("/v1/responses/{response_id:str}", sync_to_thread=False)
def retrieve_response(request: Request, response_id: str, stream: bool = False,
                      starting_after: int | None = None) -> Response | Stream:
    """The stored response, or (`stream=true`) its events, those numbered after `starting_after` only."""
    response = _stored(serving_context(request), response_id, "response_id").response
    if not stream:
        return Response(response)
    if starting_after is not None and starting_after < -1:
        raise APIError.invalid("starting_after", "starting_after is a sequence number: -1 or more")
    return responses_stream.replay(response, starting_after)


@delete("/v1/responses/{response_id:str}", status_code=200, sync_to_thread=False)
def delete_response(request: Request, response_id: str) -> DeletedResponse:
    if not serving_context(request).responses.delete(response_id):
        raise _not_found(response_id, "response_id")
    return DeletedResponse(response_id)


ROUTES = [create_response, retrieve_response, delete_response]


def _stored(context: ServingContext, response_id: str, param: str) -> Stored:
    stored = context.responses.get(response_id)
    if stored is None:
        raise _not_found(response_id, param)
    return stored


def _not_found(response_id: str, param: str) -> APIError:
    return APIError(404, f"Response with id {response_id!r} not found: it was never stored (store: false), or it "
                         f"was deleted or dropped from this server's store (server.responses_store_max)",
                    param=param, code="previous_response_not_found" if param == "previous_response_id"
                    else "response_not_found")


def _renamed(error: APIError) -> APIError:
    """A chat error, its field named as the Responses request spells it."""
    param = chat_param(error.param)
    if param != error.param and error.param is not None:
        error.message = error.message.replace(error.param.split(".")[0].split("[")[0],
                                              param.split(".")[0].split("[")[0])
        error.param = param
    return error
