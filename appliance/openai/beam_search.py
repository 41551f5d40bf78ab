"""vLLM's `"use_beam_search": true` on /v1/completions and /v1/chat/completions: `n` beams per prompt, best first,
with `length_penalty` and `early_stopping`. The search (`engine.beam_search.BeamSearch`) runs its steps as engine
requests of max_tokens 1 on the model's replica. Each step's requests keep their K/V and the next step's fork from
it (shared blocks, copy-on-write of a partial one); the previous step's K/V is released once the next step is
queued, and the last one's when the search ends, however it ends (a client gone, an engine failure). The scores are
the model's logprobs, so temperature must be 0 (or unset); streaming, logprobs, echo, best_of, tools and structured
outputs are refused with it. Usage counts the prompt once and the returned beams' tokens."""

from __future__ import annotations

import itertools

from litestar import Request

from appliance.errors import APIError
from appliance.openai.context import ServingContext
from appliance.openai.generation import Generation, collect
from appliance.openai.prompts import Prompt
from appliance.openai.protocol import PromptTokensDetails, SamplingFields, Usage
from appliance.openai.serving import Target, start
from engine.beam_search import BeamSearch, BeamSearchOutput, BeamSearchParams, BeamSearchSequence
from engine.sampling_params import MAX_LOGPROBS

MAX_BEAM_WIDTH = MAX_LOGPROBS // 2  # each step asks for the top 2 * width logprobs
_REFUSED = (("stream", "streaming"), ("logprobs", "logprobs"), ("prompt_logprobs", "prompt_logprobs"),
            ("echo", "echo"), ("best_of", "best_of"), ("tools", "tools"),
            ("response_format", "structured outputs"), ("structured_outputs", "structured outputs"),
            ("guided_json", "structured outputs"), ("guided_regex", "structured outputs"),
            ("guided_choice", "structured outputs"), ("guided_grammar", "structured outputs"))


def check(req: SamplingFields) -> None:
    """What beam search cannot honour, refused naming the field (before any tokenizing)."""
    if not req.use_beam_search:
        return
    for field, what in _REFUSED:
        if getattr(req, field, None) not in (None, False):
            raise APIError.invalid(field, f"{what} is not available with use_beam_search")
    if req.temperature:
        raise APIError.invalid("temperature", "beam search ranks by the model's logprobs; temperature must be 0")
    if req.n is not None and req.n > MAX_BEAM_WIDTH:
        raise APIError.invalid("n", f"n is {req.n} beams; beam search allows at most {MAX_BEAM_WIDTH}")


async def run(request: Request, context: ServingContext, request_id: str, target: Target, req: SamplingFields,
              prompts: list[Prompt], max_tokens: int, prompt_param: str) -> list[BeamSearchOutput]:
    """Each prompt's n best sequences, best first, with their text."""
    info = target.client.info
    params = BeamSearchParams(beam_width=1 if req.n is None else req.n, max_tokens=max_tokens,
                              ignore_eos=req.ignore_eos, length_penalty=req.length_penalty,
                              early_stopping=req.early_stopping)
    search = BeamSearch([ids for _, ids in prompts], params, frozenset(info.eos_token_ids), info.max_model_len)
    kept: Generation | None = None  # the last step, whose K/V the next one forks from
    try:
        for step in itertools.count():
            if not (sequences := search.pending()):
                break
            generation = start(context, f"{request_id}-beam{step}", target, [(None, ids) for ids, _ in sequences],
                               search.step_params, req, prompt_param, kv_parents=[parent for _, parent in sequences])
            _release(kept)
            kept = generation
            outputs = await collect(request, generation)
            search.update(generation.engine_request_ids, [output.outputs[0].logprobs[0] for output in outputs])
    finally:
        _release(kept)
    tokenizer = target.model.tokenizer
    return search.results(lambda tokens: tokenizer.decode(tokens, skip_special_tokens=True))


def _release(generation: Generation | None) -> None:
    if generation is not None:
        generation.client.release_kv(generation.engine_request_ids)


def usage(prompts: list[Prompt], results: list[BeamSearchOutput]) -> Usage:
    num_prompt = sum(len(ids) for _, ids in prompts)
    num_completion = sum(len(s.tokens) for result in results for s in result.sequences)
    return Usage(num_prompt, num_completion, num_prompt + num_completion, PromptTokensDetails(0))


def finish_reason(sequence: BeamSearchSequence) -> str:
    return "stop" if sequence.finished else "length"
