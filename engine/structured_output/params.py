"""`StructuredOutputsParams`: what a request's output must match (vLLM's name and fields), as plain data that
travels inside `SamplingParams` to the engine process, and its checks."""

from __future__ import annotations

import json as _json
from dataclasses import dataclass

from engine.sampling_params import InvalidParameterError

_KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass
class StructuredOutputsParams:
    json: str | dict | None = None  # a JSON schema (text or object)
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None  # EBNF as xgrammar reads it (`root ::= ...`)
    json_object: bool | None = None  # any JSON object (the {"type": "object"} schema)

    def __post_init__(self) -> None:
        given = [kind for kind in _KINDS if getattr(self, kind) not in (None, False)]
        if len(given) != 1:
            raise InvalidParameterError("structured_outputs", f"exactly one of {', '.join(_KINDS)} must be given, "
                                                              f"got {', '.join(given) or 'none'}")
        checks = {"json": isinstance(self.json, (str, dict)), "regex": isinstance(self.regex, str),
                  "grammar": isinstance(self.grammar, str), "json_object": self.json_object is True,
                  "choice": isinstance(self.choice, list) and bool(self.choice)
                  and all(isinstance(c, str) for c in self.choice)}
        if not checks[given[0]]:
            raise InvalidParameterError(f"structured_outputs.{given[0]}", "has the wrong type (json: a schema "
                                        "object or text; choice: a non-empty list of strings; regex, grammar: text)")

    @property
    def kind(self) -> str:
        return next(kind for kind in _KINDS if getattr(self, kind) not in (None, False))

    @property
    def key(self) -> tuple[str, str]:
        """(kind, spec) identifying the compiled grammar: equal keys share one compilation."""
        kind = self.kind
        value = getattr(self, kind)
        if kind == "json" and isinstance(value, dict):
            value = _json.dumps(value, sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            value = _json.dumps(value)
        elif kind == "json_object":
            value = ""
        return kind, value
