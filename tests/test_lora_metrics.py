"""Per-adapter Prometheus metrics through the API (in process): requests, computed tokens, GPU slot loads and residency
per adapter, and counters that never go back when an adapter is replaced, unloaded and loaded again, or when its
engine is killed and restarted."""

import time

import pytest
from prometheus_client.parser import text_string_to_metric_families
from test_lora import ADAPTERS, make_adapter

pytest.register_assert_rewrite("helpers_server")
from helpers_server import ADMIN_KEY, model_config, run_inprocess, server_config

pytest_plugins = ["helpers_server"]

MAX_TOKENS = 4
# Shorter than a KV block (16 tokens), so that no prompt hits the prefix cache and every prompt token is computed.
PROMPTS = ["one", "two three", "four five six", "seven", "eight nine", "ten", "eleven twelve"]


@pytest.fixture(scope="module")
def lora_server(tiny_model, tmp_path_factory):
    """(server, adapter folders by name): `llama` with LoRA on one replica, no adapter loaded yet."""
    base_dir = tiny_model("llama", max_position_embeddings=128)
    root = tmp_path_factory.mktemp("lora_metrics")
    allowed = root / "allowed"
    paths = {name: make_adapter(base_dir, allowed / name, seed=seed, **ADAPTERS[name])
             for seed, name in enumerate(("attn", "mlp"))}
    config = server_config([model_config("llama", base_dir, lora={"enabled": True, "allowed_dirs": [str(allowed)]})])
    with run_inprocess(config) as server:
        yield server, paths


def lora_metrics(server) -> dict[tuple, float]:
    """(metric name, adapter name[, location]) -> value, for model `llama`, from /metrics."""
    with server.http() as http:
        response = http.get("/metrics")
    assert response.status_code == 200
    found = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            if sample.name.startswith("kvbox:lora_") and sample.labels["model_name"] == "llama":
                key = (sample.name, sample.labels["lora_name"], sample.labels.get("location"))
                found[tuple(k for k in key if k is not None)] = sample.value
    return found


def wait_for(server, expected: dict[tuple, float]) -> dict[tuple, float]:
    """The metrics once they read `expected` (engines report their adapters about once a second, also while a
    request runs: its tokens may still be coming when it is counted)."""
    deadline = time.monotonic() + 10
    while any((found := lora_metrics(server)).get(key) != value for key, value in expected.items()):
        assert time.monotonic() < deadline, (expected, found)
        time.sleep(0.2)
    return found


def complete(server, model: str, prompt: str) -> int:
    """Sends one greedy completion; returns the tokens the engine computed for it (prompt + output - 1)."""
    with server.http() as http:
        response = http.post("/v1/completions", json={"model": model, "prompt": prompt, "max_tokens": MAX_TOKENS,
                                                      "temperature": 0, "ignore_eos": True})
    assert response.status_code == 200, response.text
    usage = response.json()["usage"]
    assert usage["completion_tokens"] == MAX_TOKENS
    return usage["prompt_tokens"] + MAX_TOKENS - 1


def load(server, name: str, path: str) -> None:
    with server.http(ADMIN_KEY) as admin:
        response = admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
    assert response.status_code == 200, response.text




def test_per_adapter_metrics_count_requests_and_tokens_and_never_go_back(lora_server):
    server, paths = lora_server
    requests, tokens = ("kvbox:lora_requests_total", "used"), ("kvbox:lora_tokens_total", "used")
    load(server, "used", paths["attn"])
    load(server, "idle", paths["mlp"])
    assert lora_metrics(server) == {  # loaded, not used yet: counters at zero, both in host memory only
        **{(metric, name): 0 for metric in ("kvbox:lora_requests_total", "kvbox:lora_tokens_total",
                                            "kvbox:lora_slot_loads_total") for name in ("used", "idle")},
        **{("kvbox:lora_adapter_residency", name, "gpu"): 0 for name in ("used", "idle")},
        **{("kvbox:lora_adapter_residency", name, "host"): 1 for name in ("used", "idle")},
    }

    computed = sum(complete(server, "used", prompt) for prompt in PROMPTS[:3])
    complete(server, "llama", PROMPTS[0])  # the base model counts for no adapter
    found = wait_for(server, {requests: 3, tokens: computed})
    assert found["kvbox:lora_slot_loads_total", "used"] == 1
    assert found["kvbox:lora_adapter_residency", "used", "gpu"] == 1
    assert found["kvbox:lora_adapter_residency", "used", "host"] == 0
    assert found["kvbox:lora_requests_total", "idle"] == found["kvbox:lora_tokens_total", "idle"] == 0
    assert found["kvbox:lora_adapter_residency", "idle", "host"] == 1

    # Replacing the adapter starts a new version in the engine; the name's counters go on.
    load(server, "used", paths["mlp"])
    assert lora_metrics(server)[requests] == 3
    computed += complete(server, "used", PROMPTS[3])
    wait_for(server, {requests: 4, tokens: computed})

    # Unloaded: the counters stay (and residency goes); loaded again, they go on from there, counted once.
    with server.http(ADMIN_KEY) as admin:
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "used"}).status_code == 200
    found = lora_metrics(server)
    assert found[requests] == 4 and found[tokens] == computed
    assert ("kvbox:lora_adapter_residency", "used", "gpu") not in found
    load(server, "used", paths["attn"])
    computed += complete(server, "used", PROMPTS[4])
    wait_for(server, {requests: 5, tokens: computed})

    # A killed engine restarts with the adapters restored and its counts at zero; the counters do not go back.
    restarts = server.admin_models()["llama"]["restarts"]
    server.kill_engine("llama")
    deadline = time.monotonic() + 60
    while (model := server.admin_models()["llama"])["restarts"] == restarts or model["status"] != "ready":
        assert time.monotonic() < deadline, "the killed engine did not come back"
        time.sleep(0.2)
    found = wait_for(server, {("kvbox:lora_adapter_residency", "used", "host"): 1})  # restored, not in a slot yet
    assert found[requests] == 5 and found[tokens] == computed
    computed += complete(server, "used", PROMPTS[5])
    wait_for(server, {requests: 6, tokens: computed, ("kvbox:lora_adapter_residency", "used", "gpu"): 1})


def test_request_path_counts_tokens_per_adapter_and_reports_adapters_in_use(lora_server):
    server, paths = lora_server
    load(server, "tally", paths["mlp"])
    prompt_tokens = 0
    for prompt in PROMPTS[:2]:
        prompt_tokens += complete(server, "tally", prompt) - MAX_TOKENS + 1
    found = lora_metrics(server)
    assert found["kvbox:lora_prompt_tokens_total", "tally"] == prompt_tokens
    assert found["kvbox:lora_generation_tokens_total", "tally"] == 2 * MAX_TOKENS
    assert found["kvbox:lora_requests_total", "tally"] <= 2  # the engine's count arrives with its next report

    def requests_info():
        with server.http() as http:
            text = http.get("/metrics").text
        (family,) = [f for f in text_string_to_metric_families(text) if f.name == "vllm:lora_requests_info"]
        return [s.labels for s in family.samples if s.labels["model_name"] == "llama"]

    # The engine's reports name "tally" while its requests run; once idle (reported within a second), nothing.
    idle = [{"model_name": "llama", "running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "4"}]
    deadline = time.monotonic() + 10
    while (info := requests_info()) != idle:
        assert info[0]["running_lora_adapters"] in ("tally", "") and time.monotonic() < deadline, info
        time.sleep(0.2)
