"""What a pooling request is made of, for every front end (the offline `LLM`, the appliance's routes): its token
ids (a cross-encoder's text pair with its token types), the sampling parameters its engine bookkeeping takes, and
its result decoded from the contract's bytes."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from engine.contract import PoolingParams
from engine.sampling_params import SamplingParams

# A pooling request samples nothing; the engine still tracks it as a request that "generates" at most one token.
POOLING_SAMPLING = SamplingParams(max_tokens=1)


def encode_pair(tokenizer, text_1: str, text_2: str) -> tuple[list[int], PoolingParams]:
    """A cross-encoder's input: both texts in the model's pair format, with token types where the tokenizer makes
    them (BERT: 0 for the first text, 1 for the second; RoBERTa has none)."""
    encoded = tokenizer(text_1, text_2)
    token_types = encoded.get("token_type_ids")
    return list(encoded["input_ids"]), PoolingParams(token_type_ids=list(token_types) if token_types else None)


def decode_vector(pooled: bytes) -> np.ndarray:
    return np.frombuffer(pooled, dtype="<f4")


@dataclass
class EmbeddingOutput:
    prompt_token_ids: list[int]
    embedding: list[float]


@dataclass
class ScoreOutput:
    prompt_token_ids: list[int]  # the pair, in the cross-encoder's format
    score: float
