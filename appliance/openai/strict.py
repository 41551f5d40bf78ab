"""Request bodies decoded strictly: msgspec's errors become OpenAI's error object whose `param` names the field's
path (`messages[0].content[0].type`), and fields kvbox does not know are refused or, under the per-server switch
`server.ignore_unknown_fields`, dropped with a logged warning.

Fields kvbox knows but cannot honour (`UNSUPPORTED`) are refused either way: ignoring them would change the answer
while the client believes it was honoured.
"""

from __future__ import annotations

import logging
import re

import msgspec

from appliance.errors import APIError

logger = logging.getLogger("kvbox.api")

UNSUPPORTED = {
    "best_of": "best_of is not supported here; /v1/completions takes it",
    "suffix": "suffix (insertion completions) is not supported",
    "functions": "the deprecated functions API is not supported",
    "function_call": "the deprecated functions API is not supported",
    "audio": "audio output is not supported",
    "prediction": "predicted outputs are not supported",
    "use_beam_search": "beam search is not supported here; /v1/completions and /v1/chat/completions take it",
    "length_penalty": "beam search is not supported here; /v1/completions and /v1/chat/completions take it",
    "image_url": "kvbox serves text-only models: image content parts are not supported",
    "input_audio": "kvbox serves text-only models: audio content parts are not supported",
    "file": "kvbox serves text-only models: file content parts are not supported",
}

# A lenient decode drops at most this many unknown fields (each costs a re-validation) before refusing the body.
_MAX_DROPPED = 32
_AT = re.compile(r" - at `\$(.*)`$")
_STEP = re.compile(r"\.([^.\[]+)|\[(\d+)\]")


def decode(body: bytes, type_: type[msgspec.Struct], ignore_unknown: bool = False) -> msgspec.Struct:
    try:
        return _decode(body, type_, ignore_unknown)
    except RecursionError:  # free-form fields (chat_template_kwargs) take any JSON, nested as deep as it comes
        raise APIError.invalid(None, "the request body is nested too deeply") from None


def _decode(body: bytes, type_: type[msgspec.Struct], ignore_unknown: bool) -> msgspec.Struct:
    try:
        return msgspec.json.decode(body, type=type_)
    except msgspec.ValidationError as e:
        error = e
    except msgspec.DecodeError as e:
        raise APIError.invalid(None, f"the request body is not valid JSON: {e}") from None
    data, dropped = None, []
    while True:
        param, message, unknown = describe(str(error))
        if unknown is None or not ignore_unknown or unknown[1] in UNSUPPORTED or len(dropped) == _MAX_DROPPED:
            raise APIError.invalid(param, message)
        if data is None:
            data = msgspec.json.decode(body)
        _drop(data, *unknown)
        dropped.append(param)
        try:
            result = msgspec.convert(data, type_)
            break
        except msgspec.ValidationError as e:
            error = e
    logger.warning("ignored unknown request field(s): %s (server.ignore_unknown_fields)", ", ".join(dropped))
    return result


def describe(message: str) -> tuple[str | None, str, tuple[str, str] | None]:
    """(param, message, (the object's path, the field) if the error is an unknown field) from a msgspec
    ValidationError's text, e.g. "Object contains unknown field `x` - at `$.messages[0]`" -> ("messages[0].x", ...,
    ("messages[0]", "x"))."""
    at = _AT.search(message)
    path = container = at.group(1).lstrip(".") if at else ""
    text = message[:at.start()] if at else message
    missing = re.fullmatch(r"Object missing required field `(.+)`", text)
    unknown = re.fullmatch(r"Object contains unknown field `(.+)`", text)
    field = (missing or unknown).group(1) if missing or unknown else None
    if field is not None:
        path = f"{path}.{field}" if path else field
    if unknown is not None:
        text = UNSUPPORTED.get(field) or (f"unknown field `{field}`: kvbox refuses fields it does not know rather "
                                          f"than ignore them")
    elif path:
        text = f"{path}: {text}"
    return path or None, text, (container, field) if unknown else None


def _drop(data: object, container: str, field: str) -> None:
    """Deletes `field` from the object at `container` (a path msgspec named: struct fields and list indices, whose
    names are identifiers) in the decoded body."""
    for name, index in _STEP.findall("." + container if container else ""):
        data = data[name if name else int(index)]
    del data[field]
