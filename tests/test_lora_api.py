"""LoRA adapters through the API: declared in the YAML, hot-loaded, replaced and unloaded (vLLM's routes and the admin
API), served as `model: "<adapter>"` with the same greedy output as the offline engine, and every refusal a 400 that
leaves the server as it was. One in-process server: `llama` with LoRA, `plain` (the same weights) without; and one
real server with `llama` on two data-parallel engine processes, where a load that one replica refuses is rolled back
on the other."""

import os
import signal
import time
from pathlib import Path

import httpx
import pytest
from test_lora import ADAPTERS, _truncate, _widen_a, make_adapter, rewrite_tensors
from test_lora_metrics import lora_metrics

from engine import LLM, SamplingParams

pytest.register_assert_rewrite("helpers_server")
from helpers_server import ADMIN_KEY, API_KEY, model_config, run_inprocess, run_server, server_config

pytest_plugins = ["helpers_server"]

PROMPT = "The quick brown fox"
MAX_TOKENS = 8
# name -> (PEFT config, seed): the YAML's adapter, one to hot-load, one to replace it with
GOOD = {"yaml-attn": (ADAPTERS["attn"], 0), "hot-mlp": (ADAPTERS["mlp"], 1), "hot-mixed": (ADAPTERS["mixed"], 2)}


@pytest.fixture(scope="module")
def setup(tiny_model, tmp_path_factory):
    """(server, adapter folders by name, allowed dir, outside dir, greedy offline text by adapter name or None)."""
    base_dir = tiny_model("llama", max_position_embeddings=128)
    root = tmp_path_factory.mktemp("lora_api")
    allowed, outside = root / "allowed", root / "outside"
    allowed.mkdir()
    outside.mkdir()
    paths = {name: make_adapter(base_dir, allowed / name, seed=seed, **config)
             for name, (config, seed) in GOOD.items()}
    llm = LLM(base_dir, dtype="float32", device="cpu", enable_lora=True, num_kv_blocks=300)
    for name, path in paths.items():
        llm.add_lora(name, path)
    params = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS, ignore_eos=True)
    expected = {name: llm.generate(PROMPT, params, use_tqdm=False, lora_name=name)[0].outputs[0].text
                for name in [None, *GOOD]}
    del llm
    lora = {"enabled": True, "allowed_dirs": [str(allowed)],
            "adapters": [{"name": "yaml-attn", "path": paths["yaml-attn"]}]}
    config = server_config([model_config("llama", base_dir, lora=lora), model_config("plain", base_dir)])
    with run_inprocess(config) as server:
        yield server, paths, allowed, outside, base_dir, expected


def complete(http: httpx.Client, model: str) -> httpx.Response:
    return http.post("/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": MAX_TOKENS,
                                              "temperature": 0, "ignore_eos": True})


def text(http: httpx.Client, model: str) -> str:
    response = complete(http, model)
    assert response.status_code == 200, response.text
    return response.json()["choices"][0]["text"]


def served(server) -> list[tuple]:
    with server.http(ADMIN_KEY) as admin:
        return [(a["name"], a["path"], a["adapter_id"]) for a in admin.get("/admin/models/llama/loras").json()["loras"]]


def test_yaml_adapter_is_listed_with_its_parent_and_serves_like_the_offline_engine(setup):
    server, _, _, _, _, expected = setup
    with server.http() as http:
        models = {m["id"]: m for m in http.get("/v1/models").json()["data"]}
        assert models["yaml-attn"]["parent"] == "llama" and models["llama"]["parent"] is None
        assert http.get("/v1/models/yaml-attn").json()["parent"] == "llama"
        assert expected["yaml-attn"] != expected[None]
        assert text(http, "yaml-attn") == expected["yaml-attn"]
        assert text(http, "llama") == expected[None]
    deadline = time.monotonic() + 5  # engines report their adapters with the block map, about once a second
    with server.http(ADMIN_KEY) as admin:
        while True:
            stats = {m["name"]: m for m in admin.get("/admin/stats").json()["models"]}
            adapters = {a["name"]: a for a in stats["llama"]["lora"]["adapters"]}
            if adapters.get("yaml-attn", {}).get("requests"):
                break
            assert time.monotonic() < deadline, adapters
            time.sleep(0.2)
    assert adapters["yaml-attn"]["slot"] is not None and adapters["yaml-attn"]["tokens"] > 0
    with server.http() as http:
        chat = http.post("/v1/chat/completions", json={"model": "yaml-attn", "max_tokens": 2,
                                                       "messages": [{"role": "user", "content": "Hi"}]})
        assert chat.status_code == 200, chat.text


def test_hot_load_replace_and_unload(setup):
    server, paths, _, _, _, expected = setup
    with server.http() as http, server.http(ADMIN_KEY) as admin:
        assert complete(http, "hot").status_code == 404
        response = admin.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": paths["hot-mlp"]})
        assert response.status_code == 200, response.text
        assert text(http, "hot") == expected["hot-mlp"] != expected[None]
        assert {"id": "hot", "parent": "llama"}.items() <= {m["id"]: m for m in
                                                          http.get("/v1/models").json()["data"]}["hot"].items()
        # replacing under the same name
        response = admin.post("/v1/load_lora_adapter", json={"lora_name": "hot", "lora_path": paths["hot-mixed"],
                                                             "base_model": "llama"})
        assert response.status_code == 200, response.text
        assert text(http, "hot") == expected["hot-mixed"] != expected["hot-mlp"]
        response = admin.post("/v1/unload_lora_adapter", json={"lora_name": "hot"})
        assert response.status_code == 200, response.text
        assert complete(http, "hot").status_code == 404
        assert "hot" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "hot"}).status_code == 404
        assert text(http, "yaml-attn") == expected["yaml-attn"]


def test_admin_api_lists_loads_and_deletes(setup):
    server, paths, _, _, _, expected = setup
    with server.http() as http, server.http(ADMIN_KEY) as admin:
        listing = admin.get("/admin/models/llama/loras").json()
        assert [a["name"] for a in listing["loras"]] == ["yaml-attn"] and listing["loras"][0]["rank"] == 8
        response = admin.post("/admin/models/llama/loras", json={"name": "adm", "path": paths["hot-mlp"]})
        assert response.status_code == 200, response.text
        assert [a["name"] for a in response.json()["loras"]] == ["yaml-attn", "adm"]
        assert text(http, "adm") == expected["hot-mlp"]
        response = admin.delete("/admin/models/llama/loras/adm")
        assert response.status_code == 200, response.text
        assert [a["name"] for a in response.json()["loras"]] == ["yaml-attn"]
        assert admin.delete("/admin/models/llama/loras/adm").status_code == 404
        assert admin.get("/admin/models/nope/loras").status_code == 404


def _escape(allowed, outside, make):  # allowed/../outside/x: the path names the allowed dir but leaves it
    return os.path.join(str(allowed), "..", "outside", os.path.basename(make(outside / "escape")))


def _symlink(allowed, outside, make):
    link = allowed / "link"
    link.symlink_to(make(outside / "target"), target_is_directory=True)
    return str(link)


def _spoiled(spoil, config=ADAPTERS["attn"]):
    def build(allowed, outside, make):
        path = make(allowed / spoil.__name__, config)
        spoil(allowed / spoil.__name__)
        return path
    return build


# case -> (how to build the path, the param named, a part of the message)
REFUSALS = {
    "dotdot_outside": (_escape, "lora_path", "allowed_dirs"),
    "symlink_outside": (_symlink, "lora_path", "allowed_dirs"),
    "corrupt_safetensors": (_spoiled(_truncate), "lora_path", "cannot read adapter_model.safetensors"),
    "rank_above_max": (lambda a, o, make: make(a / "big", {"r": 32, "lora_alpha": 32, "target_modules": ["q_proj"]}),
                       "lora_path", "above this engine's max_lora_rank"),
    "wrong_hidden_size": (_spoiled(lambda d: rewrite_tensors(d, _widen_a)), "lora_path", "has shape"),
}


@pytest.mark.parametrize("case", REFUSALS)
def test_refusals_are_400_and_change_nothing(setup, case):
    server, _, allowed, outside, base_dir, expected = setup
    build, param, message = REFUSALS[case]
    path = build(allowed, outside, lambda d, config=ADAPTERS["attn"]: make_adapter(base_dir, d, seed=7, **config))
    before = served(server)
    with server.http() as http, server.http(ADMIN_KEY) as admin:
        for name in ("yaml-attn", "new"):  # replacing an adapter, and adding one
            response = admin.post("/v1/load_lora_adapter", json={"lora_name": name, "lora_path": path})
            assert response.status_code == 400, response.text
            error = response.json()["error"]
            assert error["param"] == param and message in error["message"], error
            assert served(server) == before
        assert complete(http, "new").status_code == 404
        assert text(http, "yaml-attn") == expected["yaml-attn"]


def test_lora_disabled_model_and_name_clashes_are_refused(setup):
    server, paths, *_ = setup
    with server.http(ADMIN_KEY) as admin:
        response = admin.post("/v1/load_lora_adapter",
                              json={"lora_name": "x", "lora_path": paths["hot-mlp"], "base_model": "plain"})
        assert response.status_code == 400 and "not enabled" in response.json()["error"]["message"]
        response = admin.post("/admin/models/plain/loras", json={"name": "x", "path": paths["hot-mlp"]})
        assert response.status_code == 400
        response = admin.post("/v1/load_lora_adapter", json={"lora_name": "plain", "lora_path": paths["hot-mlp"]})
        assert response.status_code == 400 and response.json()["error"]["param"] == "lora_name"
        assert admin.post("/v1/load_lora_adapter", json={"lora_name": "x"}).status_code == 400
    assert [name for name, *_ in served(server)] == ["yaml-attn"]


def test_admin_key_is_required(setup):
    server, paths, *_ = setup
    calls = [("POST", "/v1/load_lora_adapter", {"lora_name": "k", "lora_path": paths["hot-mlp"]}),
             ("POST", "/v1/unload_lora_adapter", {"lora_name": "yaml-attn"}),
             ("GET", "/admin/models/llama/loras", None),
             ("POST", "/admin/models/llama/loras", {"name": "k", "path": paths["hot-mlp"]}),
             ("DELETE", "/admin/models/llama/loras/yaml-attn", None)]
    for key in (None, API_KEY):
        with server.http(key) as http:
            for method, url, body in calls:
                assert http.request(method, url, json=body).status_code == 401, (key, method, url)
    assert [name for name, *_ in served(server)] == ["yaml-attn"]


@pytest.fixture(scope="module")
def two_replicas(tiny_model, tmp_path_factory):
    """(server, adapter folders by name): `llama` on 2 data-parallel replicas with room for 2 adapters each, `a`
    and `b` loaded from the YAML."""
    base_dir = tiny_model("llama", max_position_embeddings=128)
    root = tmp_path_factory.mktemp("lora_replicas")
    allowed = root / "allowed"
    paths = {name: make_adapter(base_dir, allowed / name, seed=seed, **ADAPTERS["attn"])
             for seed, name in enumerate("abc")}
    lora = {"enabled": True, "max_loras": 2, "max_cpu_loras": 2, "allowed_dirs": [str(allowed)],
            "adapters": [{"name": name, "path": paths[name]} for name in "ab"]}
    # A short hang timeout: a stopped engine is found out and restarted within seconds.
    config = server_config([model_config("llama", base_dir, parallelism={"data": 2}, lora=lora)],
                           engine_hang_timeout_s=3)
    with run_server(config, root) as server:
        yield server, paths


def replicas_serving(server) -> dict[str, int]:
    """Adapter name -> how many replicas hold it, as the engines last reported (/metrics)."""
    serving = {}
    for (metric, name, *_), value in lora_metrics(server).items():
        if metric == "kvbox:lora_adapter_residency":
            serving[name] = serving.get(name, 0) + int(value)
    return serving


def wait_until_ready_again(server, replica: int, pid: int) -> dict:
    deadline = time.monotonic() + 60
    while (model := server.admin_models()["llama"])["replicas"][replica]["pid"] == pid or model["status"] != "ready":
        assert time.monotonic() < deadline, "the replica did not come back"
        time.sleep(0.2)
    return model


def test_replicas_keep_serving_the_same_adapters(two_replicas):
    server, paths = two_replicas
    assert replicas_serving(server) == {"a": 2, "b": 2}

    # b's file goes bad, then replica 1 restarts and cannot load b back: b goes from replica 0 too, so that no
    # request for it depends on which replica it reaches.
    _truncate(Path(paths["b"]))
    pid = server.admin_models()["llama"]["replicas"][1]["pid"]
    os.kill(pid, signal.SIGKILL)
    model = wait_until_ready_again(server, 1, pid)
    assert any("'b' unloaded from every replica" in error["message"] for error in model["errors"]), model["errors"]
    deadline = time.monotonic() + 10
    while replicas_serving(server) != {"a": 2}:  # the engines report their adapters about once a second
        assert time.monotonic() < deadline, replicas_serving(server)
        time.sleep(0.2)
    with server.http() as http:
        assert "b" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert complete(http, "b").status_code == 404
        assert complete(http, "a").status_code == 200

    # A replica that stops while loading (here: frozen until the hang watchdog kills it) fails the load: the
    # replica that had loaded it unloads it again, the client gets a 503 to retry, and nothing changed.
    pid = server.admin_models()["llama"]["replicas"][1]["pid"]
    os.kill(pid, signal.SIGSTOP)
    with server.http() as http, server.http(ADMIN_KEY) as admin:
        response = admin.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": paths["c"]})
        assert response.status_code == 503, response.text
        assert "stopped while loading" in response.json()["error"]["message"] and response.headers["retry-after"]
        wait_until_ready_again(server, 1, pid)
        assert [name for name, *_ in served(server)] == ["a"]
        assert "c" not in {m["id"] for m in http.get("/v1/models").json()["data"]}
        assert complete(http, "c").status_code == 404

        # Retried with every replica up, the same adapter loads on both.
        response = admin.post("/v1/load_lora_adapter", json={"lora_name": "c", "lora_path": paths["c"]})
        assert response.status_code == 200, response.text
        deadline = time.monotonic() + 10
        while replicas_serving(server) != {"a": 2, "c": 2}:
            assert time.monotonic() < deadline, replicas_serving(server)
            time.sleep(0.2)
        assert complete(http, "c").status_code == 200
