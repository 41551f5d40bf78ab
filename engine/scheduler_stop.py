"""The token-level stop rules the scheduler applies once a step's tokens are appended: EOS, stop token ids,
max_tokens, the context length and a structured output's grammar (stop strings need text: the output processor's)."""

from __future__ import annotations

import logging

from engine.request import Request, RequestStatus

logger = logging.getLogger(__name__)


def check_stop(request: Request, token_id: int, max_model_len: int) -> None:
    """Sets the request's finished status when `token_id`, just appended, ends it."""
    params = request.sampling_params
    if request.num_output_tokens >= params.min_tokens:
        if not params.ignore_eos and token_id in request.eos_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            return
        if token_id in params.stop_token_ids:
            request.status = RequestStatus.FINISHED_STOPPED
            request.stop_reason = token_id
            return
    if request.max_tokens is not None and request.num_output_tokens >= request.max_tokens:
        request.status = RequestStatus.FINISHED_LENGTH
    elif request.num_tokens >= max_model_len:
        request.status = RequestStatus.FINISHED_LENGTH


def grammar_stops(request: Request, token_id: int) -> bool:
    """Advances the request's matcher; True when that ended the request: the grammar is complete ("stop") or,
    which the bitmask should make impossible, refused the token ("error")."""
    if not request.grammar.accept(token_id):
        logger.error("request %s: the grammar refused token %d", request.request_id, token_id)
        request.status = RequestStatus.FINISHED_ERROR
    elif request.grammar.terminated:
        request.status = RequestStatus.FINISHED_STOPPED
    return request.is_finished


def stops_by_length_with_pending(request: Request, max_model_len: int) -> bool:
    """Whether the tokens still in flight (async scheduling) end the request by length: another would be wasted."""
    num_outputs = request.num_output_tokens + request.num_pending_outputs
    return ((request.max_tokens is not None and num_outputs >= request.max_tokens)
            or request.num_scheduled_tokens >= max_model_len)
