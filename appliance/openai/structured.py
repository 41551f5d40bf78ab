"""A request's structured-output fields -> one `StructuredOutputsParams`, checked before the engine sees it.

Accepted spellings: OpenAI's `response_format` (`json_object`, `json_schema`), vLLM's `structured_outputs` and its
older `guided_json` / `guided_regex` / `guided_choice` / `guided_grammar`. At most one may be given. The check
compiles the grammar against the model's vocabulary (xgrammar caches it, so a repeated schema costs nothing) in a
worker thread, bounded by `server.max_grammar_compile_s`: a bad or too costly schema, regex or grammar is a 400
naming the request's field, and never reaches an engine.
"""

from __future__ import annotations

import asyncio
import threading
import weakref

from appliance.errors import APIError
from appliance.openai.protocol import SamplingFields
from engine.sampling_params import InvalidParameterError
from engine.structured_output.grammar import compile_grammar, make_compiler
from engine.structured_output.params import StructuredOutputsParams

_compilers: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # tokenizer -> its xgrammar compiler
_compilers_lock = threading.Lock()


def requested(req: SamplingFields) -> tuple[str, StructuredOutputsParams] | None:
    """(the request's field, its params), or None when the request asks for no structure."""
    given = [(field, spec) for field, spec in _spellings(req) if spec is not None]
    if len(given) > 1:
        raise APIError.invalid(given[1][0], f"{given[0][0]} and {given[1][0]} both constrain the output; give one")
    if not given:
        return None
    field, spec = given[0]
    try:
        return field, StructuredOutputsParams(**spec)
    except InvalidParameterError as e:
        raise APIError.invalid(field, e.message) from None


def _spellings(req: SamplingFields):
    fmt = req.response_format
    if fmt is not None and fmt.type == "json_object":
        yield "response_format", {"json_object": True}
    elif fmt is not None and fmt.type == "json_schema":
        if fmt.json_schema is None:
            raise APIError.invalid("response_format.json_schema", "a json_schema response format needs json_schema")
        schema = fmt.json_schema.schema
        yield "response_format.json_schema.schema", {"json_object": True} if schema is None else {"json": schema}
    so = req.structured_outputs
    if so is not None:
        yield "structured_outputs", {k: getattr(so, k) for k in so.__struct_fields__ if getattr(so, k) is not None}
    for kind in ("json", "regex", "choice", "grammar"):
        value = getattr(req, f"guided_{kind}")
        yield f"guided_{kind}", None if value is None else {kind: value}


async def for_request(req: SamplingFields, target, server) -> StructuredOutputsParams | None:
    """The request's structured outputs, compiled once against the model's vocabulary to check them."""
    found = requested(req)
    if found is None:
        return None
    field, params = found
    info = target.client.info
    await check(field, params, target.model.tokenizer, info.vocab_size, info.eos_token_ids,
                server.max_grammar_compile_s)
    return params


async def for_chat(req, tool_plan, target, server) -> StructuredOutputsParams | None:
    """Chat's structured outputs: the request's own, or the grammar a required or named tool choice imposes."""
    forced = tool_plan.structured_outputs if tool_plan is not None else None
    if forced is None:
        return await for_request(req, target, server)
    if requested(req) is not None:
        raise APIError.invalid("tool_choice", "a required or named tool choice fixes the output's format; it "
                                              "cannot be combined with response_format or structured outputs")
    info = target.client.info
    await check("tools", forced, target.model.tokenizer, info.vocab_size, info.eos_token_ids,
                server.max_grammar_compile_s)
    return forced


async def check(field: str, params: StructuredOutputsParams, tokenizer, vocab_size: int, eos_token_ids: list[int],
                timeout_s: float) -> None:
    """Compiles the grammar as the engine will, in a thread, within `timeout_s`; APIError (400) otherwise."""
    try:
        await asyncio.wait_for(asyncio.to_thread(_compile, params, tokenizer, vocab_size, eos_token_ids), timeout_s)
    except InvalidParameterError as e:
        raise APIError.invalid(_param(field, e.param), e.message) from None
    except TimeoutError:
        # The thread runs on to its end (a compilation cannot be interrupted); its result is dropped.
        raise APIError.invalid(field, f"the grammar did not compile within {timeout_s:g} s") from None


def _compile(params: StructuredOutputsParams, tokenizer, vocab_size: int, eos_token_ids: list[int]) -> None:
    with _compilers_lock:
        compiler = _compilers.get(tokenizer)
        if compiler is None:
            compiler = _compilers[tokenizer] = make_compiler(tokenizer, vocab_size, eos_token_ids)
    compile_grammar(compiler, params)


def _param(field: str, engine_param: str) -> str:
    """The request's name for the part that failed: structured_outputs.regex stays, guided_regex stays."""
    return engine_param if field == "structured_outputs" else field
