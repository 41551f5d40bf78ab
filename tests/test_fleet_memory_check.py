"""The GPU memory check of a many-model config (appliance/config/device_memory.py), on the CPU with a fake device
memory figure: the largest max_active_models set must fit; CPU models, and configs within the figure, pass."""

import json
import os
import subprocess
import sys

import pytest
import yaml

from appliance.config import ConfigError, parse_config
from appliance.config.device_memory import ENGINE_OVERHEAD_BYTES, model_footprint_bytes

GIB = 2**30
# Llama-3.1-8B's shape (bench/common.py): 8.03 B parameters, 16.06 GB in bfloat16; 128 KiB of KV per token.
LLAMA_8B = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": 128256, "hidden_size": 4096,
            "intermediate_size": 14336, "num_hidden_layers": 32, "num_attention_heads": 32,
            "num_key_value_heads": 8, "head_dim": 128, "tie_word_embeddings": False, "torch_dtype": "bfloat16"}


@pytest.fixture
def shape_8b(tmp_path):
    folder = tmp_path / "llama-8b"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLAMA_8B))
    return str(folder)


def config_text(source: str, count: int, max_active: int | None, device: str = "auto", **kv) -> str:
    server = {"max_active_models": max_active} if max_active else {}
    models = [{"name": f"m{i}", "source": source, "load_format": "dummy", "device": device, "load": "on_demand",
               "kv_cache": kv or {"memory_bytes": 8 * GIB}} for i in range(count)]
    return yaml.safe_dump({"server": server, "models": models})


def test_the_footprint_of_an_8b_model_is_its_weights_kv_and_the_engine(shape_8b):
    (model,) = parse_config(config_text(shape_8b, 1, None)).models
    weights = 8_030_261_248 * 2
    assert model_footprint_bytes(model, 141 * GIB) == weights + 8 * GIB + ENGINE_OVERHEAD_BYTES
    (blocks,) = parse_config(config_text(shape_8b, 1, None, num_blocks=1000)).models
    assert model_footprint_bytes(blocks, 141 * GIB) == weights + 1000 * 16 * 131072 + ENGINE_OVERHEAD_BYTES
    (fraction,) = parse_config(config_text(shape_8b, 1, None, memory_fraction=0.5)).models
    assert model_footprint_bytes(fraction, 100 * GIB) == 50 * GIB  # a share of the device, whatever the weights


def test_a_set_that_cannot_fit_is_refused_naming_max_active_models(shape_8b, monkeypatch):
    monkeypatch.setenv("KVBOX_DEVICE_MEMORY_BYTES", str(141 * GIB))  # an H200
    parse_config(config_text(shape_8b, 4, 2))  # 2 x (15 + 8 + 1) GiB fits
    with pytest.raises(ConfigError) as refused:
        parse_config(config_text(shape_8b, 8, 6))  # 6 x 24 GiB = 144 GiB does not
    assert refused.value.key_path == "server.max_active_models" and "141.0 GiB" in str(refused.value)
    with pytest.raises(ConfigError):
        parse_config(config_text(shape_8b, 6, None))  # no limit: every model may be awake at once
    parse_config(config_text(shape_8b, 8, 6, device="cpu"))  # CPU models take no GPU memory
    monkeypatch.delenv("KVBOX_DEVICE_MEMORY_BYTES")
    monkeypatch.setattr("appliance.config.device_memory._nvidia_smi_total", lambda: None)
    parse_config(config_text(shape_8b, 8, 6))  # no GPU here: nothing to compare with


def test_check_config_reports_it(shape_8b, tmp_path):
    path = tmp_path / "kvbox.yaml"
    path.write_text(config_text(shape_8b, 8, 6))
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "check-config", str(path)], capture_output=True,
                            text=True, env={**os.environ, "KVBOX_DEVICE_MEMORY_BYTES": str(141 * GIB)})
    assert result.returncode == 1 and "server.max_active_models" in result.stderr, result.stderr
