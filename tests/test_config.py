"""The YAML config: the example, the schema's documentation, defaults, and errors that name the key path."""

import dataclasses
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import msgspec
import pytest
import yaml
from msgspec import inspect as mi

from appliance.cli import main as kvbox
from appliance.config import ENGINE_KEYS, AppConfig, ConfigError, ModelSpec, load_config, parse_config
from appliance.config.schema import SERVED_DEFAULTS, SamplingDefaults
from engine.config import EngineConfig, EngineConfigError, SpeculativeConfig, engine_default

EXAMPLE = Path(__file__).resolve().parent.parent / "config.example.yaml"
ONE_MODEL = "models:\n  - name: m\n    source: builtin:tiny\n"


def parse(text: str, **kwargs) -> AppConfig:
    return parse_config(textwrap.dedent(text), "config.yaml", **kwargs)


def error(text: str, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        parse(text, **kwargs)
    return str(info.value)


def model(extra: str = "") -> str:
    """A one-model config with `extra` (YAML lines at the model's indentation) added to the model."""
    return ONE_MODEL + textwrap.indent(textwrap.dedent(extra), "    ")


# --- the example and the schema's documentation ---------------------------------------------------------------------


def _unwrap(t):
    if isinstance(t, mi.Metadata):
        t = t.type
    if isinstance(t, mi.UnionType):
        members = [m for m in t.types if not isinstance(m, mi.NoneType)]
        return _unwrap(members[0]) if len(members) == 1 else t
    return t


def schema_fields(t=None, prefix=""):
    """(dotted key path, field) of every key, walking nested Structs and lists of Structs."""
    t = _unwrap(mi.type_info(AppConfig) if t is None else t)
    if isinstance(t, mi.VarTupleType):
        yield from schema_fields(t.item_type, prefix + "[]")
    elif isinstance(t, mi.StructType):
        for f in t.fields:
            path = f"{prefix}.{f.name}".lstrip(".")
            yield path, f
            yield from schema_fields(f.type, path)


def test_example_loads_with_every_key_at_its_default():
    config = load_config(EXAMPLE)
    # The built-in model's published sampling settings, and a cap so that a bare request ends soon.
    defaults = SamplingDefaults(temperature=0.2, top_p=0.9, max_tokens=512)
    assert config == AppConfig(models=(ModelSpec(name="smollm2", source="builtin:smollm2-135m-instruct",
                                                 default_sampling=defaults),))
    assert config.models[0].device == "auto" and config.server.host == "127.0.0.1"


def missing_keys(data, t, path, text):
    """Schema keys absent from the parsed example `data`. Under a null or an empty list, the example can only show
    keys in a commented-out block, so there the key must appear after a `#`."""
    t = _unwrap(t)
    if isinstance(t, mi.VarTupleType):
        for item in data or [None]:
            yield from missing_keys(item, t.item_type, path + "[]", text)
    elif isinstance(t, mi.StructType):
        for f in t.fields:
            key = f"{path}.{f.name}".lstrip(".")
            if isinstance(data, dict):
                if f.name not in data:
                    yield key
                    continue
                value = data[f.name]
            else:
                if not re.search(rf"^\s*#\s*(-\s*)?{f.name}:", text, re.M):
                    yield key
                value = None
            yield from missing_keys(value, f.type, key, text)


def test_example_mentions_every_schema_key():
    text = EXAMPLE.read_text()
    assert len(list(schema_fields())) > 60
    assert list(missing_keys(yaml.safe_load(text), mi.type_info(AppConfig), "", text)) == []
    # The check itself notices a key that is missing, live or commented out.
    for key, typo in [("max_prompt_chars:", "max_prompt_charz:"), ("      top_k:", "      topk:")]:
        broken = text.replace(key, typo)
        assert list(missing_keys(yaml.safe_load(broken), mi.type_info(AppConfig), "", broken)) != []


def test_every_schema_key_has_a_description():
    undocumented = [path for path, f in schema_fields()
                    if not (isinstance(f.type, mi.Metadata) and (f.type.extra_json_schema or {}).get("description"))]
    assert undocumented == []


def test_defaults():
    config = parse(ONE_MODEL)
    server, m = config.server, config.models[0]
    assert (server.host, server.port, server.api_keys, server.admin_keys) == ("127.0.0.1", 8000, (), ())
    assert server.public_paths == ("/health", "/ready") and server.max_body_bytes == 1 << 20
    assert server.max_logprobs == 20 and server.cors.allow_origins == () and server.drain_timeout_s == 30
    assert (m.dtype, m.device, m.load_format, m.kernel_backend, m.seed, m.queue_cap) == ("auto", "auto", "auto", "auto",
                                                                                        0, 256)
    assert (m.kv_cache.block_size, m.kv_cache.memory_fraction, m.kv_cache.prefix_caching) == (16, 0.9, True)
    assert (m.scheduler.max_num_seqs, m.scheduler.max_num_batched_tokens, m.scheduler.policy) == (256, 8192, "fcfs")
    assert m.parallelism.num_gpus == 1 and m.quantization is None and m.lora.enabled is False
    assert (config.ui.enabled, config.ui.path, config.metrics.path) == (True, "/ui", "/metrics")


def test_schema_is_frozen():
    with pytest.raises(AttributeError):
        parse(ONE_MODEL).server.port = 1


# --- errors name the key path ----------------------------------------------------------------------------------------


def test_unknown_key_names_its_path_and_suggests():
    message = error(model("kv_cache:\n  blok_size: 16\n"))
    assert message == "config.yaml: models[0].kv_cache.blok_size: unknown key (did you mean 'block_size'?)"
    assert "expected one of host, port" in error("server:\n  xyz: 1\n" + ONE_MODEL)


def test_enum_error_matches_the_documented_form():
    text = ONE_MODEL + "  - name: n\n    source: builtin:tiny\n    kv_cache: {block_size: 12}\n"
    assert error(text) == "config.yaml: models[1].kv_cache.block_size: expected one of 8, 16, 32, got 12"


@pytest.mark.parametrize("text, path, problem", [
    (model("scheduler: {max_num_seqs: many}"), "models[0].scheduler.max_num_seqs", "expected an integer, got a string"),
    (model("kv_cache: {prefix_caching: maybe}"), "models[0].kv_cache.prefix_caching", "expected a boolean"),
    (model("lora: {allowed_dirs: /srv}"), "models[0].lora.allowed_dirs", "expected a list, got a string"),
    ("models: {name: m}", "models", "expected a list, got a mapping"),
    (model("kv_cache: {memory_fraction: 0}"), "models[0].kv_cache.memory_fraction", "expected a number > 0.0, got 0"),
    (model("kv_cache: {memory_fraction: 1.5}"), "models[0].kv_cache.memory_fraction", "<= 1"),
    ("server: {max_logprobs: 21}\n" + ONE_MODEL, "server.max_logprobs", "expected an integer <= 20, got 21"),
    ("server: {port: 70000}\n" + ONE_MODEL, "server.port", "<= 65535"),
    (model("parallelism: {tensor: 0}"), "models[0].parallelism.tensor", ">= 1, got 0"),
    (model("default_sampling: {top_p: 0}"), "models[0].default_sampling.top_p", "> 0"),
    (model("dtype: fp8"), "models[0].dtype", "expected one of auto, bfloat16, float16, float32, got 'fp8'"),
    (model("device: gpu"), "models[0].device", "got 'gpu'"),
    ("models: [{name: 'a b', source: builtin:x}]", "models[0].name", "matching regex"),
    ("models: [{name: m}]", "models[0].source", "required key is missing"),
    ("models: []", "models", "length >= 1"),
    ("server: {port: 1}", "models", "required key is missing"),
    ("server: {cors: {allow_origins: [example.com]}}\n" + ONE_MODEL, "server.cors.allow_origins[0]", "regex"),
    ("server: {public_paths: [health]}\n" + ONE_MODEL, "server.public_paths[0]", "regex"),
    (model("gpu_ids: [0, -1]"), "models[0].gpu_ids[1]", ">= 0"),
])
def test_schema_errors_name_the_key_path(text, path, problem):
    message = error(text)
    assert message.startswith(f"config.yaml: {path}: ")
    assert problem in message


def test_duplicate_model_name():
    text = ONE_MODEL + "  - {name: other, source: builtin:tiny}\n  - {name: m, source: builtin:tiny}\n"
    assert error(text) == "config.yaml: models[2].name: duplicate model name 'm' (also models[0].name)"


def test_unknown_quantization_method_is_refused():
    assert error(model("quantization: bitsandbytes")) == (
        "config.yaml: models[0].quantization: expected one of auto-round, awq, awq_marlin, compressed-tensors, fp8, "
        "gguf, gptq, gptq_marlin, int8, none, null, got 'bitsandbytes'")
    assert error(model("quantization: awq")) == (
        "config.yaml: models[0].quantization: awq is a checkpoint's own method, but this checkpoint is not quantized "
        "(its config.json has no quantization_config); fp8 or int8 quantize a float checkpoint at load")
    assert parse(model("quantization: none")).models[0].quantization == "none"


def test_gpu_ids_must_match_parallelism():
    assert error(model("gpu_ids: [0, 1, 2]\nparallelism: {data: 2}")).startswith(
        "config.yaml: models[0].gpu_ids: 3 GPU ids given, but parallelism needs tensor x pipeline x data")
    assert "lists a GPU twice" in error(model("gpu_ids: [1, 1]\nparallelism: {data: 2}"))
    assert "models[0].gpu_ids: cannot be combined with device 'cpu'" in error(model("device: cpu\ngpu_ids: [0]"))
    assert parse(model("gpu_ids: [2, 3]\nparallelism: {data: 2}")).models[0].gpu_ids == (2, 3)


def test_unimplemented_parallelism_is_refused():
    assert ("models[0].parallelism.expert: expert parallelism is not implemented yet"
            in error(model("parallelism: {expert: 2}")))


def test_tensor_parallelism_maps_onto_the_engine_with_or_without_lora():
    spec = parse(model("parallelism: {tensor: 2}")).models[0]
    assert spec.to_engine_config("/m").tensor_parallel_size == 2
    engine = parse(model("parallelism: {tensor: 2}\nlora: {enabled: true}")).models[0].to_engine_config("/m")
    assert (engine.tensor_parallel_size, engine.enable_lora) == (2, True)
    engine = parse(model("parallelism: {pipeline: 2}\nlora: {enabled: true}")).models[0].to_engine_config("/m")
    assert (engine.pipeline_parallel_size, engine.enable_lora) == (2, True)


def test_default_sampling_max_tokens_within_the_server_cap():
    message = error("server: {max_tokens: 100}\n" + model("default_sampling: {max_tokens: 200}"))
    assert "models[0].default_sampling.max_tokens: 200 is above server.max_tokens (100)" in message


# --- LoRA adapters ---------------------------------------------------------------------------------------------------


@pytest.fixture
def adapter_dirs(tmp_path):
    (tmp_path / "adapters" / "sql").mkdir(parents=True)
    (tmp_path / "outside" / "evil").mkdir(parents=True)
    (tmp_path / "adapters" / "escape").symlink_to(tmp_path / "outside" / "evil")
    return tmp_path


def lora(adapters: str) -> str:
    adapters = textwrap.indent(adapters, "    ")
    return model(f"lora:\n  enabled: true\n  allowed_dirs: [adapters]\n  adapters:\n{adapters}")


def test_adapters_inside_allowed_dirs_resolve_against_the_config_folder(adapter_dirs):
    config = parse(lora("- {name: sql, path: adapters/sql}\n"), base_dir=adapter_dirs)
    spec = config.models[0].lora
    assert spec.allowed_dirs == (str(adapter_dirs / "adapters"),)
    assert spec.adapters[0].path == str(adapter_dirs / "adapters" / "sql")
    assert spec.is_allowed_path(str(adapter_dirs / "adapters" / "sql"))
    assert not spec.is_allowed_path(str(adapter_dirs / "adapters-evil"))


@pytest.mark.parametrize("path", ["outside/evil", "adapters/../outside/evil", "adapters/escape"])
def test_adapter_outside_allowed_dirs_is_refused(adapter_dirs, path):
    message = error(lora(f"- {{name: sql, path: {path}}}\n"), base_dir=adapter_dirs)
    assert "config.yaml: models[0].lora.adapters[0].path: " in message
    assert "is outside lora.allowed_dirs" in message
    if path == "adapters/escape":
        assert f"resolves to '{adapter_dirs / 'outside' / 'evil'}'" in message


def test_duplicate_adapter_names(adapter_dirs):
    text = lora("- {name: sql, path: adapters/sql}\n- {name: sql, path: adapters/sql}\n")
    assert "models[0].lora.adapters[1].name: duplicate adapter name 'sql' (also models[0].lora.adapters[0].name)" \
        in error(text, base_dir=adapter_dirs)
    text = lora("- {name: m, path: adapters/sql}\n")
    assert "models[0].lora.adapters[0].name: duplicate adapter name 'm' (also models[0].name)" \
        in error(text, base_dir=adapter_dirs)


def test_adapters_need_lora_enabled(adapter_dirs):
    text = model("lora:\n  allowed_dirs: [adapters]\n  adapters: [{name: sql, path: adapters/sql}]")
    assert "models[0].lora.enabled: adapters are listed but LoRA is not enabled" in error(text, base_dir=adapter_dirs)
    message = error(model("lora: {max_loras: 8, max_cpu_loras: 4}"))
    assert "models[0].lora.max_cpu_loras: must be >= max_loras" in message


# --- sources and paths -----------------------------------------------------------------------------------------------


def test_sources_resolve_by_kind(tmp_path):
    (tmp_path / "folder").mkdir()
    (tmp_path / "model.gguf").write_bytes(b"GGUF")
    (tmp_path / "chat.jinja").write_text("{{ messages }}")
    config = parse("""\
        models:
          - {name: a, source: folder, chat_template: chat.jinja}
          - {name: b, source: model.gguf, tokenizer: folder}
          - {name: c, source: HuggingFaceTB/SmolLM2-135M-Instruct, chat_template: "{{ messages }}"}
          - {name: d, source: builtin:smollm2-135m-instruct}
        """, base_dir=tmp_path)
    a, b, c, d = config.models
    assert a.source == str(tmp_path / "folder")
    assert a.chat_template == str(tmp_path / "chat.jinja")
    assert (b.source, b.tokenizer) == (str(tmp_path / "model.gguf"), str(tmp_path / "folder"))
    assert (c.source, c.chat_template) == ("HuggingFaceTB/SmolLM2-135M-Instruct", "{{ messages }}")
    assert d.source == "builtin:smollm2-135m-instruct"


def test_bad_sources(tmp_path):
    (tmp_path / "weights.bin").write_bytes(b"")
    assert "models[0].source: " in error("models: [{name: a, source: ./missing}]", base_dir=tmp_path)
    assert "expected a model folder or a .gguf file" in error("models: [{name: a, source: weights.bin}]",
                                                              base_dir=tmp_path)
    assert "models[0].source: expected builtin:NAME" in error("models: [{name: a, source: 'builtin:'}]")
    assert "models[0].chat_template: no such file" in error(model("chat_template: missing.jinja"), base_dir=tmp_path)


# --- environment variables -------------------------------------------------------------------------------------------


def test_env_substitution(monkeypatch):
    monkeypatch.setenv("KVBOX_TEST_KEY", "s3cret")
    monkeypatch.setenv("KVBOX_TEST_PORT", "9001")
    monkeypatch.delenv("KVBOX_TEST_UNSET", raising=False)
    config = parse("""\
        server:
          port: ${KVBOX_TEST_PORT}
          host: ${KVBOX_TEST_UNSET:-0.0.0.0}
          api_keys: ["${KVBOX_TEST_KEY}", "pre-${KVBOX_TEST_KEY}-post"]
          public_paths: ["/$${literal}"]
        models: [{name: m, source: "builtin:${KVBOX_TEST_UNSET:-tiny}"}]
        """)
    assert config.server.port == 9001 and config.server.host == "0.0.0.0"
    assert config.server.api_keys == ("s3cret", "pre-s3cret-post")
    assert config.server.public_paths == ("/${literal}",)
    assert config.models[0].source == "builtin:tiny"


def test_missing_env_var_names_the_key(monkeypatch):
    monkeypatch.delenv("KVBOX_TEST_UNSET", raising=False)
    message = error("server: {admin_keys: [ok, '${KVBOX_TEST_UNSET}']}\n" + ONE_MODEL)
    assert message.startswith("config.yaml: server.admin_keys[1]: environment variable KVBOX_TEST_UNSET is not set")
    assert "server.host: malformed environment reference" in error("server: {host: '${bad name}'}\n" + ONE_MODEL)


def test_empty_secret_from_env_is_refused(monkeypatch):
    monkeypatch.setenv("KVBOX_TEST_EMPTY", "")
    assert "server.api_keys[0]: expected a string of length >= 1" in error(
        "server: {api_keys: ['${KVBOX_TEST_EMPTY}']}\n" + ONE_MODEL)


# --- secrets ---------------------------------------------------------------------------------------------------------


def test_secrets_are_redacted():
    config = parse("server: {api_keys: [k1, k2], admin_keys: [a1]}\n" + ONE_MODEL)
    redacted = config.redacted()
    assert redacted["server"]["api_keys"] == ["***", "***"] and redacted["server"]["admin_keys"] == ["***"]
    assert redacted["server"]["public_paths"] == ["/health", "/ready"]
    assert redacted["models"][0]["name"] == "m"
    assert not {"k1", "k2", "a1"} & set(re.findall(r"\w+", msgspec.json.encode(redacted).decode()))


def test_errors_do_not_echo_secrets():
    message = error("server: {api_keys: [123456]}\n" + ONE_MODEL)
    assert message == "config.yaml: server.api_keys[0]: expected a string, got an integer"
    message = error("server: {admin_keys: hunter2}\n" + ONE_MODEL)
    assert message == "config.yaml: server.admin_keys: expected a list, got a string"


# --- YAML ------------------------------------------------------------------------------------------------------------


def test_python_tags_are_refused():
    message = error("server: !!python/object/apply:os.system ['echo pwned']\n" + ONE_MODEL)
    assert message.startswith("config.yaml: line 1, column 9: could not determine a constructor")


def test_yaml_syntax_error_names_the_line():
    assert error("server:\n  port: 8000\n  host: [oops\n" + ONE_MODEL).startswith("config.yaml: line 4, column ")
    assert error("server:\n  port: 1\n bad: indent\n").startswith("config.yaml: line 3, column 2: ")


def test_duplicate_yaml_keys_are_refused():
    assert error("server:\n  port: 1\n  port: 2\n" + ONE_MODEL) == \
        "config.yaml: line 3, column 3: duplicate key 'port'"


@pytest.mark.parametrize("text, problem", [
    ("", "the config is empty; it needs at least a `models` list"),
    ("# only a comment\n", "the config is empty; it needs at least a `models` list"),
    ("- a\n- b\n", "expected a mapping of keys at the top level, got a list"),
    ("just text", "expected a mapping of keys at the top level, got a string"),
])
def test_empty_and_non_mapping_files(text, problem):
    assert error(text) == f"config.yaml: {problem}"


def test_load_config_errors_name_the_file(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the file"):
        load_config(tmp_path / "missing.yaml")
    path = tmp_path / "bad.yaml"
    path.write_bytes(b"\xff\xfe")
    with pytest.raises(ConfigError, match=f"^{re.escape(str(path))}: the file is not UTF-8 text$"):
        load_config(path)


# --- the engine and the command line ---------------------------------------------------------------------------------


def test_to_engine_config_maps_every_engine_option():
    spec = parse(model("""\
        tokenizer: org/tok
        dtype: bfloat16
        device: cpu
        max_model_len: 4096
        load_format: dummy
        kv_cache: {block_size: 32, memory_fraction: 0.5, memory_bytes: 1000000, num_blocks: 64, prefix_caching: false}
        scheduler: {max_num_seqs: 8, max_num_batched_tokens: 4096, chunked_prefill: false, policy: priority}
        kernel_backend: torch
        cuda_graphs: false
        async_scheduling: true
        seed: 7
        lora: {enabled: true, max_loras: 2, max_lora_rank: 32, max_cpu_loras: 3}
        """)).models[0]
    engine = spec.to_engine_config("/models/m")
    assert (engine.model, engine.tokenizer, engine.dtype, engine.device) == ("/models/m", "org/tok", "bfloat16", "cpu")
    assert (engine.max_model_len, engine.load_format, engine.kernel_backend, engine.seed) == (4096, "dummy", "torch", 7)
    assert (engine.block_size, engine.gpu_memory_utilization, engine.kv_cache_memory_bytes, engine.num_kv_blocks,
            engine.enable_prefix_caching) == (32, 0.5, 1000000, 64, False)
    assert (engine.max_num_seqs, engine.max_num_batched_tokens, engine.enable_chunked_prefill,
            engine.scheduling_policy) == (8, 4096, False, "priority")
    assert (engine.cuda_graphs, engine.async_scheduling) == (False, True)
    assert (engine.enable_lora, engine.max_loras, engine.max_lora_rank, engine.max_cpu_loras) == (True, 2, 32, 3)


def yaml_key(path: tuple[str, ...], value) -> str:
    """`path` (e.g. ("kv_cache", "block_size")) set to `value`, as YAML lines for `model`."""
    if dataclasses.is_dataclass(value):
        value = dataclasses.asdict(value)
    for key in reversed(path):
        value = {key: value}
    return yaml.safe_dump(value)


# Valid values other than the default, for the engine options whose default suggests none.
OTHER_VALUES = {"tokenizer": "org/tok", "device": "cpu", "gpu_memory_utilization": 0.5, "async_scheduling": True,
                "smoothquant_alpha": 0.8, "outlier_fraction": 0.05, "pooling_normalize": False, "matryoshka_dimensions": (64, 128),
                "pipeline_layer_split": (24,), "quantization": "fp8",  # builtin:tiny is float: gptq would be refused
                "speculative_config": SpeculativeConfig(num_speculative_tokens=3, prompt_lookup_min=2)}


def other_value(option: str):
    """A valid value of the engine option `option` other than its default."""
    if option in OTHER_VALUES:
        return OTHER_VALUES[option]
    default = engine_default(option)
    if isinstance(default, bool):
        return not default
    engine_type = _unwrap(next(f.type for f in mi.type_info(EngineConfig).fields if f.name == option))
    if isinstance(engine_type, mi.LiteralType):
        return next(v for v in engine_type.values if v != default)
    return (default or 0) + 3


def test_engine_keys_cover_every_engine_option_and_round_trip_each():
    """Each YAML engine key, set alone to a value other than its default, reaches exactly its EngineConfig field."""
    options = [f.name for f in mi.type_info(EngineConfig).fields]
    # The machines' layout comes from `kvbox serve --nnodes ...` (appliance/node.py), not from the YAML file; served
    # replicas (`parallelism.data`) are the supervisor's processes, each engine one replica (data_parallel_size 1);
    # the collective timeout is server.engine_hang_timeout_s, the heartbeat's server.rank_heartbeat_timeout_s.
    assert set(ENGINE_KEYS) == set(options) - {"model", "nnodes", "master_addr", "master_port", "data_parallel_size",
                                               "collective_timeout_s", "rank_heartbeat_timeout_s"}
    base = ModelSpec(name="m", source="builtin:tiny").to_engine_config("/m")
    for option, path in ENGINE_KEYS.items():
        value = other_value(option)
        assert value != getattr(base, option), option
        engine = parse(model(yaml_key(path, value))).models[0].to_engine_config("/m")
        changed = {name for name in options if getattr(engine, name) != getattr(base, name)}
        assert (changed, getattr(engine, option)) == ({option}, value), option


def test_yaml_defaults_are_the_engine_defaults():
    """The defaults are the engine's, not copies: the engine config of a model that sets nothing is the default one,
    and so is every YAML engine key's default, but for serving's own (`SERVED_DEFAULTS`: the prefill cap)."""
    spec = parse(ONE_MODEL).models[0]
    assert spec.to_engine_config("/m") == EngineConfig(model="/m", **SERVED_DEFAULTS)
    assert SERVED_DEFAULTS == {"max_prefill_tokens_while_decoding": 512}
    assert engine_default("max_prefill_tokens_while_decoding") is None  # offline: no cap
    for option, path in ENGINE_KEYS.items():
        section = spec
        for key in path[:-1]:
            section = getattr(section, key)
        field = next(f for f in mi.type_info(type(section)).fields if f.name == path[-1])
        assert field.default == SERVED_DEFAULTS.get(option, engine_default(option)), option


def test_engine_default_refuses_unknown_and_required_options():
    with pytest.raises(KeyError):
        engine_default("max_num_seq")
    with pytest.raises(KeyError, match="model has no default"):
        engine_default("model")


@pytest.mark.parametrize("text, path, problem", [
    ("scheduler: {chunked_prefill: false, max_num_batched_tokens: 2048}\nmax_model_len: 4096",
     "models[0].scheduler.max_num_batched_tokens", "must be >= max_model_len (4096) without chunked prefill, got 2048"),
    ("lora: {max_loras: 8, max_cpu_loras: 4}", "models[0].lora.max_cpu_loras", "must be >= max_loras (8), since"),
])
def test_engine_checks_name_the_yaml_key(text, path, problem):
    message = error(model(text))
    assert message.startswith(f"config.yaml: {path}: {problem}")


def test_scheduler_checks_need_max_model_len_only_without_chunked_prefill():
    text = "scheduler: {chunked_prefill: true, max_num_batched_tokens: 2048}\nmax_model_len: 4096"
    assert parse(model(text)).models[0].scheduler.max_num_batched_tokens == 2048
    # Without a max_model_len the model's own is known only when it loads; the engine checks it then.
    text = "scheduler: {chunked_prefill: false, max_num_batched_tokens: 16}"
    assert parse(model(text)).models[0].scheduler.chunked_prefill is False


@pytest.mark.parametrize("options, field, problem", [
    ({"scheduling_policy": "lifo"}, "scheduling_policy", "expected one of fcfs, priority, got 'lifo'"),
    ({"max_num_seqs": 0}, "max_num_seqs", "must be >= 1, got 0"),
    ({"max_num_batched_tokens": 0}, "max_num_batched_tokens", "must be >= 1, got 0"),
    ({"enable_chunked_prefill": False, "max_model_len": 64, "max_num_batched_tokens": 16}, "max_num_batched_tokens",
     "must be >= max_model_len (64) without chunked prefill, got 16"),
    ({"block_size": 12}, "block_size", "expected one of 8, 16, 32, got 12"),
    ({"gpu_memory_utilization": 0}, "gpu_memory_utilization", "must be in (0, 1], got 0"),
    ({"max_loras": 9}, "max_cpu_loras", "must be >= max_loras (9)"),
])
def test_engine_config_checks(options, field, problem):
    with pytest.raises(EngineConfigError) as info:
        EngineConfig(model="/m", **options)
    assert (info.value.field, str(info.value)[:len(field) + 2 + len(problem)]) == (field, f"{field}: {problem}")
    assert isinstance(info.value, ValueError)


def test_engine_config_without_chunked_prefill_accepts_a_large_enough_budget():
    config = EngineConfig(model="/m", enable_chunked_prefill=False, max_model_len=64, max_num_batched_tokens=64)
    assert config.max_num_batched_tokens == config.max_model_len == 64
    assert EngineConfig(model="/m", enable_chunked_prefill=False, max_num_batched_tokens=16).max_model_len is None


def test_offline_keywords_are_checked():
    assert EngineConfig.from_kwargs("/m", max_num_seqs=4, enable_prefix_caching=False) == \
        EngineConfig(model="/m", max_num_seqs=4, enable_prefix_caching=False)
    with pytest.raises(TypeError, match="unknown engine option.s.: kv_cache_memory_fraction"):
        EngineConfig.from_kwargs("/m", kv_cache_memory_fraction=0.5)


def test_check_config_command(tmp_path, capsys):
    assert kvbox(["check-config", str(EXAMPLE)]) == 0
    assert capsys.readouterr().out == ("OK: 1 model (smollm2)\n  smollm2: quantization gguf Q4_1 x 210 + Q8_0 x 1 "
                                       "tensors, weight-only, gguf_dequantize auto: kept packed, dequantized inside "
                                       "each matmul (at load on a CPU without a C compiler), kv cache auto\n")

    good = tmp_path / "two.yaml"
    good.write_text(ONE_MODEL + "  - {name: n, source: builtin:tiny}\n")
    assert kvbox(["check-config", str(good)]) == 0
    assert capsys.readouterr().out.startswith("OK: 2 models (m, n)\n  m: quantization")

    bad = tmp_path / "bad.yaml"
    bad.write_text(model("kv_cache: {block_size: 12}"))
    assert kvbox(["check-config", str(bad)]) == 1
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == f"{bad}: models[0].kv_cache.block_size: expected one of 8, 16, 32, got 12\n"


def test_check_config_imports_no_torch():
    code = ("import sys; from appliance.cli import main; code = main(['check-config', sys.argv[1]]); "
            "print(code, 'torch' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", code, str(EXAMPLE)], capture_output=True, text=True, check=True,
                            cwd=EXAMPLE.parent)
    assert result.stdout.splitlines()[-1] == "0 False"


def test_check_config_reports_every_schema_error_in_one_run(tmp_path, capsys):
    path = tmp_path / "config.yaml"
    path.write_text("server: {port: abc, max_n: 0, hostt: x}\n"
                    "models:\n"
                    "  - {name: a, source: org/a, dtype: float8, kv_cache: {block_size: 12}}\n"
                    "  - {source: org/b}\n")
    assert kvbox(["check-config", str(path)]) == 1
    assert capsys.readouterr().err.splitlines() == [
        f"{path}: server.port: expected an integer, got a string 'abc'",
        f"{path}: server.max_n: expected an integer >= 1, got 0",
        f"{path}: server.hostt: unknown key (did you mean 'host'?)",
        f"{path}: models[0].dtype: expected one of auto, bfloat16, float16, float32, got 'float8'",
        f"{path}: models[0].kv_cache.block_size: expected one of 8, 16, 32, got 12",
        f"{path}: models[1].name: required key is missing",
    ]


def test_speculative_maps_onto_the_engine_and_names_bad_keys():
    spec = parse(model("speculative: {method: ngram, num_speculative_tokens: 4, prompt_lookup_max: 3}")).models[0]
    speculative = spec.to_engine_config("/m").speculative_config
    assert (speculative.num_speculative_tokens, speculative.prompt_lookup_min,
            speculative.prompt_lookup_max) == (4, 3, 3)
    assert parse(ONE_MODEL).models[0].to_engine_config("/m").speculative_config is None
    assert "models[0].speculative.num_speculative_tokens" in error(model("speculative: {num_speculative_tokens: 0}"))
    assert "models[0].speculative" in error(model("speculative: {num_speculative_tokens: 2, lookahead: 1}"))
    assert ("models[0].speculative.prompt_lookup_min: must be <= prompt_lookup_max (2), got 3"
            in error(model("speculative: {num_speculative_tokens: 2, prompt_lookup_min: 3, prompt_lookup_max: 2}")))
    assert "models[0].speculative.method" in error(model("speculative: {method: eagle, num_speculative_tokens: 2}"))
