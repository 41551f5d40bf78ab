"""Servers for API tests, both on a real port so that the `openai` client, httpx and subprocesses reach them alike:

- `run_inprocess(config)`: the app (`create_app`) on uvicorn in a thread of the test process, its engines
  `InProcessEngineClient`s on threads too. It is up in well under a second; most API tests use it.
- `run_server(config, workdir)`: the real thing, `kvbox serve -c CONFIG` in a subprocess with engine
  processes, stopped with SIGTERM (and its exit code checked: a clean drain exits 0). For what needs processes:
  killed engines, signals, reloads.

Test modules load this as a plugin (`pytest_plugins = ["helpers_server"]`), so that `api_server`, one in-process
server with two tiny models, is started once for the whole session however many modules use it.
"""

from __future__ import annotations

import asyncio
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn
import yaml

from appliance.app import create_app
from appliance.config import parse_config
from appliance.inprocess import InProcessEngineClient
from appliance.server import connection_options
from appliance.supervisor import ModelStatus, Supervisor

ROOT = Path(__file__).resolve().parent.parent
API_KEY = "sk-test-api-key"
ADMIN_KEY = "sk-test-admin-key"
MAX_BODY_BYTES = 64 * 1024
LONG_CONTEXT = 2048


class _Clients:
    base_url: str

    def client(self, **options) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.base_url}/v1", api_key=API_KEY, max_retries=0, **options)

    def http(self, key: str | None = API_KEY) -> httpx.Client:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return httpx.Client(base_url=self.base_url, headers=headers, timeout=60)

    def admin_models(self) -> dict[str, dict]:
        with self.http(ADMIN_KEY) as http:
            return {m["name"]: m for m in http.get("/admin/models").json()["models"]}


@dataclass
class RunningServer(_Clients):
    base_url: str
    process: subprocess.Popen
    log_path: Path
    expected_exit_code: int = 0  # a test that kills the server on purpose says so

    def engine_pids(self) -> list[int]:
        """The server's child processes that run an engine, from /proc."""
        pid = self.process.pid
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
        return [int(c) for c in children if b"appliance.engine_process" in _cmdline(int(c))]

    def pause(self, seconds: float) -> None:
        """Stops the server's process (not its engines) for a while: the engines run ahead of it."""
        self.process.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.process.send_signal(signal.SIGCONT)


@dataclass
class InProcessServer(_Clients):
    base_url: str
    supervisor: Supervisor
    loop: asyncio.AbstractEventLoop

    def pause(self, seconds: float) -> None:
        """Blocks the server's event loop for a while (the engines' threads go on stepping); returns once it is
        blocked."""
        blocked = threading.Event()

        def block() -> None:
            blocked.set()
            time.sleep(seconds)

        self.loop.call_soon_threadsafe(block)
        blocked.wait()

    def kill_engine(self, model: str, replica: int = 0) -> None:
        """As if the replica's engine crashed: the supervisor fails its requests and restarts it."""
        engine = self.supervisor.models[model].replicas[replica]
        asyncio.run_coroutine_threadsafe(engine.kill(), self.loop).result(10)


def wait_for_model_error(server: _Clients, model: str, text: str | tuple[str, ...], timeout_s: float = 10) -> None:
    """The model's errors (the admin API's) come to hold `text` (or one of several), such as why its engine ended."""
    texts = (text,) if isinstance(text, str) else text
    deadline = time.monotonic() + timeout_s
    while True:
        errors = [e["message"] for e in server.admin_models()[model]["errors"]]
        if any(t in message for t in texts for message in errors):
            return
        assert time.monotonic() < deadline, errors
        time.sleep(0.1)


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
def run_server(config: dict, workdir: Path, start_timeout_s: float = 180,
               serve_args: tuple[str, ...] = ()) -> Iterator[RunningServer]:
    """Port 0 lets the server pick a free port; its ready banner says which. `serve_args`: `kvbox serve`'s
    options."""
    config_path, log_path = workdir / "kvbox.yaml", workdir / "server.log"
    config_path.write_text(yaml.safe_dump(config))
    with open(log_path, "wb") as log:
        process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "-c", str(config_path),
                                    *serve_args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)
    server = None
    try:
        server = RunningServer(_wait_for_banner(process, log_path, start_timeout_s), process, log_path)
        yield server
    finally:
        stop(process, log_path, expected_exit_code=server.expected_exit_code if server else 0)


@contextmanager
def run_inprocess(config: dict, start_timeout_s: float = 120) -> Iterator[InProcessServer]:
    """The app and its engines in this process (see the module docstring); ready once every model has started."""
    # The engines share this process's torch thread pool with the server and the test's clients; OpenMP's
    # spinning workers would starve them all of the machine's few cores (an engine process gets its own share).
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    app_config = parse_config(yaml.safe_dump(config))
    supervisor = Supervisor(app_config, engine_factory=InProcessEngineClient)
    server = uvicorn.Server(uvicorn.Config(create_app(app_config, supervisor), host="127.0.0.1", port=0,
                                           lifespan="on", log_level="warning", **connection_options(app_config)))
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_until_complete, args=(server.serve(),), name="api-server", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + start_timeout_s
        while not server.started or any(m.status is ModelStatus.LOADING for m in supervisor.models.values()) \
                or len(supervisor.models) < len(app_config.models):
            assert thread.is_alive() and time.monotonic() < deadline, "the in-process server did not start"
            time.sleep(0.01)
        port = server.servers[0].sockets[0].getsockname()[1]
        yield InProcessServer(f"http://127.0.0.1:{port}", supervisor, loop)
    finally:
        server.should_exit = True
        thread.join(60)
        loop.close()
        torch.set_num_threads(num_threads)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except FileNotFoundError:  # exited meanwhile
        return b""


def stop(process: subprocess.Popen, log_path: Path, timeout_s: float = 60, expected_exit_code: int = 0) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)
    try:
        code = process.wait(timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        raise AssertionError(f"the server did not exit {timeout_s:.0f} s after SIGTERM; log:\n{_tail(log_path)}")
    assert code == expected_exit_code, f"the server exited with {code}; log:\n{_tail(log_path)}"


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
def api_server(tiny_model) -> Iterator[InProcessServer]:
    """In process, two tiny models: `llama` (long context, small queue, for 429s) and `qwen` (512 tokens of context,
    greedy by default, for per-model defaults)."""
    config = server_config([
        model_config("llama", long_llama(tiny_model), queue_cap=1, scheduler={"max_num_seqs": 2}),
        model_config("qwen", tiny_model("qwen3"), default_sampling={"temperature": 0.0}),
    ])
    with run_inprocess(config) as server:
        yield server
