"""POST /v1/score (vLLM: `text_1` against `text_2`, one-to-one or one-to-many) and POST /v1/rerank, /v2/rerank (the
Jina / Cohere shape: `query`, `documents`, `top_n` -> `results` sorted by `relevance_score`).

A cross-encoder (task score) reads each pair together, its score the sigmoid of its one label; an embedding model
(task embed) scores a pair by the cosine similarity of the two texts' embeddings, as vLLM does.
"""

from __future__ import annotations

import asyncio

import numpy as np
from litestar import Request, Response, post

from appliance.errors import APIError
from appliance.openai.context import serving_context
from appliance.openai.embeddings import MAX_INPUTS, pool
from appliance.openai.pooling_protocol import (PoolingUsage, RerankDocument, RerankRequest, RerankResponse,
                                               RerankResult, ScoreData, ScoreRequest, ScoreResponse)
from appliance.openai.protocol import now
from appliance.openai.serving import Target, open_model, read_request
from appliance.request_ids import request_id
from engine.contract import PoolingParams
from engine.pooling.inputs import encode_pair

_TASKS = ("score", "embed")


@post("/v1/score", status_code=200)
async def create_score(request: Request) -> Response:
    req: ScoreRequest = await read_request(request, ScoreRequest)
    firsts = [req.text_1] if isinstance(req.text_1, str) else req.text_1
    seconds = [req.text_2] if isinstance(req.text_2, str) else req.text_2
    if not firsts or not seconds:
        raise APIError.invalid("text_1" if not firsts else "text_2", "must not be empty")
    if len(firsts) == 1:
        firsts = firsts * len(seconds)
    if len(firsts) != len(seconds):
        raise APIError.invalid("text_2", f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}; give one "
                                         f"text_1, or as many as text_2")
    scores, num_tokens = await _score(request, req.model, firsts, seconds, "text_2")
    data = [ScoreData(i, s) for i, s in enumerate(scores)]
    return Response(ScoreResponse(f"score-{request_id(request)}", now(), req.model, data,
                                  PoolingUsage(num_tokens, num_tokens)))


@post(["/v1/rerank", "/v2/rerank", "/rerank"], status_code=200)
async def rerank(request: Request) -> Response:
    req: RerankRequest = await read_request(request, RerankRequest)
    if not req.documents:
        raise APIError.invalid("documents", "must not be empty")
    scores, num_tokens = await _score(request, req.model, [req.query] * len(req.documents), req.documents,
                                      "documents")
    order = sorted(range(len(scores)), key=lambda i: -scores[i])[:req.top_n or None]
    results = [RerankResult(i, scores[i], RerankDocument(req.documents[i]) if req.return_documents else None)
               for i in order]
    return Response(RerankResponse(f"rerank-{request_id(request)}", req.model, results,
                                   PoolingUsage(num_tokens, num_tokens)))


async def _score(request: Request, model: str, firsts: list[str], seconds: list[str],
                 param: str) -> tuple[list[float], int]:
    """Each pair's score and the tokens read."""
    if len(seconds) > MAX_INPUTS:
        raise APIError.invalid(param, f"{len(seconds)} texts; at most {MAX_INPUTS} per request")
    context = serving_context(request)
    num_chars = sum(map(len, firsts)) + sum(map(len, seconds))
    if num_chars > context.server.max_prompt_chars:
        raise APIError.invalid(param, f"the texts have {num_chars} characters; this server allows at most "
                                      f"{context.server.max_prompt_chars}")
    target = await open_model(context, model, _TASKS)
    if target.model.spec.task == "score":
        pairs = await asyncio.to_thread(_encode_pairs, target, firsts, seconds)
        vectors = await pool(request, context, target, [(None, ids) for ids, _ in pairs], [p for _, p in pairs],
                             param)
        return [float(v[0]) for v in vectors], sum(len(ids) for ids, _ in pairs)
    texts = list(dict.fromkeys([*firsts, *seconds]))  # each distinct text embedded once
    token_ids = await asyncio.to_thread(lambda: [target.model.tokenizer.encode(t) for t in texts])
    vectors = await pool(request, context, target, [(None, ids) for ids in token_ids],
                         [PoolingParams()] * len(texts), param)
    by_text = dict(zip(texts, vectors))
    return [_cosine(by_text[a], by_text[b]) for a, b in zip(firsts, seconds)], sum(map(len, token_ids))


def _encode_pairs(target: Target, firsts: list[str], seconds: list[str]) -> list[tuple[list[int], PoolingParams]]:
    return [encode_pair(target.model.tokenizer, a, b) for a, b in zip(firsts, seconds)]


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.dot(a, b) / max(float(np.linalg.norm(a) * np.linalg.norm(b)), 1e-12))
