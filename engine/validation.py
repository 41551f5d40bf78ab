"""The one check of a request against the model it goes to, for every front end (the appliance, the offline `LLM`).

The engine core trusts its input: whatever reaches `EngineCore.add_request` has passed `validate_prompt`. Each
failure is an `InvalidParameterError` whose `param` names the request's field, which the appliance turns into
OpenAI's error object.
"""

from __future__ import annotations

from engine.contract import PoolerInfo, PoolingParams
from engine.sampling_params import InvalidParameterError, SamplingParams


def validate_prompt(token_ids: list[int], params: SamplingParams, *, max_model_len: int, vocab_size: int,
                    param: str = "prompt", max_tokens_param: str | None = None) -> None:
    """Checks that the prompt is non-empty, leaves room for one generated token, and names only tokens of the
    vocabulary, and that the parameters fit the model; `param` is the request's name for the prompt.

    `max_tokens_param` names the request's explicit max_tokens field, whose value must then fit in what the
    context leaves after the prompt (vLLM's server refuses it too); without it a too-large max_tokens is lowered."""
    if not token_ids:
        raise InvalidParameterError(param, "the prompt is empty")
    if len(token_ids) >= max_model_len:
        raise InvalidParameterError(param, f"the prompt has {len(token_ids)} tokens, but this model's context "
                                           f"length is {max_model_len} (and at least one token must be generated)")
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        raise InvalidParameterError(param, f"token ids must be in [0, {vocab_size})")
    if max_tokens_param is not None and params.max_tokens is not None \
            and len(token_ids) + params.max_tokens > max_model_len:
        raise InvalidParameterError(max_tokens_param, f"this model's context length is {max_model_len} tokens; the "
                                                      f"prompt has {len(token_ids)} and {max_tokens_param} asks for "
                                                      f"{params.max_tokens} more")
    params.verify_for_model(vocab_size)


def validate_pooling_prompt(token_ids: list[int], pooling: PoolingParams, pooler: PoolerInfo, *, max_model_len: int,
                            vocab_size: int, param: str = "input") -> None:
    """A pooling request: a non-empty prompt that fits the context whole (nothing is generated after it), tokens of
    the vocabulary, and a `dimensions` the model can be truncated to."""
    if not token_ids:
        raise InvalidParameterError(param, "the input is empty")
    if len(token_ids) > max_model_len:
        raise InvalidParameterError(param, f"the input has {len(token_ids)} tokens, but this model takes at most "
                                           f"{max_model_len}")
    if min(token_ids) < 0 or max(token_ids) >= vocab_size:
        raise InvalidParameterError(param, f"token ids must be in [0, {vocab_size})")
    if pooling.dimensions is not None:
        allowed = pooler.matryoshka_dimensions
        if allowed is None:
            raise InvalidParameterError("dimensions", "this model does not support `dimensions` (it is not a "
                                                      "Matryoshka model)")
        if pooling.dimensions not in allowed:
            raise InvalidParameterError("dimensions", f"this model's embeddings can be truncated to "
                                                      f"{', '.join(map(str, allowed))}; got {pooling.dimensions}")
    if pooling.token_type_ids is not None and len(pooling.token_type_ids) != len(token_ids):
        raise InvalidParameterError(param, "token_type_ids must have one entry per token")
