"""The appliance's YAML configuration: one schema for validation, defaults and the documentation of every key.

The schema is a tree of frozen msgspec Structs. Each field's `msgspec.Meta` carries its description and range, so the
schema documents and checks itself; `config.example.yaml` shows every key (a test holds it to that).

Loading runs in stages, each raising `ConfigError` naming the file, the key path and the problem:
YAML (safe, no duplicate keys) -> `${VAR}` substitution in string values -> msgspec conversion against the schema ->
relative paths resolved against the config file's folder -> checks that span fields.

This module owns the file format only. What a setting does at run time belongs to its consumer: the engine
(`ModelSpec.to_engine_config`), the HTTP layer (server, ui, metrics) and the supervisor (sources, GPUs).
"""

from __future__ import annotations

import difflib
import os
import re
import sys
from functools import cache
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, NoReturn

import msgspec
import yaml
from msgspec import Meta, field
from msgspec import inspect as mi

if TYPE_CHECKING:
    from engine.config import EngineConfig

MODEL_NAME_PATTERN = r"^[A-Za-z0-9._:/-]{1,128}$"
_URL_PATH = r"^/"
_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUILTIN = re.compile(r"^builtin:[A-Za-z0-9._-]+$")


def _doc(description: str, **constraints: Any) -> Meta:
    return Meta(description=description, **constraints)


PositiveInt = Annotated[int, Meta(ge=1)]
NonEmptyStr = Annotated[str, Meta(min_length=1)]
Penalty = Annotated[float, Meta(ge=-2, le=2)]
# The marker lets `AppConfig.redacted` and error messages find secrets from the schema alone.
Secret = Annotated[str, Meta(min_length=1, extra={"secret": True})]


class _Schema(msgspec.Struct, frozen=True, forbid_unknown_fields=True):
    """Subclasses pass kw_only=True themselves: msgspec does not inherit it."""


class CorsConfig(_Schema, kw_only=True):
    allow_origins: Annotated[tuple[Annotated[str, Meta(pattern=r"^(\*|https?://[^/\s]+)$")], ...], _doc(
        "Origins allowed to call the API from a browser ('*' or 'https://host[:port]'). Empty: CORS is off.")] = ()


class ServerConfig(_Schema, kw_only=True):
    host: Annotated[str, _doc("Address to listen on. 127.0.0.1 serves this machine only; use 0.0.0.0 in a "
                              "container or to serve the network.", min_length=1)] = "127.0.0.1"
    port: Annotated[int, _doc("TCP port to listen on (0: any free port).", ge=0, le=65535)] = 8000
    api_keys: Annotated[tuple[Secret, ...], _doc(
        "Keys accepted as 'Authorization: Bearer KEY' on the API. Empty: no authentication.")] = ()
    admin_keys: Annotated[tuple[Secret, ...], _doc(
        "Keys for the admin routes (adapters, reload); an admin key also works wherever an API key does. Empty: "
        "the admin routes are open when api_keys is empty too (no authentication at all), else they refuse "
        "every request.")] = ()
    public_paths: Annotated[tuple[Annotated[str, Meta(pattern=_URL_PATH)], ...], _doc(
        "Routes reachable without a key.")] = ("/health", "/ready")
    max_body_bytes: Annotated[int, _doc("Largest request body accepted, in bytes (larger: 413).", ge=1)] = 1 << 20
    max_n: Annotated[int, _doc("Largest `n` (completions per request).", ge=1)] = 16
    max_tokens: Annotated[int, _doc("Largest `max_tokens` a request may ask for.", ge=1)] = 16384
    max_logprobs: Annotated[int, _doc("Largest `logprobs` / `top_logprobs` (OpenAI's cap is 20).", ge=0, le=20)] = 20
    max_stop_strings: Annotated[int, _doc("Most stop strings per request.", ge=0)] = 16
    max_stop_string_length: Annotated[int, _doc("Longest stop string, in characters.", ge=1)] = 256
    max_prompt_chars: Annotated[int, _doc(
        "Longest prompt (all chat messages together), in characters, checked before tokenizing.", ge=1)] = 262144
    cors: Annotated[CorsConfig, _doc("Cross-origin requests from browsers.")] = field(default_factory=CorsConfig)
    drain_timeout_s: Annotated[float, _doc(
        "On shutdown or reload, seconds to let running requests finish before aborting them.", ge=0)] = 30.0
    engine_hang_timeout_s: Annotated[float, _doc(
        "Seconds an engine may stay silent (a running engine reports several times a second) before it is "
        "considered hung, killed and restarted.", ge=1)] = 120.0


class KVCacheConfig(_Schema, kw_only=True):
    block_size: Annotated[Literal[8, 16, 32], _doc("Tokens per KV cache block.")] = 16
    memory_fraction: Annotated[float, _doc(
        "Share of the GPU's memory the engine may use in all (weights, activations, KV cache).", gt=0, le=1)] = 0.9
    memory_bytes: Annotated[PositiveInt | None, _doc(
        "An explicit KV cache budget in bytes, instead of profiling (null: profile).")] = None
    num_blocks: Annotated[PositiveInt | None, _doc("An explicit number of KV blocks (null: from the budget).")] = None
    prefix_caching: Annotated[bool, _doc("Reuse the KV blocks of prompts' shared prefixes.")] = True


class SchedulerConfig(_Schema, kw_only=True):
    max_num_seqs: Annotated[int, _doc("Most requests running at once.", ge=1)] = 256
    max_num_batched_tokens: Annotated[int, _doc("Most tokens computed in one step.", ge=1)] = 8192
    chunked_prefill: Annotated[bool, _doc("Split long prompts over several steps, between decodes.")] = True
    policy: Annotated[Literal["fcfs", "priority"], _doc(
        "Order of admission: first come first served, or by each request's priority.")] = "fcfs"


class ParallelismConfig(_Schema, kw_only=True):
    tensor: Annotated[int, _doc("Tensor-parallel GPUs (each layer split across them).", ge=1)] = 1
    pipeline: Annotated[int, _doc("Pipeline stages (layers split into consecutive groups).", ge=1)] = 1
    data: Annotated[int, _doc("Replicas of the whole model, each serving its share of requests.", ge=1)] = 1
    expert: Annotated[int, _doc("Expert-parallel size for mixture-of-experts models.", ge=1)] = 1

    @property
    def num_gpus(self) -> int:
        # Expert parallelism shards experts over the GPUs the other dimensions already use; it adds none.
        return self.tensor * self.pipeline * self.data


class LoraAdapter(_Schema, kw_only=True):
    name: Annotated[str, _doc("What clients send as `model` to use this adapter.", pattern=MODEL_NAME_PATTERN)]
    path: Annotated[str, _doc("The adapter's folder; must lie inside one of allowed_dirs.", min_length=1)]


class LoraConfig(_Schema, kw_only=True):
    enabled: Annotated[bool, _doc("Serve LoRA adapters on this model.")] = False
    max_loras: Annotated[int, _doc("Most adapters used in one batch (held on the GPU).", ge=1)] = 4
    max_lora_rank: Annotated[int, _doc("Largest adapter rank accepted.", ge=1)] = 16
    max_cpu_loras: Annotated[int, _doc("Most adapters kept loaded in CPU memory.", ge=1)] = 8
    allowed_dirs: Annotated[tuple[NonEmptyStr, ...], _doc(
        "Folders adapters may be loaded from, here or at run time; symlinks are resolved before the check.")] = ()
    adapters: Annotated[tuple[LoraAdapter, ...], _doc("Adapters loaded at start.")] = ()

    def is_allowed_path(self, path: str) -> bool:
        """Whether `path`, with symlinks resolved, lies inside one of `allowed_dirs`."""
        real = os.path.realpath(path)
        for allowed in self.allowed_dirs:
            allowed_real = os.path.realpath(allowed)
            if os.path.commonpath([real, allowed_real]) == allowed_real:
                return True
        return False


class SamplingDefaults(_Schema, kw_only=True):
    temperature: Annotated[Annotated[float, Meta(ge=0)] | None, _doc(
        "Default temperature (null: the model's generation_config, else 1.0).")] = None
    top_p: Annotated[Annotated[float, Meta(gt=0, le=1)] | None, _doc("Default nucleus sampling mass.")] = None
    top_k: Annotated[Annotated[int, Meta(ge=-1)] | None, _doc("Default top-k (0 or -1: off).")] = None
    min_p: Annotated[Annotated[float, Meta(ge=0, le=1)] | None, _doc("Default min-p.")] = None
    max_tokens: Annotated[PositiveInt | None, _doc("Default max_tokens when a request sets none.")] = None
    presence_penalty: Annotated[Penalty | None, _doc("Default presence penalty.")] = None
    frequency_penalty: Annotated[Penalty | None, _doc("Default frequency penalty.")] = None
    repetition_penalty: Annotated[Annotated[float, Meta(gt=0)] | None, _doc(
        "Default repetition penalty (1: off).")] = None


class ModelSpec(_Schema, kw_only=True):
    name: Annotated[str, _doc("What clients send as `model`.", pattern=MODEL_NAME_PATTERN)]
    source: Annotated[str, _doc(
        "The weights: a local folder (Hugging Face layout), a .gguf file, a Hugging Face repo id (org/name) or "
        "builtin:NAME. Relative paths are relative to the config file's folder.", min_length=1)]
    tokenizer: Annotated[NonEmptyStr | None, _doc(
        "A tokenizer folder or Hugging Face repo id (null: the model's own).")] = None
    dtype: Annotated[Literal["auto", "float32", "float16", "bfloat16"], _doc(
        "Weight and activation type (auto: the checkpoint's).")] = "auto"
    device: Annotated[str, _doc("auto (cuda if available), cpu, cuda or cuda:N.",
                                pattern=r"^(auto|cpu|cuda|cuda:[0-9]+)$")] = "auto"
    gpu_ids: Annotated[tuple[Annotated[int, Meta(ge=0)], ...] | None, _doc(
        "GPUs this model may use (null: the engine picks); as many as parallelism needs.")] = None
    max_model_len: Annotated[PositiveInt | None, _doc(
        "Longest sequence, prompt plus output (null: the model's maximum).")] = None
    load_format: Annotated[Literal["auto", "dummy"], _doc(
        "auto: load the weights; dummy: random weights at the real shapes (tests, benchmarks).")] = "auto"
    kv_cache: Annotated[KVCacheConfig, _doc("The paged KV cache.")] = field(default_factory=KVCacheConfig)
    scheduler: Annotated[SchedulerConfig, _doc("Continuous batching.")] = field(default_factory=SchedulerConfig)
    queue_cap: Annotated[int, _doc(
        "Most requests waiting for this model; beyond it requests get 429.", ge=1)] = 256
    parallelism: Annotated[ParallelismConfig, _doc(
        "How the model is spread over GPUs.")] = field(default_factory=ParallelismConfig)
    quantization: Annotated[Literal["none"] | None, _doc(
        "Weight quantization method; kvbox implements none yet (null or none).")] = None
    lora: Annotated[LoraConfig, _doc("LoRA adapters.")] = field(default_factory=LoraConfig)
    chat_template: Annotated[NonEmptyStr | None, _doc(
        "A chat template: a path ending in .jinja, or the Jinja template itself (null: the model's own).")] = None
    kernel_backend: Annotated[Literal["auto", "torch", "triton"], _doc(
        "Kernels: auto (Triton on CUDA, torch elsewhere), torch or triton.")] = "auto"
    cuda_graphs: Annotated[bool, _doc(
        "Replay decode steps as CUDA graphs captured at start-up (CUDA with Triton kernels only).")] = True
    async_scheduling: Annotated[bool | None, _doc(
        "Schedule the next step while the current one runs on the device (null: on with CUDA, off on the CPU).")] = None
    default_sampling: Annotated[SamplingDefaults | None, _doc(
        "Sampling defaults for requests that leave a parameter unset (null: none).")] = None
    seed: Annotated[int, _doc("Seeds the random draws of requests that give no seed.", ge=0)] = 0

    @property
    def source_kind(self) -> Literal["builtin", "gguf", "folder", "hf"]:
        """How to fetch `source`; exact for specs from `load_config`, whose local sources are absolute paths."""
        if self.source.startswith("builtin:"):
            return "builtin"
        if os.path.isabs(self.source):
            return "gguf" if self.source.endswith(".gguf") else "folder"
        return "hf"

    def to_engine_config(self, model_path: str) -> EngineConfig:
        """The engine's options for this model; `model_path` is `source` resolved to a local path."""
        # Imported here because engine.config pulls in torch, which `kvbox check-config` has no need for.
        from engine.config import EngineConfig

        return EngineConfig(
            model=model_path, tokenizer=self.tokenizer, dtype=self.dtype, device=self.device,
            max_model_len=self.max_model_len, load_format=self.load_format,
            block_size=self.kv_cache.block_size, kv_cache_memory_fraction=self.kv_cache.memory_fraction,
            kv_cache_memory_bytes=self.kv_cache.memory_bytes, num_kv_blocks=self.kv_cache.num_blocks,
            enable_prefix_caching=self.kv_cache.prefix_caching, max_num_seqs=self.scheduler.max_num_seqs,
            max_num_batched_tokens=self.scheduler.max_num_batched_tokens,
            enable_chunked_prefill=self.scheduler.chunked_prefill, scheduling_policy=self.scheduler.policy,
            kernel_backend=self.kernel_backend, cuda_graphs=self.cuda_graphs,
            async_scheduling=self.async_scheduling, seed=self.seed,
            enable_lora=self.lora.enabled, max_loras=self.lora.max_loras, max_lora_rank=self.lora.max_lora_rank,
            max_cpu_loras=self.lora.max_cpu_loras,
        )


class UiConfig(_Schema, kw_only=True):
    enabled: Annotated[bool, _doc("Serve the dashboard.")] = True
    path: Annotated[str, _doc("URL path of the dashboard.", pattern=_URL_PATH)] = "/ui"


class MetricsConfig(_Schema, kw_only=True):
    enabled: Annotated[bool, _doc("Serve Prometheus metrics.")] = True
    path: Annotated[str, _doc("URL path of the metrics.", pattern=_URL_PATH)] = "/metrics"


class AppConfig(_Schema, kw_only=True):
    server: Annotated[ServerConfig, _doc("The HTTP server.")] = field(default_factory=ServerConfig)
    models: Annotated[tuple[ModelSpec, ...], _doc("The models served, one engine each.", min_length=1)]
    ui: Annotated[UiConfig, _doc("The web dashboard.")] = field(default_factory=UiConfig)
    metrics: Annotated[MetricsConfig, _doc("The metrics endpoint.")] = field(default_factory=MetricsConfig)

    def redacted(self) -> dict[str, Any]:
        """The config as plain data with every secret replaced by '***', safe for logs and the dashboard."""
        return _redact(msgspec.to_builtins(self), _schema())


class ConfigError(Exception):
    """A config that cannot be used. `source` names the file, `key_path` the key (e.g. `models[1].name`)."""

    def __init__(self, source: str, key_path: str, problem: str):
        super().__init__(": ".join(part for part in (source, key_path, problem) if part))
        self.source, self.key_path, self.problem = source, key_path, problem


def load_config(path: str | Path) -> AppConfig:
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except OSError as e:
        raise ConfigError(str(path), "", f"cannot read the file: {e.strerror}") from None
    except UnicodeDecodeError:
        raise ConfigError(str(path), "", "the file is not UTF-8 text") from None
    return parse_config(text, str(path), base_dir=path.parent)


def parse_config(text: str, source_name: str = "<string>", base_dir: str | Path | None = None) -> AppConfig:
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
    try:
        # Lax mode lets numbers and booleans arrive as strings, which is all `${VAR}` can produce.
        config = msgspec.convert(data, AppConfig, strict=False)
    except msgspec.ValidationError as e:
        raise _translate(e, data, source_name) from None
    config = _resolve_paths(config, Path(base_dir or os.getcwd()).absolute(), source_name)
    _check(config, source_name)
    return config


def check_config_main(path: str | Path) -> int:
    """`kvbox check-config FILE`: 0 and a summary if the config is usable, else 1 and the error on stderr."""
    try:
        config = load_config(path)
    except ConfigError as e:
        print(e, file=sys.stderr)
        return 1
    names = ", ".join(m.name for m in config.models)
    print(f"OK: {len(config.models)} model{'s' if len(config.models) != 1 else ''} ({names})")
    return 0


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
        known = [f.name for f in _struct_fields(_schema_at(path))]
        close = difflib.get_close_matches(m.group(1), known, n=1)
        hint = f"did you mean {close[0]!r}?" if close else f"expected one of {', '.join(known)}"
        return ConfigError(source, _format_path((*path, m.group(1))), f"unknown key ({hint})")
    if m := re.fullmatch(r"Object missing required field `(.+)`", problem):
        return ConfigError(source, _format_path((*path, m.group(1))), "required key is missing")
    schema = _schema_at(path)
    raw = _value_at(data, path)
    # A secret mistyped (`api_keys: KEY` instead of a list) is still a secret.
    hidden = _is_secret(schema) or _is_secret(getattr(_unwrap(schema), "item_type", None))
    value = "***" if hidden else repr(raw)
    if m := re.fullmatch(r"Invalid enum value (.+)", problem):
        choices = ", ".join("null" if v is None else str(v) for v in _literal_values(schema))
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


# --- walking the schema ------------------------------------------------------------------------------------------


@cache
def _schema() -> mi.Type:
    return mi.type_info(AppConfig)


def _unwrap(t: mi.Type) -> mi.Type:
    """The type under a field's metadata and its `| None`, if any."""
    if isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        if len(members) == 1:
            return _unwrap(members[0])
    return t


def _struct_fields(t: mi.Type | None) -> tuple[mi.Field, ...]:
    t = _unwrap(t) if t is not None else None
    return t.fields if isinstance(t, mi.StructType) else ()


def _schema_at(path: tuple) -> mi.Type | None:
    t = _schema()
    for part in path:
        if isinstance(part, int):
            inner = _unwrap(t)
            t = inner.item_type if isinstance(inner, (mi.VarTupleType, mi.ListType)) else None
        else:
            t = next((f.type for f in _struct_fields(t) if f.name == part), None)
        if t is None:
            return None
    return t


def _is_secret(t: mi.Type | None) -> bool:
    return isinstance(t, mi.Metadata) and bool((t.extra or {}).get("secret"))


def _literal_values(t: mi.Type | None) -> list:
    if isinstance(t, mi.Metadata):
        t = t.type
    members = t.types if isinstance(t, mi.UnionType) else (t,)
    return [v for m in members for v in (m.values if isinstance(m, mi.LiteralType) else
                                         (None,) if isinstance(m, mi.NoneType) else ())]


def _redact(value: Any, t: mi.Type) -> Any:
    if _is_secret(t):
        return "***"
    t = _unwrap(t)
    if isinstance(value, dict) and isinstance(t, mi.StructType):
        return {f.name: _redact(value[f.name], f.type) for f in t.fields}
    if isinstance(value, (list, tuple)) and isinstance(t, (mi.VarTupleType, mi.ListType)):
        return [_redact(v, t.item_type) for v in value]
    return value


# --- paths and cross-field checks ----------------------------------------------------------------------------------


def _local(value: str, base: Path) -> Path:
    path = Path(value).expanduser()
    return Path(os.path.normpath(path if path.is_absolute() else base / path))


def _resolve_source(value: str, base: Path, where: str, source: str, allow_files: bool) -> str:
    """A local path made absolute, or a Hugging Face repo id / builtin name as given."""
    if allow_files and value.startswith("builtin:"):
        if not _BUILTIN.match(value):
            raise ConfigError(source, where, f"expected builtin:NAME, got {value!r}")
        return value
    local = _local(value, base)
    if local.is_dir() or (allow_files and local.is_file() and local.suffix == ".gguf"):
        return str(local)
    if local.exists():
        wanted = "a model folder or a .gguf file" if allow_files else "a folder"
        raise ConfigError(source, where, f"expected {wanted}, got the file {str(local)!r}")
    # Like transformers: a name that is no local path but has the form org/name is a Hub repo.
    if _HF_REPO_ID.match(value) and not value.endswith(".gguf"):
        return value
    raise ConfigError(source, where, f"{str(local)!r} does not exist (and {value!r} is no Hugging Face repo id)")


def _resolve_paths(config: AppConfig, base: Path, source: str) -> AppConfig:
    replace = msgspec.structs.replace
    models = []
    for i, m in enumerate(config.models):
        changes: dict[str, Any] = {"source": _resolve_source(m.source, base, f"models[{i}].source", source, True)}
        if m.tokenizer is not None:
            changes["tokenizer"] = _resolve_source(m.tokenizer, base, f"models[{i}].tokenizer", source, False)
        if m.chat_template is not None and m.chat_template.endswith(".jinja"):
            template = _local(m.chat_template, base)
            if not template.is_file():
                raise ConfigError(source, f"models[{i}].chat_template", f"no such file {str(template)!r}")
            changes["chat_template"] = str(template)
        changes["lora"] = replace(
            m.lora, allowed_dirs=tuple(str(_local(d, base)) for d in m.lora.allowed_dirs),
            adapters=tuple(replace(a, path=str(_local(a.path, base))) for a in m.lora.adapters))
        models.append(replace(m, **changes))
    return replace(config, models=tuple(models))


def _check(config: AppConfig, source: str) -> None:
    def fail(path: str, problem: str) -> NoReturn:
        raise ConfigError(source, path, problem)

    # Clients pick models and adapters by the same `model` field, so all their names share one namespace.
    claimed: dict[str, str] = {}

    def claim(name: str, path: str, kind: str) -> None:
        if name in claimed:
            fail(path, f"duplicate {kind} name {name!r} (also {claimed[name]})")
        claimed[name] = path

    for i, m in enumerate(config.models):
        claim(m.name, f"models[{i}].name", "model")
    for i, m in enumerate(config.models):
        at = f"models[{i}]"
        if m.gpu_ids is not None:
            if m.device == "cpu" or m.device.startswith("cuda:"):
                fail(f"{at}.gpu_ids", f"cannot be combined with device {m.device!r}; use device auto or cuda")
            if len(set(m.gpu_ids)) != len(m.gpu_ids):
                fail(f"{at}.gpu_ids", f"lists a GPU twice: {list(m.gpu_ids)}")
            p = m.parallelism
            if len(m.gpu_ids) != p.num_gpus:
                fail(f"{at}.gpu_ids", f"{len(m.gpu_ids)} GPU ids given, but parallelism needs tensor x pipeline x "
                                      f"data = {p.tensor} x {p.pipeline} x {p.data} = {p.num_gpus}")
        for kind in ("tensor", "pipeline", "expert"):
            # The engine runs each replica on one device for now; refusing beats silently running unsplit.
            if getattr(m.parallelism, kind) > 1:
                fail(f"{at}.parallelism.{kind}", f"{kind} parallelism is not implemented yet; only data "
                                                 f"parallelism (replicas) can be above 1")
        lora = m.lora
        if lora.adapters and not lora.enabled:
            fail(f"{at}.lora.enabled", "adapters are listed but LoRA is not enabled")
        if lora.max_cpu_loras < lora.max_loras:
            fail(f"{at}.lora.max_cpu_loras",
                 f"must be >= max_loras ({lora.max_loras}), since GPU adapters also stay loaded on the CPU")
        for j, adapter in enumerate(lora.adapters):
            claim(adapter.name, f"{at}.lora.adapters[{j}].name", "adapter")
            if not lora.is_allowed_path(adapter.path):
                real = os.path.realpath(adapter.path)
                shown = f"{adapter.path!r}" + (f" (resolves to {real!r})" if real != adapter.path else "")
                allowed = ", ".join(map(repr, lora.allowed_dirs)) or "none given"
                fail(f"{at}.lora.adapters[{j}].path", f"{shown} is outside lora.allowed_dirs ({allowed})")
        defaults = m.default_sampling
        if defaults and defaults.max_tokens is not None and defaults.max_tokens > config.server.max_tokens:
            fail(f"{at}.default_sampling.max_tokens",
                 f"{defaults.max_tokens} is above server.max_tokens ({config.server.max_tokens})")
