"""The wire format of the pooling routes' payloads: OpenAI's embeddings, vLLM's score, and the Jina / Cohere rerank
shape vLLM serves on /v1/rerank and /v2/rerank. Unknown request fields are refused: a field a client expects to
matter (an `input_type`, a `truncate` mode) must not be silently dropped."""

from __future__ import annotations

from typing import Annotated, Literal

import msgspec
from msgspec import Meta


class _Request(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    model: str
    user: str | None = None


class EmbeddingRequest(_Request, kw_only=True):
    # A string, a list of strings, a list of token ids or a list of token-id lists (see prompts.prompt_inputs).
    input: str | list[str | int | list[int]]
    encoding_format: Literal["float", "base64"] = "float"
    dimensions: Annotated[int, Meta(ge=1)] | None = None


class ScoreRequest(_Request, kw_only=True):
    text_1: str | list[str]
    text_2: str | list[str]


class RerankRequest(_Request, kw_only=True):
    query: str
    documents: list[str]
    top_n: Annotated[int, Meta(ge=0)] | None = None  # None or 0: every document
    return_documents: bool = True


class PoolingUsage(msgspec.Struct):
    prompt_tokens: int
    total_tokens: int


class EmbeddingData(msgspec.Struct):
    index: int
    embedding: list[float] | str  # str: base64 of little-endian float32
    object: str = "embedding"


class EmbeddingResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    data: list[EmbeddingData]
    usage: PoolingUsage
    object: str = "list"


class ScoreData(msgspec.Struct):
    index: int
    score: float
    object: str = "score"


class ScoreResponse(msgspec.Struct):
    id: str
    created: int
    model: str
    data: list[ScoreData]
    usage: PoolingUsage
    object: str = "list"


class RerankDocument(msgspec.Struct):
    text: str


class RerankResult(msgspec.Struct, omit_defaults=True):
    index: int
    relevance_score: float
    document: RerankDocument | None = None


class RerankResponse(msgspec.Struct):
    id: str
    model: str
    results: list[RerankResult]
    usage: PoolingUsage
