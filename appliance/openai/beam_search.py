"""`"use_beam_search": true` on /v1/completions (vLLM's field): `n` beams per prompt, best first, with
`length_penalty` and `early_stopping`. The search (`engine.beam_search.BeamSearch`) runs its steps as ordinary
engine requests of max_tokens 1 on the model's replica, which share the beams' blocks through the prefix cache. The
scores are the model's logprobs, so temperature must be 0 (or unset); streaming, logprobs, echo, best_of and
structured outputs are refused with it. Usage counts the prompt once and the returned beams' tokens."""

from __future__ import annotations

from litestar import Request

from appliance.errors import APIError
from appliance.openai.context import ServingContext
from appliance.openai.generation import collect
from appliance.openai.prompts import Prompt
from appliance.openai.protocol import CompletionChoice, CompletionRequest, PromptTokensDetails, Usage
from appliance.openai.serving import Target, start
from engine.beam_search import BeamSearch, BeamSearchParams

_REFUSED = (("stream", "streaming"), ("logprobs", "logprobs"), ("echo", "echo"), ("best_of", "best_of"),
            ("response_format", "structured outputs"), ("structured_outputs", "structured outputs"))


def check(req: CompletionRequest) -> None:
    if not req.use_beam_search:
        return
    for field, what in _REFUSED:
        if getattr(req, field, None) not in (None, False):
            raise APIError.invalid(field, f"{what} is not available with use_beam_search")
    if req.temperature:
        raise APIError.invalid("temperature", "beam search ranks by the model's logprobs; temperature must be 0")


async def run(request: Request, context: ServingContext, request_id: str, target: Target, req: CompletionRequest,
              prompts: list[Prompt], max_tokens: int) -> tuple[list[CompletionChoice], Usage]:
    """The choices (n per prompt, best first) and the usage."""
    info = target.client.info
    n = 1 if req.n is None else req.n
    params = BeamSearchParams(beam_width=n, max_tokens=max_tokens, ignore_eos=req.ignore_eos,
                              length_penalty=req.length_penalty, early_stopping=req.early_stopping)
    search = BeamSearch([ids for _, ids in prompts], params, frozenset(info.eos_token_ids), info.max_model_len)
    step = 0
    while sequences := search.pending():
        generation = start(context, f"{request_id}-beam{step}", target, [(None, ids) for ids in sequences],
                           search.step_params, req, "prompt")
        outputs = await collect(request, generation)
        search.update([output.outputs[0].logprobs[0] for output in outputs])
        step += 1
    tokenizer = target.model.tokenizer
    results = search.results(lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))
    choices = [CompletionChoice(i * n + j, sequence.text, None, "stop" if sequence.finished else "length")
               for i, result in enumerate(results) for j, sequence in enumerate(result.sequences)]
    num_prompt = sum(len(ids) for _, ids in prompts)
    num_completion = sum(len(s.tokens) for result in results for s in result.sequences)
    return choices, Usage(num_prompt, num_completion, num_prompt + num_completion, PromptTokensDetails(0))
