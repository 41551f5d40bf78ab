"""POST /v1/embeddings as OpenAI defines it: `input` a string, strings, token ids or token-id lists, one engine
request each; `encoding_format` float or base64 (little-endian float32, what the openai SDK decodes); `dimensions`
for Matryoshka models. Also the pooling routes' shared path, `pool`: start the engine requests, collect vectors."""

from __future__ import annotations

import asyncio
import base64

import numpy as np
from litestar import Request, Response, post

from appliance.errors import APIError
from appliance.openai.context import ServingContext, serving_context
from appliance.openai.generation import collect
from appliance.openai.pooling_protocol import EmbeddingData, EmbeddingRequest, EmbeddingResponse, PoolingUsage
from appliance.openai.prompts import Prompt, prompt_inputs, tokenize_inputs
from appliance.openai.protocol import now
from appliance.openai.serving import Target, open_model, read_request, start
from appliance.request_ids import request_id
from engine.contract import PoolingParams
from engine.pooling.inputs import POOLING_SAMPLING, decode_vector

# OpenAI's own limit on inputs per embeddings request.
MAX_INPUTS = 2048


@post("/v1/embeddings", status_code=200)
async def create_embeddings(request: Request) -> Response:
    req: EmbeddingRequest = await read_request(request, EmbeddingRequest)
    inputs = prompt_inputs(req.input, "input")
    if len(inputs) > MAX_INPUTS:
        raise APIError.invalid("input", f"{len(inputs)} inputs; at most {MAX_INPUTS} per request")
    context = serving_context(request)
    num_chars = sum(len(i) for i in inputs if isinstance(i, str))
    if num_chars > context.server.max_prompt_chars:
        raise APIError.invalid("input", f"the input has {num_chars} characters; this server allows at most "
                                        f"{context.server.max_prompt_chars}")
    target = await open_model(context, req.model, ("embed",))
    prompts = (await asyncio.to_thread(tokenize_inputs, target.model.tokenizer, inputs, False)
               if num_chars else [(None, list(i)) for i in inputs])
    vectors = await pool(request, context, target, prompts, [PoolingParams(dimensions=req.dimensions)] * len(prompts),
                         "input")
    data = [EmbeddingData(i, _encode(v, req.encoding_format)) for i, v in enumerate(vectors)]
    num_tokens = sum(len(ids) for _, ids in prompts)
    rid = request_id(request)
    return Response(EmbeddingResponse(f"embd-{rid}", now(), req.model, data, PoolingUsage(num_tokens, num_tokens)))


async def pool(request: Request, context: ServingContext, target: Target, prompts: list[Prompt],
               pooling: list[PoolingParams], param: str) -> list[np.ndarray]:
    """Each prompt's pooled vector (an embedding, or a cross-encoder's one score), in prompt order."""
    generation = start(context, request_id(request), target, prompts, POOLING_SAMPLING, None, param, pooling=pooling)
    outputs = await collect(request, generation)
    return [decode_vector(output.pooled) for output in outputs]


def _encode(vector: np.ndarray, encoding_format: str) -> list[float] | str:
    if encoding_format == "base64":
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()
