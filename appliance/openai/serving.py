"""The request path that completions and chat share, in the order a request takes it.

read_request -> check_limits (before any tokenizing) -> open_model (route by name) -> sampling_params ->
[the endpoint tokenizes or renders its prompt in a worker thread] -> start (validation against the model,
admission, engine requests) -> respond with `appliance.openai.generation` (`stream_response` or `collect`).

Every step gets what it needs from its caller (the `ServingContext`, the request's id); failures raise `APIError`
or `InvalidParameterError`, which `appliance.errors` turns into OpenAI's error object.
"""

from __future__ import annotations

import hashlib
import logging
from appliance.version import kvbox_version
from typing import NamedTuple

import msgspec
from litestar import Request

from appliance.config import ServerSpec
from appliance.config.schema import SamplingDefaults
from appliance.engines import EngineClient
from appliance.errors import RETRY_UNAVAILABLE_S, APIError
from appliance.openai.context import ServingContext, serving_context
from appliance.openai.generation import Generation
from appliance.openai.prompts import Prompt
from appliance.openai.protocol import SamplingFields
from appliance.openai.strict import decode
from appliance.supervisor import ModelRuntime
from engine.contract import PoolingParams
from engine.sampling_params import SamplingParams
from engine.structured_output.params import StructuredOutputsParams
from engine.validation import validate_pooling_prompt, validate_prompt

logger = logging.getLogger("kvbox.api")

# Request fields that fall back to the model's configured `default_sampling` when a request leaves them out.
_DEFAULTABLE = ("temperature", "top_p", "top_k", "min_p", "presence_penalty", "frequency_penalty",
                "repetition_penalty")


async def read_request(request: Request, type_: type[msgspec.Struct]) -> msgspec.Struct:
    """The body as `type_`; unknown fields are refused unless the server is configured to ignore them. The body is
    read as JSON whatever its Content-Type says (`curl -d` sends a form type), but never compressed."""
    encoding = request.headers.get("content-encoding", "identity")
    if encoding.lower() != "identity":
        raise APIError(415, f"Content-Encoding {encoding!r} is not supported; send the JSON body uncompressed",
                       param="Content-Encoding")
    ignore_unknown = serving_context(request).server.ignore_unknown_fields
    return decode(await request.body(), type_, ignore_unknown)


def check_limits(server: ServerSpec, req: SamplingFields, *, max_tokens: tuple[str, int | None],
                 logprobs: tuple[str, int | None], prompt_chars: tuple[str, int]) -> None:
    """The server's caps and OpenAI's ranges, checked before tokenizing so that an oversized request costs nothing.
    Each argument is (the request's name for the field, its value)."""
    _check_consistency(req)
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
    if req.prompt_logprobs is not None and req.prompt_logprobs > server.max_logprobs:
        raise APIError.invalid("prompt_logprobs", f"prompt_logprobs is {req.prompt_logprobs}; this server allows at "
                                                  f"most {server.max_logprobs}")
    param, num_chars = prompt_chars
    if num_chars > server.max_prompt_chars:
        raise APIError.invalid(param, f"the prompt has {num_chars} characters; this server allows at most "
                                      f"{server.max_prompt_chars}")


def _check_consistency(req: SamplingFields) -> None:
    """Where OpenAI's (or vLLM's) server refuses a combination or a range that the engine alone would accept."""
    if req.stream_options is not None and not req.stream:
        raise APIError.invalid("stream_options", "stream_options is only allowed with stream: true")
    if req.prompt_logprobs is not None and req.stream:
        raise APIError.invalid("prompt_logprobs", "prompt_logprobs are not available when stream is true")
    if req.temperature is not None and not 0 <= req.temperature <= 2:
        raise APIError.invalid("temperature", f"temperature must be in [0, 2] (OpenAI's range), got "
                                              f"{req.temperature}")
    if req.truncate_prompt_tokens is not None and req.truncate_prompt_tokens < 1:
        raise APIError.invalid("truncate_prompt_tokens", "truncate_prompt_tokens must be >= 1 (the number of the "
                                                         "prompt's last tokens to keep)")


class Target(NamedTuple):
    """Where a request goes: its model, the replica that serves it, and the LoRA adapter its name picked."""
    model: ModelRuntime
    client: EngineClient
    lora_name: str | None


async def open_model(context: ServingContext, name: str, tasks: tuple[str, ...] = ("generate",)) -> Target:
    """The model a request names (a LoRA adapter's name routes to its base model), woken if it sleeps, and its
    least-loaded replica; a model whose task is not one of `tasks` (chat on an embedder) is refused."""
    supervisor = context.supervisor
    if supervisor.draining:
        raise APIError(503, "the server is shutting down", code="draining", retry_after=RETRY_UNAVAILABLE_S)
    model, lora_name = supervisor.resolve(name)
    if model.spec.task not in tasks:
        raise APIError(400, f"model {name!r} serves task {model.spec.task!r}; this route needs a model of task "
                            f"{' or '.join(map(repr, tasks))}", param="model", code="wrong_model_task")
    await context.fleet.ensure_awake(model)
    return Target(model, model.pick_replica(), lora_name)


def fingerprint(model: ModelRuntime) -> str:
    """OpenAI's `system_fingerprint`: it changes when kvbox's version or the model's configuration does, either of
    which may change what the same seed gives."""
    return "fp_" + hashlib.sha256(msgspec.json.encode([kvbox_version(), model.spec])).hexdigest()[:12]


def sampling_params(req: SamplingFields, defaults: SamplingDefaults, *, max_tokens: int | None,
                    default_max_tokens: int | None, logprobs: int | None,
                    prompt_logprobs: int | None = None,
                    structured_outputs: StructuredOutputsParams | None = None) -> SamplingParams:
    """Request fields, else the model's defaults (`ModelRuntime.sampling_defaults`: the YAML's over the
    checkpoint's), else SamplingParams' own defaults."""
    options = {}
    for name in _DEFAULTABLE:
        value = getattr(req, name)
        if value is None:
            value = getattr(defaults, name)
        if value is not None:
            options[name] = value
    if max_tokens is None:
        max_tokens = defaults.max_tokens
    return SamplingParams(
        **options,
        n=1 if req.n is None else req.n,
        max_tokens=default_max_tokens if max_tokens is None else max_tokens,
        logit_bias=_logit_bias(req.logit_bias),
        seed=req.seed,
        stop=req.stop or [],
        stop_token_ids=req.stop_token_ids or [],
        bad_words=req.bad_words or [],
        allowed_token_ids=req.allowed_token_ids,
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
          req: SamplingFields | None, prompt_param: str, max_tokens_param: str | None = None,
          pooling: list[PoolingParams] | None = None, kv_parents: list[str | None] | None = None) -> Generation:
    """Checks the prompts against the model, admits the request and starts its engine requests. `req` gives the
    priority and cache salt (None: the defaults); `max_tokens_param` names the request's max_tokens field if it gave
    one (a value beyond the context is then refused); with `pooling`, one per prompt: an embed or score model's;
    `kv_parents`: a beam search step's (see `Generation`)."""
    info = target.client.info
    for i, (_, token_ids) in enumerate(prompts):
        if pooling is not None:
            validate_pooling_prompt(token_ids, pooling[i], info.pooler, max_model_len=info.max_model_len,
                                    vocab_size=info.vocab_size, param=prompt_param)
        else:
            validate_prompt(token_ids, params, max_model_len=info.max_model_len, vocab_size=info.vocab_size,
                            param=prompt_param, max_tokens_param=max_tokens_param)
    model = target.model
    # With data parallelism the replica is chosen again, now that the prompt is known (prefix-cache affinity).
    client = model.pick_replica(prompts[0][1]) if model.router is not None else target.client
    context.admission.acquire(model, request_id, len(prompts))
    logger.debug("request %s: %d prompt(s) to %s[%d]", request_id, len(prompts), model.name, client.replica)
    return Generation(client, request_id, prompts, params, metrics=context.metrics, stats=context.stats,
                      priority=req.priority if req is not None else 0,
                      cache_salt=req.cache_salt if req is not None else None, lora_name=target.lora_name,
                      pooling=pooling, kv_parents=kv_parents,
                      on_done=lambda: context.admission.release(model.name, request_id))
