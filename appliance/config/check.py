"""What the schema alone cannot say: local paths made absolute against the config file's folder (sources, tokenizers,
chat templates, adapters), and the checks that span fields or models. The engine's own checks run here too, on the
options each model would start with, so that an engine option it refuses fails at load time under its YAML key.
"""

from __future__ import annotations

import functools
import json
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, NoReturn

import msgspec
from gguf import GGUFReader

from appliance.config.device_memory import check_device_memory
from appliance.config.error import ConfigError
from appliance.config.local_gpus import check_local_gpus
from appliance.config.schema import ENGINE_KEYS, AppConfig, ModelSpec
from engine.config import (EngineConfigError, check_encoder_on_one_rank, check_tensor_parallel_split,
                           pipeline_stage_layers)
from engine.models.builtin import resolve_model_source
from engine.models.checkpoint_quantization import checkpoint_quantization_config
from engine.quantization.spec import (ONLINE_METHODS, QuantizationConfigError, QuantScheme, check_linear_shapes,
                                      gguf_quantization_config, parse_quantization)

_HF_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")
_BUILTIN = re.compile(r"^builtin:[A-Za-z0-9._-]+$")
# Raises the ConfigError of a key (relative to the model being checked) and a problem.
Fail = Callable[[str, str], NoReturn]


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


def resolve_paths(config: AppConfig, base: Path, source: str, errors: list[ConfigError]) -> AppConfig:
    """Local paths made absolute; a path that cannot be used is added to `errors` and left as written."""
    replace = msgspec.structs.replace

    def resolved(value: str, where: str, allow_files: bool) -> str:
        try:
            return _resolve_source(value, base, where, source, allow_files)
        except ConfigError as e:
            errors.append(e)
            return value

    models = []
    for i, m in enumerate(config.models):
        changes: dict[str, Any] = {"source": resolved(m.source, f"models[{i}].source", True)}
        if m.tokenizer is not None:
            changes["tokenizer"] = resolved(m.tokenizer, f"models[{i}].tokenizer", False)
        if m.chat_template is not None and m.chat_template.endswith(".jinja"):
            template = _local(m.chat_template, base)
            if template.is_file():
                changes["chat_template"] = str(template)
            else:
                errors.append(ConfigError(source, f"models[{i}].chat_template", f"no such file {str(template)!r}"))
        changes["lora"] = replace(
            m.lora, allowed_dirs=tuple(str(_local(d, base)) for d in m.lora.allowed_dirs),
            adapters=tuple(replace(a, path=str(_local(a.path, base))) for a in m.lora.adapters))
        models.append(replace(m, **changes))
    return replace(config, models=tuple(models))


def check(config: AppConfig, source: str, nodes: tuple[int, int] | None = None) -> list[ConfigError]:
    """Every problem that spans fields or models; each check stops at its own first problem, the others go on.
    `nodes` (nnodes, node_rank) places this machine among several (`kvbox serve --nnodes`; None: the environment's
    KVBOX_NNODES / KVBOX_NODE_RANK, else one machine)."""
    errors: list[ConfigError] = []
    # Clients pick models and adapters by the same `model` field, so all their names share one namespace.
    claimed: dict[str, str] = {}

    def claim(name: str, path: str, kind: str) -> None:
        if name in claimed:
            raise ConfigError(source, path, f"duplicate {kind} name {name!r} (also {claimed[name]})")
        claimed[name] = path

    def run(check_one: Callable[..., None], *args) -> None:
        try:
            check_one(*args)
        except ConfigError as e:
            errors.append(e)

    for i, m in enumerate(config.models):
        run(claim, m.name, f"models[{i}].name", "model")
    for i, m in enumerate(config.models):
        at = f"models[{i}]"

        def fail(key: str, problem: str, at: str = at) -> NoReturn:
            raise ConfigError(source, f"{at}.{key}", problem)

        for check_model in (_check_engine_options, _check_quantization, _check_gpus, _check_tensor_split,
                            _check_lora):
            run(check_model, m, fail)
        run(check_local_gpus, m, fail, nodes)
        for j, adapter in enumerate(m.lora.adapters):
            run(claim, adapter.name, f"{at}.lora.adapters[{j}].name", "adapter")
        defaults = m.default_sampling
        if defaults and defaults.max_tokens is not None and defaults.max_tokens > config.server.max_tokens:
            run(fail, "default_sampling.max_tokens",
                f"{defaults.max_tokens} is above server.max_tokens ({config.server.max_tokens})")
    run(check_device_memory, config, source)
    return errors


def _check_engine_options(m: ModelSpec, fail: Fail) -> None:
    try:
        m.to_engine_config(m.source)
    except EngineConfigError as e:
        option, _, key_within = e.field.partition(".")  # speculative_config.num_speculative_tokens
        fail(".".join((*ENGINE_KEYS[option], *filter(None, [key_within]))), e.problem)


def _checkpoint_folder(source: str) -> Path | None:
    """The folder that holds a checkpoint's config.json: a local model folder, or a Hub repo's snapshot in the local
    Hugging Face cache (no network: check-config must work offline, and the engine downloads at start anyway);
    None for a GGUF file, a built-in model, or a repo not cached."""
    if (Path(source) / "config.json").is_file():
        return Path(source)
    if not _HF_REPO_ID.match(source):
        return None
    from huggingface_hub import try_to_load_from_cache  # only Hub sources pay for the import

    cached = try_to_load_from_cache(source, "config.json")  # a path only when cached (else None or a marker)
    return Path(cached).parent if isinstance(cached, str) else None


def _hf_config(m: ModelSpec) -> dict[str, Any]:
    """The checkpoint's config.json; {} where there is none to read yet or it does not parse: the engine reads it
    when it starts, and reports it in its own words."""
    folder = _checkpoint_folder(m.source)
    try:
        config = json.loads((folder / "config.json").read_text()) if folder else {}
    except (OSError, ValueError):
        return {}
    return config if isinstance(config, dict) else {}


def model_quantization(m: ModelSpec) -> QuantScheme | None:
    """The scheme a model will run: the checkpoint's quantization_config or quantize_config.json (a GGUF file's from
    its header) with `quantization` applied."""
    read, checkpoint, layers = _gguf_header(m.source)
    if not read:
        folder = _checkpoint_folder(m.source)
        if folder is None and _HF_REPO_ID.match(m.source) and m.quantization not in (None, "none", *ONLINE_METHODS):
            return None  # a checkpoint's method named for a repo not downloaded yet: the engine checks it then
        checkpoint = checkpoint_quantization_config(folder, _hf_config(m)) if folder else None
        layers = _checkpoint_config(m).get("num_hidden_layers")
    return parse_quantization(checkpoint, m.quantization,
                              layers if isinstance(layers, int) and m.task == "generate" else None)


def describe_quantization(m: ModelSpec) -> str:
    """check-config's summary of a model's quantization; for a GGUF file, also how its blocks will run."""
    scheme = model_quantization(m)
    if scheme is not None and scheme.layout == "gguf":
        return f"{scheme.describe()}, gguf_dequantize {_gguf_dequantize(m)}"
    gguf = m.source.endswith(".gguf") or m.source.startswith("builtin:")
    if scheme is None and gguf and not _gguf_header(m.source)[0]:
        return "unknown until the engine reads the file"
    if scheme is None and _checkpoint_folder(m.source) is None and _HF_REPO_ID.match(m.source):
        return "read from the checkpoint when the engine downloads it (not in the local Hugging Face cache)"
    return scheme.describe() if scheme else "none"


_GGUF_RUNS = {"matmul": "kept packed, dequantized inside each matmul", "load": "dequantized to float when loaded",
              "auto": "kept packed, dequantized inside each matmul (at load on a CPU without a C compiler)"}


def _gguf_dequantize(m: ModelSpec) -> str:
    """`gguf_dequantize` and what it does (auto as `engine.runner` resolves it)."""
    return f"{m.gguf_dequantize}: {_GGUF_RUNS[m.gguf_dequantize]}"


@functools.cache
def _gguf_header(source: str) -> tuple[bool, dict[str, Any] | None, int | None]:
    """(whether `source` is a GGUF file whose header reads, its quantization_config, its layer count or None), from
    the header and tensor infos only: GGUFReader memory-maps the file, no weight is read or dequantized. A built-in
    model not installed or a file that does not parse is left to the engine, which reports it in its own words."""
    try:
        path = resolve_model_source(source)
        if not path.endswith(".gguf"):
            return False, None, None
        reader = GGUFReader(path)
        quantization = gguf_quantization_config(tensor.tensor_type.name for tensor in reader.tensors)
        arch = reader.get_field("general.architecture")
        count = reader.get_field(f"{arch.contents()}.block_count") if arch is not None else None
    except (OSError, ValueError, IndexError):
        return False, None, None
    return True, quantization, count.contents() if count is not None else None


def _check_quantization(m: ModelSpec, fail: Fail) -> None:
    try:
        scheme = model_quantization(m)
        hf = _checkpoint_config(m)
        sizes = [hf.get(key) for key in ("num_hidden_layers", "hidden_size", "intermediate_size",
                                         "num_attention_heads")]
        if all(isinstance(size, int) for size in sizes):  # else the engine checks them when it reads the file
            layers, hidden, intermediate, heads = sizes
            head_size = hf.get("head_dim") or hidden // heads
            check_linear_shapes(scheme, layers, hidden, intermediate, heads * head_size,
                                (hf.get("num_key_value_heads") or heads) * head_size)
    except QuantizationConfigError as e:
        # The user's own key, or the checkpoint's setting (under source, since the file is the checkpoint's).
        fail("quantization", e.problem) if e.key == "quantization" else fail("source", str(e))


def _check_gpus(m: ModelSpec, fail: Fail) -> None:
    p = m.parallelism
    if m.gpu_ids is not None:
        if m.device == "cpu" or m.device.startswith("cuda:"):
            fail("gpu_ids", f"cannot be combined with device {m.device!r}; use device auto or cuda")
        if len(set(m.gpu_ids)) != len(m.gpu_ids):
            fail("gpu_ids", f"lists a GPU twice: {list(m.gpu_ids)}")
        if len(m.gpu_ids) != p.num_gpus:
            fail("gpu_ids", f"{len(m.gpu_ids)} GPU ids given, but parallelism needs tensor x pipeline x "
                            f"data = {p.tensor} x {p.pipeline} x {p.data} = {p.num_gpus}")
    # Refusing beats silently running unsplit.
    if p.expert > 1:
        fail("parallelism.expert", "expert parallelism is not implemented yet; only tensor, pipeline and data "
                                   "parallelism can be above 1")
    num_layers = _hf_config(m).get("num_hidden_layers")
    if isinstance(num_layers, int):
        try:
            pipeline_stage_layers(num_layers, p.pipeline, p.pipeline_layer_split)
        except EngineConfigError as e:
            fail(".".join(ENGINE_KEYS[e.field]), e.problem)


def _checkpoint_config(m: ModelSpec) -> dict:
    """The checkpoint's config.json (`_hf_config`), its text model's part for multimodal ones."""
    config = _hf_config(m)
    return config.get("text_config", config)


def _check_tensor_split(m: ModelSpec, fail: Fail) -> None:
    """The engine's rules, known before any weight is read."""
    size, hf = m.parallelism.tensor, _checkpoint_config(m)
    architectures = hf.get("architectures")
    if isinstance(architectures, list) and architectures:
        try:
            check_encoder_on_one_rank(str(architectures[0]), size, m.parallelism.pipeline)
        except EngineConfigError as e:
            fail(".".join(ENGINE_KEYS[e.field]), e.problem)
    heads, kv_heads, mlp = hf.get("num_attention_heads"), hf.get("num_key_value_heads"), hf.get("intermediate_size")
    if size == 1 or not isinstance(heads, int):
        return
    try:
        check_tensor_parallel_split(size, heads, kv_heads if isinstance(kv_heads, int) else heads,
                                    mlp if isinstance(mlp, int) else None)
    except EngineConfigError as e:
        fail("parallelism.tensor", e.problem)


def _check_lora(m: ModelSpec, fail: Fail) -> None:
    lora = m.lora
    if lora.adapters and not lora.enabled:
        fail("lora.enabled", "adapters are listed but LoRA is not enabled")
    for k, folder in enumerate(lora.allowed_dirs):
        if not os.path.isdir(folder):
            fail(f"lora.allowed_dirs[{k}]", f"no such folder {folder!r}")
    for j, adapter in enumerate(lora.adapters):
        if lora.is_allowed_path(adapter.path) and not os.path.isdir(adapter.path):
            fail(f"lora.adapters[{j}].path", f"no such folder {adapter.path!r}")
        if not lora.is_allowed_path(adapter.path):
            real = os.path.realpath(adapter.path)
            shown = f"{adapter.path!r}" + (f" (resolves to {real!r})" if real != adapter.path else "")
            allowed = ", ".join(map(repr, lora.allowed_dirs)) or "none given"
            fail(f"lora.adapters[{j}].path", f"{shown} is outside lora.allowed_dirs ({allowed})")
