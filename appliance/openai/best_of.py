"""`best_of` on /v1/completions (OpenAI's legacy field, vLLM's before v1): the engine draws best_of samples per
prompt and the response keeps the n with the highest cumulative logprob, best first. It needs the whole samples to
rank them, so it cannot stream (unless best_of equals n, which ranks nothing); its usage counts every sample drawn."""

from __future__ import annotations

import dataclasses

from appliance.config.schema import ServerSpec
from appliance.errors import APIError
from appliance.openai.protocol import CompletionRequest
from engine.output_processor import RequestOutput
from engine.sampling_params import SamplingParams


def check(server: ServerSpec, req: CompletionRequest) -> None:
    if req.best_of is None:
        return
    n = 1 if req.n is None else req.n
    if req.best_of < n:
        raise APIError.invalid("best_of", f"best_of ({req.best_of}) must be >= n ({n})")
    if req.best_of > server.max_n:
        raise APIError.invalid("best_of", f"best_of is {req.best_of}; this server allows at most {server.max_n}")
    if req.stream and req.best_of > n:
        raise APIError.invalid("best_of", "best_of > n cannot stream: the samples are ranked once they are complete")


def widen(req: CompletionRequest, params: SamplingParams) -> SamplingParams:
    """best_of samples instead of n, with the logprob of each sampled token (to rank them)."""
    if req.best_of is None or req.best_of == params.n:
        return params
    return dataclasses.replace(params, n=req.best_of, logprobs=0 if params.logprobs is None else params.logprobs)


def pick(outputs: list[RequestOutput], n: int, keep_logprobs: bool) -> list[RequestOutput]:
    """Each prompt's n samples of highest cumulative logprob, best first, renumbered 0..n-1."""
    for output in outputs:
        if len(output.outputs) == n:
            continue
        ranked = sorted(output.outputs, key=lambda c: sum(e.logprobs[0] for e in c.logprobs or ()), reverse=True)
        output.outputs = [dataclasses.replace(c, index=i, logprobs=c.logprobs if keep_logprobs else None)
                          for i, c in enumerate(ranked[:n])]
    return outputs
