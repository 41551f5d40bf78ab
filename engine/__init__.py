"""kvbox's inference engine: paged KV cache, continuous batching, our own model implementations.

Offline use: `from engine import LLM, SamplingParams`.
"""

from engine.sampling_params import InvalidParameterError, SamplingParams

__all__ = ["InvalidParameterError", "SamplingParams"]
