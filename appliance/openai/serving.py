"""The request path that completions and chat share, in the order a request takes it.

read_request -> check_limits (before any tokenizing) -> open_model (route by name) -> sampling_params ->
[the endpoint tokenizes or renders its prompt in a worker thread] -> start (validation against the model,
admission, engine requests) -> respond with `appliance.openai.generation` (`stream_response` or `collect`).

Every step gets what it needs from its caller (the `ServingContext`, the request's id); failures raise `APIError`
or `InvalidParameterError`, which `appliance.errors` turns into OpenAI's error object.
"""

from __future__ import annotations

import logging
import re
from typing import NamedTuple

import msgspec
from litestar import Request

from appliance.config import ModelSpec, ServerSpec
from appliance.engines import EngineClient
from appliance.errors import RETRY_UNAVAILABLE_S, APIError
from appliance.openai.context import ServingContext
from appliance.openai.generation import Generation
from appliance.openai.prompts import Prompt
from appliance.openai.protocol import SamplingFields
from appliance.supervisor import ModelRuntime, Supervisor
from engine.sampling_params import SamplingParams
from engine.structured_output.params import StructuredOutputsParams
from engine.validation import validate_prompt

logger = logging.getLogger("kvbox.api")

# Request fields that fall back to the model's configured `default_sampling` when a request leaves them out.
_DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty")


async def read_request(request: Request, type_: type[msgspec.Struct]) -> msgspec.Struct:
    return decode(await request.body(), type_)


def decode(body: bytes, type_: type[msgspec.Struct]) -> msgspec.Struct:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        raise APIError.invalid(*_validation_param(str(e))) from None
    except msgspec.DecodeError as e:
        raise APIError.invalid(None, f"the request body is not valid JSON: {e}") from None


def _validation_param(message: str) -> tuple[str | None, str]:
    """("messages[0].role", message) from msgspec's "... - at `$.messages[0].role`" or "missing field `model`"."""
    at = re.search(r" - at `\$(.*)`$", message)
    path = at.group(1).lstrip(".") if at else ""
    missing = re.match(r"Object missing required field `(.+?)`", message)
    if missing:
        path = f"{path}.{missing.group(1)}" if path else missing.group(1)
    return path or None, message


def check_limits(server: ServerSpec, req: SamplingFields, *, max_tokens: tuple[str, int | None],
                 logprobs: tuple[str, int | None], prompt_chars: tuple[str, int]) -> None:
    """The server's caps, checked before tokenizing so that an oversized request costs nothing. Each argument is
    (the request's name for the field, its value)."""
    if req.n is not None and req.n > server.max_n:
        raise APIError.invalid("n", f"n is {req.n}; this server allows at most {server.max_n}")
    for (param, value), cap in ((max_tokens, server.max_tokens), (logprobs, server.max_logprobs)):
        if value is not None and value > cap:
            raise APIError.invalid(param, f"{param} is {value}; this server allows at most {cap}")
    stop = [req.stop] if isinstance(req.stop, str) else req.stop or []
    if len(stop) > server.max_stop_strings:
        raise APIError.invalid("stop", f"{len(stop)} stop strings; this server allows at most "
                                       f"{server.max_stop_strings}")
    if any(len(s) > server.max_stop_string_length for s in stop):
        raise APIError.invalid("stop", f"a stop string is longer than {server.max_stop_string_length} characters")
    param, num_chars = prompt_chars
    if num_chars > server.max_prompt_chars:
        raise APIError.invalid(param, f"the prompt has {num_chars} characters; this server allows at most "
                                      f"{server.max_prompt_chars}")


class Target(NamedTuple):
    """Where a request goes: its model, the replica that serves it, and the LoRA adapter its name picked."""
    model: ModelRuntime
    client: EngineClient
    lora_name: str | None


def open_model(supervisor: Supervisor, name: str) -> Target:
    """The model a request names (a LoRA adapter's name routes to its base model) and its least-loaded replica."""
    if supervisor.draining:
        raise APIError(503, "the server is shutting down", code="draining", retry_after=RETRY_UNAVAILABLE_S)
    model, lora_name = supervisor.resolve(name)
    return Target(model, model.pick_replica(), lora_name)


def sampling_params(req: SamplingFields, spec: ModelSpec, *, max_tokens: int | None, default_max_tokens: int | None,
                    logprobs: int | None, prompt_logprobs: int | None = None,
                    structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    """Request fields, else the model's configured defaults, else SamplingParams' own defaults."""
    defaults = spec.default_sampling
    options = {}
    for name in _DEFAULTABLE:
        value = getattr(req, name)
        if value is None and defaults is not None:
            value = getattr(defaults, name)
        if value is not None:
            options[name] = value
    if max_tokens is None and defaults is not None:
        max_tokens = defaults.max_tokens
    return SamplingParams(
        **options,
        n=1 if req.n is None else req.n,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        logit_bias=_logit_bias(req.logit_bias),
        seed=req.seed,
        stop=req.stop or [],
        stop_token_ids=req.stop_token_ids or [],
        ignore_eos=req.ignore_eos,
        min_tokens=req.min_tokens,
        include_stop_str_in_output=req.include_stop_str_in_output,
        skip_special_tokens=req.skip_special_tokens,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        structured_outputs=structured_outputs,
    )


def _logit_bias(bias: dict[str, float] | None) -> dict[int, float] | None:
    if not bias:
        return None
    try:
        return {int(token_id): value for token_id, value in bias.items()}
    except ValueError:
        raise APIError.invalid("logit_bias", "keys must be token ids (integers as strings)") from None


def start(context: ServingContext, request_id: str, target: Target, prompts: list[Prompt], params: SamplingParams,
          prompt_param: str, priority: int = 0) -> Generation:
    """Checks the prompts against the model, admits the request and starts its engine requests."""
    info = target.client.info
    for _, token_ids in prompts:
        validate_prompt(token_ids, params, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                        param=prompt_param)
    model = target.model
    context.admission.acquire(model, request_id, len(prompts))
    logger.debug("request %s: %d prompt(s) to %s[%d]", request_id, len(prompts), model.name, target.client.replica)
    return Generation(target.client, request_id, prompts, params, metrics=context.metrics, stats=context.stats,
                      priority=priority, lora_name=target.lora_name,
                      on_done=lambda: context.admission.release(model.name, request_id))
