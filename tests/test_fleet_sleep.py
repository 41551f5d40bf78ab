"""Sleep level 1 (the engine stays, its KV cache freed, its weights in host memory), deepening to level 2, restarts,
and wakes that fail: the waiting requests get a 503 at once and the model comes back after a backoff."""

import threading
import time

import httpx
import openai
import pytest
from test_fleet import PROMPT, admin, greedy, status

from appliance import supervisor as supervisor_module
from appliance.inprocess import InProcessEngineClient
from engine.sleep import EngineSleep

pytest.register_assert_rewrite("helpers_server")
from helpers_server import API_KEY, long_llama, model_config, run_inprocess, server_config  # noqa: E402

pytest_plugins = ["helpers_server"]


@pytest.fixture(scope="module")
def llama(tiny_model):
    return tiny_model("llama")


def model_info(server, name: str) -> dict:
    return {m["name"]: m for m in admin(server, "GET", "/admin/models").json()["models"]}[name]


def wait_for(server, name: str, wanted: str, timeout_s: float = 15) -> None:
    deadline = time.monotonic() + timeout_s
    while status(server, name) != wanted:
        assert time.monotonic() < deadline, f"{name} is {status(server, name)}, not {wanted}"
        time.sleep(0.1)


@pytest.fixture
def fast_backoff(monkeypatch):
    monkeypatch.setattr(supervisor_module, "RESTART_BACKOFF_S", (0.2, 0.2, 0.2, 0.2, 0.2))
    monkeypatch.setattr("appliance.fleet.RESTART_BACKOFF_S", (0.2, 0.2, 0.2, 0.2, 0.2))


def test_level_1_keeps_the_engine_frees_the_cache_and_answers_as_before(llama):
    config = server_config([model_config("a", llama)])
    with run_inprocess(config) as server:
        before = greedy(server, "a")
        awake = model_info(server, "a")
        assert awake["memory"]["weight_bytes"] > 0 and awake["memory"]["kv_cache_bytes"] > 0
        replica = server.supervisor.models["a"].replicas[0]
        slept = admin(server, "POST", "/admin/models/a/sleep", params={"level": 1}).json()
        assert slept["status"] == "sleeping" and slept["sleep_level"] == 1
        # On a CPU the weights stay in host memory (no copy); the cache is gone.
        assert slept["memory"] == {"weight_bytes": awake["memory"]["weight_bytes"], "kv_cache_bytes": 0,
                                   "host_copy_bytes": 0}
        assert server.supervisor.models["a"].replicas[0] is replica  # the same engine, not a new one
        assert all(layer.kv_cache is None for layer in replica._engine_loop.core.runner.model.attention_layers())
        assert greedy(server, "a") == before  # the request wakes it
        info = model_info(server, "a")
        assert info["status"] == "ready" and info["sleep_level"] is None and info["memory"] == awake["memory"]
        assert info["last_wake"] is not None and server.supervisor.models["a"].replicas[0] is replica
        # Deeper: level 1 then level 2 stops the engine; a level-1 request on a level-2 sleeper changes nothing.
        admin(server, "POST", "/admin/models/a/sleep", params={"level": 1})
        deeper = admin(server, "POST", "/admin/models/a/sleep", params={"level": 2}).json()
        assert deeper["sleep_level"] == 2 and deeper["memory"]["weight_bytes"] == 0
        assert admin(server, "POST", "/admin/models/a/sleep", params={"level": 1}).json()["sleep_level"] == 2
        woken = admin(server, "POST", "/admin/models/a/wake").json()
        assert woken["status"] == "ready" and woken["memory"] == awake["memory"]
        assert greedy(server, "a") == before


def test_a_request_running_when_its_model_sleeps_fails_and_the_next_one_wakes_it(tiny_model):
    config = server_config([model_config("a", long_llama(tiny_model))])
    with run_inprocess(config) as server:
        errors = []

        def long_request():
            try:
                server.client().completions.create(model="a", prompt=PROMPT, max_tokens=2000, temperature=0)
            except openai.APIStatusError as e:
                errors.append(e)

        thread = threading.Thread(target=long_request)
        thread.start()
        deadline = time.monotonic() + 10
        while server.supervisor.models["a"].num_inflight == 0:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        assert admin(server, "POST", "/admin/models/a/sleep", params={"level": 1}).json()["status"] == "sleeping"
        thread.join(30)
        assert not thread.is_alive() and len(errors) == 1 and errors[0].status_code == 503
        assert greedy(server, "a")


def test_restart_gives_fresh_engines(llama):
    config = server_config([model_config("a", llama)])
    with run_inprocess(config) as server:
        before = greedy(server, "a")
        old = server.supervisor.models["a"].replicas[0]
        restarted = admin(server, "POST", "/admin/models/a/restart").json()
        assert restarted["status"] == "ready" and model_info(server, "a")["restarts"] == 1
        assert server.supervisor.models["a"].replicas[0] is not old
        assert greedy(server, "a") == before
        assert admin(server, "POST", "/admin/models/nope/restart").status_code == 404


def test_an_engine_that_dies_while_waking_from_level_1_is_restarted_and_its_requests_fail(llama, monkeypatch,
                                                                                          fast_backoff):
    config = server_config([model_config("a", llama, sleep_level=1, load="eager")])
    with run_inprocess(config) as server:
        before = greedy(server, "a")
        admin(server, "POST", "/admin/models/a/sleep", params={"level": 1})
        monkeypatch.setattr(EngineSleep, "wake", lambda self: 1 / 0)  # the engine's loop dies on the Wake
        started = time.monotonic()
        with pytest.raises(openai.APIStatusError) as failed:
            server.client().completions.create(model="a", prompt=PROMPT, max_tokens=4, temperature=0)
        assert failed.value.status_code == 503 and time.monotonic() - started < 10
        monkeypatch.undo()
        wait_for(server, "a", "ready")  # a fresh engine, started by the supervisor's watcher
        assert model_info(server, "a")["restarts"] == 1 and greedy(server, "a") == before


def test_a_wake_from_level_2_that_cannot_start_fails_its_requests_and_retries(llama, monkeypatch, fast_backoff):
    config = server_config([model_config("a", llama, load="on_demand")])
    with run_inprocess(config) as server:
        attempts = []
        real_start = InProcessEngineClient.start

        async def failing_once(self, tokenizer, timeout_s: float = 600.0):
            attempts.append(time.monotonic())
            if len(attempts) == 1:
                from appliance.engines import EngineStartError
                raise EngineStartError("injected: the engine did not start")
            return await real_start(self, tokenizer, timeout_s)

        monkeypatch.setattr(InProcessEngineClient, "start", failing_once)
        response = httpx.post(server.base_url + "/v1/completions", timeout=30,
                              headers={"Authorization": f"Bearer {API_KEY}"},
                              json={"model": "a", "prompt": PROMPT, "max_tokens": 4})
        assert response.status_code == 503 and response.headers.get("retry-after")
        assert response.json()["error"]["code"] == "model_unavailable"
        wait_for(server, "a", "ready")
        assert len(attempts) == 2 and greedy(server, "a")
