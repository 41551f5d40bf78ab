"""StructuredOutputsParams -> an xgrammar compiled grammar for a model's vocabulary. The API compiles up front under
a time bound (bad input is a 400 there); the engine compiles again, off its step loop, cached.

JSON is generated compact (`any_whitespace=False`): with free whitespace a weak model emits newlines forever and
never closes its object. `strict_mode` keeps to the properties the schema names, so every output validates.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

from engine.sampling_params import InvalidParameterError
from engine.structured_output.params import StructuredOutputsParams

if TYPE_CHECKING:
    import xgrammar as xgr

_JSON_OBJECT_SCHEMA = '{"type": "object"}'


def compile_grammar(compiler: xgr.GrammarCompiler, params: StructuredOutputsParams) -> xgr.CompiledGrammar:
    kind, spec = params.key
    try:
        if kind == "json":
            return compiler.compile_json_schema(_schema_text(spec), any_whitespace=False)
        if kind == "json_object":
            return compiler.compile_json_schema(_JSON_OBJECT_SCHEMA, any_whitespace=False)
        if kind == "regex":
            return compiler.compile_regex(spec)
        if kind == "choice":
            return compiler.compile_grammar(choice_ebnf(params.choice))
        return compiler.compile_grammar(spec)
    except (RuntimeError, ValueError, TypeError) as e:
        raise InvalidParameterError(f"structured_outputs.{kind}", _reason(e)) from None


def make_compiler(tokenizer, vocab_size: int, stop_token_ids: list[int], max_threads: int = 1) -> xgr.GrammarCompiler:
    """A compiler for the model's vocabulary (`vocab_size`: the logits' width, which may exceed the tokenizer's)."""
    import xgrammar as xgr

    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=vocab_size, stop_token_ids=stop_token_ids)
    return xgr.GrammarCompiler(info, max_threads=max_threads)


def choice_ebnf(choices: list[str]) -> str:
    # JSON string literals are EBNF string literals: the same escapes for quotes, backslashes and control bytes.
    return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _schema_text(spec: str) -> str:
    try:
        schema = json.loads(spec)
    except json.JSONDecodeError as e:
        raise InvalidParameterError("structured_outputs.json", f"not valid JSON: {e}") from None
    if not isinstance(schema, dict):
        raise InvalidParameterError("structured_outputs.json", "a JSON schema must be an object")
    return spec


def _reason(error: Exception) -> str:
    # xgrammar prefixes its messages with a timestamp and a C++ source location; the user needs the last part.
    text = str(error).strip()
    return text.split(": ", 1)[1] if text.startswith("[") and ": " in text else text
