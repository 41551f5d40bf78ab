"""Sampling defaults: request > the YAML's `default_sampling` > the checkpoint's generation_config.json (vLLM's
`--generation-config auto`), logged once per model."""

import json
import logging
import shutil

import pytest

from appliance.config import parse_config
from appliance.config.schema import SamplingDefaults
from appliance.sampling_defaults import generation_config_defaults, model_sampling_defaults

pytest.register_assert_rewrite("helpers_server")
from helpers_server import model_config, run_inprocess, server_config  # noqa: E402

pytest_plugins = ["helpers_server"]


def spec(default_sampling: dict | None = None):
    model = {"name": "m", "source": "org/m"}  # a Hugging Face repo id: nothing is fetched to parse it
    if default_sampling is not None:
        model["default_sampling"] = default_sampling
    return parse_config(json.dumps({"models": [model]}), "config.yaml").models[0]


def folder(tmp_path, generation: dict):
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    return str(tmp_path)


def test_only_values_that_differ_from_transformers_defaults_count(tmp_path):
    path = folder(tmp_path, {"temperature": 0.6, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.1,
                             "max_new_tokens": 300, "do_sample": True, "eos_token_id": 2})
    assert generation_config_defaults(path) == {"temperature": 0.6, "repetition_penalty": 1.1, "max_tokens": 300}
    assert generation_config_defaults(str(tmp_path / "missing")) == {}
    (tmp_path / "generation_config.json").write_text("{not json")
    assert generation_config_defaults(path) == {}


def test_the_yaml_wins_over_the_checkpoint_and_the_result_is_logged(tmp_path, caplog):
    path = folder(tmp_path, {"temperature": 0.6, "top_k": 20, "max_new_tokens": 5000})
    with caplog.at_level(logging.INFO, logger="kvbox.supervisor"):
        merged = model_sampling_defaults(spec({"temperature": 0.2, "top_p": 0.9}), path, max_tokens_cap=1000)
    # max_new_tokens is capped by server.max_tokens, as a request's max_tokens would be.
    assert merged == SamplingDefaults(temperature=0.2, top_p=0.9, top_k=20, max_tokens=1000)
    line = caplog.records[-1].getMessage()
    assert line == ("m: sampling defaults for requests that leave them unset: temperature=0.2 (config), "
                    "top_k=20 (generation_config.json), max_tokens=1000 (generation_config.json), top_p=0.9 (config)")


def test_out_of_range_checkpoint_values_are_ignored(tmp_path):
    path = folder(tmp_path, {"temperature": -1})
    assert model_sampling_defaults(spec({"max_tokens": 7}), path, 100) == SamplingDefaults(max_tokens=7)
    assert model_sampling_defaults(spec(), path, 100) == SamplingDefaults()


def test_a_checkpoints_generation_config_applies_to_requests_that_leave_it_out(tiny_model, tmp_path):
    source = tmp_path / "greedy-llama"
    shutil.copytree(tiny_model("llama"), source)
    generation = json.loads((source / "generation_config.json").read_text())
    (source / "generation_config.json").write_text(json.dumps({**generation, "temperature": 0.0,
                                                               "max_new_tokens": 6}))
    with run_inprocess(server_config([model_config("llama", str(source))])) as server:
        client = server.client()
        greedy = client.completions.create(model="llama", prompt="Once upon", max_tokens=6, temperature=0)
        bare = client.completions.create(model="llama", prompt="Once upon", extra_body={"ignore_eos": True})
        hot = client.completions.create(model="llama", prompt="Once upon", max_tokens=6, temperature=2.0, seed=3)
    assert bare.choices[0].text == greedy.choices[0].text and bare.usage.completion_tokens == 6
    assert hot.choices[0].text != greedy.choices[0].text
