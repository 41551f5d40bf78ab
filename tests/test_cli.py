"""The operator's command line and logs: --version, help on every option, `serve` flags over the file, the access log
(one line per request with its id, model, status, tokens and latency; monitoring left out), JSON log lines."""

import argparse
import json
import logging
import time

import pytest

from appliance.cli import _parser, main
from appliance.config import ConfigError
from appliance.logs import JsonFormatter
from appliance.server import ServeOptions
from appliance.version import kvbox_version

pytest.register_assert_rewrite("helpers_server")
pytest_plugins = ["helpers_server"]


def test_version(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--version"])
    assert exit_.value.code == 0 and capsys.readouterr().out.strip() == f"kvbox {kvbox_version()}"


def test_every_option_of_every_command_has_help_and_shows_its_default():
    commands = next(a for a in _parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert {"serve", "check-config", "chat", "generate", "make-tiny-model"} <= set(commands.choices)
    for name, parser in commands.choices.items():
        for action in parser._actions:
            assert action.help, f"kvbox {name} {action.dest} has no help"
        text = parser.format_help()
        for action in parser._actions:
            if action.default not in (None, False, argparse.SUPPRESS) and action.option_strings:
                assert f"(default: {action.default})" in " ".join(text.split()), (name, action.dest)


def test_serve_flags_override_the_file(tmp_path, monkeypatch):
    path = tmp_path / "config.yaml"
    path.write_text("server: {host: 127.0.0.1, port: 8000, api_keys: [from-file]}\n"
                    "models: [{name: m, source: org/m}]\n")
    monkeypatch.setenv("MY_KEY", "from-env")
    config = ServeOptions(host="0.0.0.0", port=9000, api_key_env="MY_KEY").load(str(path))
    assert (config.server.host, config.server.port, config.server.api_keys) == ("0.0.0.0", 9000, ("from-env",))
    assert ServeOptions().load(str(path)).server.api_keys == ("from-file",)
    with pytest.raises(ConfigError, match="UNSET_KEY is not set"):
        ServeOptions(api_key_env="UNSET_KEY").load(str(path))
    with pytest.raises(SystemExit):
        main(["serve", "-c", str(path), "--port", "70000"])


def test_the_access_log_names_the_request_and_leaves_monitoring_out(api_server, caplog):
    with caplog.at_level(logging.INFO, logger="kvbox.access"), api_server.http() as http:
        http.get("/metrics")
        response = http.post("/v1/completions", headers={"X-Request-Id": "access-1"},
                             json={"model": "llama", "prompt": "Hello", "max_tokens": 3, "ignore_eos": True})
        assert response.status_code == 200
        with api_server.http(key=None) as anonymous:
            assert anonymous.get("/metrics").status_code == 401
        # A line is written once its response has gone out, which can be just after the client has it.
        deadline = time.monotonic() + 5
        while len([r for r in caplog.records if r.name == "kvbox.access"]) < 2 and time.monotonic() < deadline:
            time.sleep(0.01)
    lines = [r for r in caplog.records if r.name == "kvbox.access"]
    fields = [r.fields for r in lines]
    assert [(f["path"], f["status"]) for f in fields] == [("/v1/completions", 200), ("/metrics", 401)]
    request = fields[0]
    assert request["request_id"] == "access-1" and request["model"] == "llama" and request["output_tokens"] == 3
    assert request["prompt_tokens"] > 0 and request["latency_ms"] > 0
    assert lines[0].getMessage().startswith("access-1 POST /v1/completions 200 ")
    assert "model=llama" in lines[0].getMessage() and "output_tokens=3" in lines[0].getMessage()


def test_json_lines_carry_the_structured_fields():
    record = logging.LogRecord("kvbox.access", logging.INFO, __file__, 1, "a %s", ("line",), None)
    record.fields = {"request_id": "r1", "status": 200}
    entry = json.loads(JsonFormatter().format(record))
    assert entry["message"] == "a line" and entry["level"] == "info" and entry["logger"] == "kvbox.access"
    assert entry["request_id"] == "r1" and entry["status"] == 200 and entry["time"].endswith("Z")


def test_check_config_reports_every_error_in_one_run(tmp_path, capsys):
    """Schema errors and cross-field ones (paths, names, the tensor split against the checkpoint's heads) of one
    file, each under its key path, in one run; a key the schema refused raises no echo from the later checks."""
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    (checkpoint / "config.json").write_text(json.dumps(
        {"num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 64}))
    path = tmp_path / "config.yaml"
    path.write_text(f"""
server: {{port: 70000, max_tokens: 100}}
models:
  - {{name: twin, source: {checkpoint}, parallelism: {{tensor: 3}}, colour: blue}}
  - name: twin
    source: ./no-such-model
    default_sampling: {{max_tokens: 500}}
    lora: {{enabled: true, allowed_dirs: [./no-such-adapters]}}
  - {{name: third, source: {checkpoint}, lora: {{enabled: maybe, adapters: [{{name: a, path: {checkpoint}}}]}}}}
""")
    assert main(["check-config", str(path)]) == 1
    lines = capsys.readouterr().err.strip().splitlines()
    expected = {
        "server.port": "expected an integer <= 65535, got 70000",
        "models[0].colour": "unknown key",
        "models[2].lora.enabled": "expected a boolean",
        "models[1].source": "does not exist",
        "models[1].name": "duplicate model name 'twin' (also models[0].name)",
        "models[0].parallelism.tensor": "3 does not divide the model's 4 attention heads",
        "models[1].default_sampling.max_tokens": "500 is above server.max_tokens (100)",
        "models[1].lora.allowed_dirs[0]": "no such folder",
    }
    assert len(lines) == len(expected), lines
    for key, problem in expected.items():
        assert any(line.startswith(f"{path}: {key}: ") and problem in line for line in lines), (key, lines)
