"""Runs the real server for API tests: `python -m appliance.server CONFIG` in a subprocess, real engines, stopped
with SIGTERM (and its exit code checked: a clean drain exits 0).

Test modules load this as a plugin (`pytest_plugins = ["helpers_server"]`), so that `api_server`, one server with
two tiny models, is started once for the whole session however many modules use it.
"""

from __future__ import annotations

import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-api-key"
ADMIN_KEY = "sk-test-admin-key"
MAX_BODY_BYTES = 64 * 1024
LONG_CONTEXT = 2048


@dataclass
class RunningServer:
    base_url: str
    process: subprocess.Popen
    log_path: Path

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=0, **options)

    def http(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def admin_models(self) -> dict[str, dict]:
        with self.http(ADMIN_KEY) as http:
            return {m["name"]: m for m in http.get("/admin/models").json()["models"]}


def model_config(name: str, source: str, **overrides) -> dict:
    """A tiny model on the CPU, with a small KV cache: the default CPU budget would allocate gigabytes."""
    return {"name": name, "source": source, "device": "cpu", "dtype": "float32", "kv_cache": {"num_blocks": 300},
            "scheduler": {"max_num_seqs": 4}, **overrides}


def long_llama(tiny_model) -> str:
    """A tiny llama with a 2048-token context: long enough for requests that outlast a test's checks (a tiny model
    writes a few hundred tokens a second)."""
    return tiny_model("llama", max_position_embeddings=LONG_CONTEXT)


def server_config(models: list[dict], **server) -> dict:
    return {"server": {"port": 0, "api_keys": [API_KEY], "admin_keys": [ADMIN_KEY], "max_body_bytes": MAX_BODY_BYTES,
                       "max_n": 4, "max_tokens": LONG_CONTEXT, "max_logprobs": 5, "max_stop_strings": 4,
                       "drain_timeout_s": 20, **server},
            "models": models}


@contextmanager
def run_server(config: dict, workdir: Path, start_timeout_s: float = 180) -> Iterator[RunningServer]:
    """Port 0 lets the server pick a free port; its ready banner says which."""
    config_path, log_path = workdir / "kvbox.yaml", workdir / "server.log"
    config_path.write_text(yaml.safe_dump(config))
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "appliance.server", str(config_path)], cwd=ROOT,
                                   stdout=log, stderr=subprocess.STDOUT)
    try:
        server = RunningServer(_wait_for_banner(process, log_path, start_timeout_s), process, log_path)
        yield server
    finally:
        stop(process, log_path)


def stop(process: subprocess.Popen, log_path: Path, timeout_s: float = 60) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the server did not exit {timeout_s:.0f} s after SIGTERM; log:\n{_tail(log_path)}")
    assert code == 0, f"the server exited with {code}; log:\n{_tail(log_path)}"


def _wait_for_banner(process: subprocess.Popen, log_path: Path, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if match := re.search(r"API:\s+(http://\S+)/v1", log_path.read_text(errors="replace")):
            return match.group(1)
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}; log:\n{_tail(log_path)}")
        time.sleep(0.1)
    raise AssertionError(f"the server was not ready after {timeout_s:.0f} s; log:\n{_tail(log_path)}")


def _tail(log_path: Path, num_lines: int = 60) -> str:
    return "\n".join(log_path.read_text(errors="replace").splitlines()[-num_lines:])


@pytest.fixture(scope="session")
def api_server(tiny_model, tmp_path_factory) -> Iterator[RunningServer]:
    """Two tiny models: `llama` (long context, small queue, for 429s) and `qwen` (512 tokens of context, greedy by
    default, for per-model defaults)."""
    config = server_config([
        model_config("llama", long_llama(tiny_model), queue_cap=1, scheduler={"max_num_seqs": 2}),
        model_config("qwen", tiny_model("qwen3"), default_sampling={"temperature": 0.0}),
    ])
    with run_server(config, tmp_path_factory.mktemp("api_server")) as server:
        yield server
