"""Reading a config file: YAML (safe, no duplicate keys) -> `${VAR}` substitution in string values -> msgspec
conversion against the schema -> relative paths resolved -> checks that span fields (`appliance.config.check`).

Every stage raises `ConfigError` naming the file, the key path and the problem; msgspec's own messages are
translated here into key paths and plain words, never echoing a secret.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import msgspec
import yaml

from appliance.config.check import check, resolve_paths
from appliance.config.error import ConfigError, ConfigErrors
from appliance.config.introspect import is_secret, literal_values, schema_at, struct_fields, unwrap
from appliance.config.schema import AppConfig, schema_type


def load_config(path: str | Path, nodes: tuple[int, int] | None = None) -> AppConfig:
    """`nodes`: this machine's place among several, (nnodes, node_rank), as `kvbox serve` was given it (None: the
    environment's KVBOX_NNODES / KVBOX_NODE_RANK, else one machine): the GPUs it needs are its ranks'."""
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read the file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "the file is not UTF-8 text") from None
    return parse_config(text, str(path), base_dir=path.parent, nodes=nodes)


def parse_config(text: str, source_name: str = "<string>", base_dir: str | Path | None = None,
                 nodes: tuple[int, int] | None = None) -> AppConfig:
    """Validate a YAML text. Relative paths in it resolve against `base_dir` (default: the working directory)."""
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        problem = e.problem or e.context
        raise ConfigError(source_name, "", f"line {mark.line + 1}, column {mark.column + 1}: {problem}") from None
    except yaml.YAMLError as e:
        raise ConfigError(source_name, "", f"invalid YAML: {e}") from None
    if data is None:
        raise ConfigError(source_name, "", "the config is empty; it needs at least a `models` list")
    if not isinstance(data, dict):
        raise ConfigError(source_name, "", f"expected a mapping of keys at the top level, got {_kind(data)}")
    data = _substitute_env(data, (), source_name)
    config, errors = _convert(data, source_name)
    if config is not None:  # the checks that span fields run too, on what the schema accepted
        config = resolve_paths(config, Path(base_dir or os.getcwd()).absolute(), source_name, errors)
        # A key the schema refused stands at its default here: checks on it would only echo that error.
        refused = [e.key_path for e in errors]
        errors += [e for e in check(config, source_name, nodes) if not any(_under(e.key_path, k) for k in refused)]
    if errors:
        raise errors[0] if len(errors) == 1 else ConfigErrors(errors)
    return config


def _under(key_path: str, parent: str) -> bool:
    return key_path == parent or key_path.startswith((parent + ".", parent + "["))


# --- YAML --------------------------------------------------------------------------------------------------------


class _Loader(yaml.SafeLoader):
    """safe_load, except that a key given twice in one mapping is an error rather than the last one winning."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen = set()
        for key_node, _ in node.value:
            # Merge keys (`<<: *base`) may legitimately repeat; only a mapping's own scalar keys must be unique.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key_node.value!r}", key_node.start_mark)
            seen.add(key_node.value)
        return super().construct_mapping(node, deep)


def _kind(value: Any) -> str:
    return {dict: "a mapping", list: "a list", str: "a string", bool: "a boolean", int: "an integer",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


# --- ${VAR} substitution -----------------------------------------------------------------------------------------

# `$${` escapes a literal `${`; a `${` that is neither is an error, not text, so that a typo never becomes a secret.
_ENV_REF = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}|\$\{")


def _substitute_env(value: Any, path: tuple, source: str) -> Any:
    if isinstance(value, dict):
        return {k: _substitute_env(v, (*path, k), source) for k, v in value.items()}
    if isinstance(value, list):
        return [_substitute_env(v, (*path, i), source) for i, v in enumerate(value)]
    if not isinstance(value, str) or "${" not in value:
        return value

    def replace(match: re.Match) -> str:
        if match.group(0) == "$${":
            return "${"
        name, default = match.group(1), match.group(2)
        if name is None:
            raise ConfigError(source, _format_path(path),
                              "malformed environment reference; write ${VAR} or ${VAR:-default} ($${ for a literal ${)")
        found = os.environ.get(name)
        if default is not None and not found:
            return default
        if found is None:
            raise ConfigError(source, _format_path(path),
                              f"environment variable {name} is not set (write ${{{name}:-default}} to give a default)")
        return found

    return _ENV_REF.sub(replace, value)


# --- schema conversion, every error at once -----------------------------------------------------------------------
_MAX_ERRORS = 50


def _convert(data: dict, source: str) -> tuple[AppConfig | None, list[ConfigError]]:
    """The file against the schema. msgspec stops at the first error; to report them all, each failing key is
    dropped (its default applies) and the conversion retried, until it passes (the config of the keys that passed,
    and the errors) or a key cannot be dropped (a required one, a list item: no config)."""
    errors: list[ConfigError] = []
    while True:
        try:
            # Lax mode lets numbers and booleans arrive as strings, which is all `${VAR}` can produce.
            return msgspec.convert(data, AppConfig, strict=False), errors
        except msgspec.ValidationError as e:
            error = _translate(e, data, source)
            if any(error.key_path == seen.key_path for seen in errors):
                return None, errors  # a required key this loop dropped: already reported
            errors.append(error)
            if len(errors) >= _MAX_ERRORS or not _drop(data, _error_path(e)):
                return None, errors


def _error_path(error: msgspec.ValidationError) -> tuple:
    match = _MSGSPEC_ERROR.match(str(error))
    path = _parse_path(match.group("at") or "$")
    if m := re.fullmatch(r"Object (?:contains unknown|missing required) field `(.+)`", match.group("problem")):
        path = (*path, m.group(1))
    return path


def _drop(data: Any, path: tuple) -> bool:
    """Removes the mapping key at `path`; False where there is none to remove."""
    for key in path[:-1]:
        if not isinstance(data, (dict, list)) or (isinstance(data, dict) and key not in data):
            return False
        data = data[key]
    if not path or not isinstance(data, dict) or path[-1] not in data:
        return False
    del data[path[-1]]
    return True


# --- msgspec errors -> key paths -----------------------------------------------------------------------------------

_TYPE_WORDS = {"object": "a mapping", "array": "a list", "str": "a string", "int": "an integer", "float": "a number",
               "bool": "a boolean", "null": "null"}
_MSGSPEC_ERROR = re.compile(r"^(?P<problem>.*?)(?: - at `(?P<at>[^`]*)`(?: in `(?P<within>[^`]*)`)?)?$", re.S)


def _translate(error: msgspec.ValidationError, data: dict, source: str) -> ConfigError:
    match = _MSGSPEC_ERROR.match(str(error))
    problem, at, within = match.group("problem"), match.group("at"), match.group("within")
    if at == "key":
        return ConfigError(source, _format_path(_parse_path(within)), "keys must be strings")
    path = _parse_path(at or "$")
    if m := re.fullmatch(r"Object contains unknown field `(.+)`", problem):
        known = [f.name for f in struct_fields(schema_at(schema_type(), path))]
        close = difflib.get_close_matches(m.group(1), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(known)}"
        return ConfigError(source, _format_path((*path, m.group(1))), f"unknown key ({hint})")
    if m := re.fullmatch(r"Object missing required field `(.+)`", problem):
        return ConfigError(source, _format_path((*path, m.group(1))), "required key is missing")
    schema = schema_at(schema_type(), path)
    raw = _value_at(data, path)
    # A secret mistyped (`api_keys: KEY` instead of a list) is still a secret.
    hidden = is_secret(schema) or is_secret(getattr(unwrap(schema), "item_type", None))
    value = "***" if hidden else repr(raw)
    if m := re.fullmatch(r"Invalid enum value (.+)", problem):
        choices = ", ".join("null" if v is None else str(v) for v in literal_values(schema))
        return ConfigError(source, _format_path(path), f"expected one of {choices}, got {m.group(1)}")
    if m := re.fullmatch(r"Expected `([^`]+)`, got `([^`]+)`", problem):
        expected, got = _type_words(m.group(1)), _type_words(m.group(2))
        shown = "" if hidden or isinstance(raw, (dict, list)) else f" {value}"
        return ConfigError(source, _format_path(path), f"expected {expected}, got {got}{shown}")
    if m := re.fullmatch(r"Expected `([^`]+)` (.+)", problem):
        return ConfigError(source, _format_path(path), f"expected {_type_words(m.group(1))} {m.group(2)}, got {value}")
    return ConfigError(source, _format_path(path), problem[0].lower() + problem[1:])


def _type_words(msgspec_types: str) -> str:
    return " or ".join(_TYPE_WORDS.get(t, t) for t in msgspec_types.split(" | "))


def _parse_path(msgspec_path: str) -> tuple:
    return tuple(int(i) if i else k for k, i in re.findall(r"\.([^.\[]+)|\[(\d+)\]", msgspec_path))


def _format_path(path: tuple) -> str:
    return "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in path).lstrip(".")


def _value_at(data: Any, path: tuple) -> Any:
    for part in path:
        data = data[part]
    return data
