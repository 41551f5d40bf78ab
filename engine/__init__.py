"""kvbox's inference engine: paged KV cache, continuous batching, our own model implementations.

Offline use: `from engine import LLM, SamplingParams` (and `BeamSearchParams` for `LLM.beam_search`).
"""

from engine.beam_search import BeamSearchParams
from engine.sampling_params import InvalidParameterError, SamplingParams


def __getattr__(name: str):
    # LLM pulls in torch and transformers; import it lazily so that light users (configs, params) stay fast.
    if name == "LLM":
        from engine.llm import LLM

        return LLM
    raise AttributeError(name)


__all__ = ["LLM", "BeamSearchParams", "InvalidParameterError", "SamplingParams"]
