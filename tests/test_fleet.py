"""Many models on one machine: on-demand start, sleep (level 2: engines stopped) and wake, the least recently used
model put to sleep first under `max_active_models`, idle sleep; a woken model answers as one that never slept."""

import threading
import time

import httpx
import pytest

pytest.register_assert_rewrite("helpers_server")
from helpers_server import ADMIN_KEY, model_config, run_inprocess, server_config  # noqa: E402

pytest_plugins = ["helpers_server"]

PROMPT = "The quick brown fox"


def admin(server, method: str, path: str, **kwargs) -> httpx.Response:
    return httpx.request(method, server.base_url + path, headers={"Authorization": f"Bearer {ADMIN_KEY}"},
                         timeout=60, **kwargs)


def status(server, name: str) -> str:
    return {m["name"]: m["status"] for m in admin(server, "GET", "/admin/models").json()["models"]}[name]


def greedy(server, model: str) -> str:
    return server.client().completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0).choices[0].text


@pytest.fixture(scope="module")
def models(tiny_model):
    return tiny_model("llama"), tiny_model("qwen2")


def test_on_demand_model_sleeps_until_asked_and_answers_as_before_after_sleep(models):
    config = server_config([model_config("a", models[0], load="on_demand"), model_config("b", models[1])])
    with run_inprocess(config) as server:
        assert status(server, "a") == "sleeping" and status(server, "b") == "ready"
        assert httpx.get(server.base_url + "/ready").status_code == 200  # a sleeping model does not hold it back
        # Concurrent requests share one wake.
        answers = []
        threads = [threading.Thread(target=lambda: answers.append(greedy(server, "a"))) for _ in range(3)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert len(set(answers)) == 1 and status(server, "a") == "ready"
        woken_at = admin(server, "GET", "/admin/models").json()["models"][0]["last_wake"]
        assert woken_at is not None
        assert admin(server, "POST", "/admin/models/a/sleep", params={"level": 2}).json()["status"] == "sleeping"
        assert greedy(server, "a") == answers[0]  # woken by the request itself: the same greedy answer
        refused = admin(server, "POST", "/admin/models/a/sleep", params={"level": 3})
        assert refused.status_code == 400 and refused.json()["error"]["param"] == "level"
        assert admin(server, "POST", "/admin/models/zzz/wake").status_code == 404


def test_the_least_recently_used_idle_model_sleeps_to_make_room(models):
    config = server_config([model_config("a", models[0]), model_config("b", models[1], load="on_demand")],
                           max_active_models=1)
    with run_inprocess(config) as server:
        before = greedy(server, "a")
        assert greedy(server, "b")  # waking b puts a (idle) to sleep
        assert (status(server, "a"), status(server, "b")) == ("sleeping", "ready")
        assert greedy(server, "a") == before
        assert (status(server, "a"), status(server, "b")) == ("ready", "sleeping")


def test_an_idle_model_goes_to_sleep(models):
    config = server_config([model_config("a", models[0], idle_sleep_s=1.0)])
    with run_inprocess(config) as server:
        greedy(server, "a")
        deadline = time.monotonic() + 10
        while status(server, "a") != "sleeping":
            assert time.monotonic() < deadline, "the idle model did not sleep"
            time.sleep(0.2)
        assert greedy(server, "a")  # and wakes for the next request
