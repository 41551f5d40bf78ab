"""Faults against the real server: a killed or hung engine, a killed supervisor, a reload under load, logs on a full
disk, a corrupt checkpoint or tokenizer among good models, a flood of streams against a queue cap, and configs that
must stop `kvbox serve` before anything starts."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
import yaml
from helpers_server import ADMIN_KEY, API_KEY, ROOT, long_llama, model_config, run_server, server_config

sys.path.insert(0, str(ROOT))
from bench.load import flood  # noqa: E402

pytest_plugins = ["helpers_server"]

COMPLETION = {"prompt": "Once upon a time", "max_tokens": 8, "temperature": 0.0}


@pytest.fixture(scope="module")
def two_models(tiny_model, tmp_path_factory):
    config = server_config([
        model_config("victim", long_llama(tiny_model)),
        model_config("bystander", tiny_model("qwen3"), queue_cap=50, scheduler={"max_num_seqs": 4}),
    ])
    with run_server(config, tmp_path_factory.mktemp("two_models")) as server:
        yield server


def stream_until_error(http: httpx.Client, model: str, pid: int, fault: signal.Signals) -> float:
    """Starts a long stream, sends `fault` to the engine once the first chunk is in, checks that the stream ends
    with an error event and `[DONE]`; returns the seconds from the fault to that end."""
    body = {**COMPLETION, "model": model, "max_tokens": 2000, "ignore_eos": True, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        lines = response.iter_lines()
        next(lines)
        fault_at = time.monotonic()
        os.kill(pid, fault)
        events = [line.removeprefix("data: ") for line in lines if line]
    seconds = time.monotonic() - fault_at
    assert events[-1] == "[DONE]" and "error" in json.loads(events[-2]), events[-3:]
    return seconds


def test_killed_engine_fails_its_stream_while_the_other_model_serves(two_models):
    pid = two_models.admin_models()["victim"]["replicas"][0]["pid"]
    with two_models.http() as http:
        seconds = stream_until_error(http, "victim", pid, signal.SIGKILL)
        assert seconds < 5, "the client waited too long for the error"
        # While the victim restarts, the other model answers.
        answer = http.post("/v1/completions", json={**COMPLETION, "model": "bystander"})
        assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
        deadline = time.monotonic() + 60
        while two_models.admin_models()["victim"]["status"] != "ready":
            assert time.monotonic() < deadline, "the killed engine did not come back"
            time.sleep(0.1)
        again = http.post("/v1/completions", json={**COMPLETION, "model": "victim"})
        assert again.status_code == 200
    assert two_models.admin_models()["victim"]["replicas"][0]["pid"] != pid


def test_hung_engine_is_killed_and_restarted_and_its_stream_ends_with_an_error(tiny_model, tmp_path):
    """server.engine_hang_timeout_s: an engine that stops answering (here: frozen with SIGSTOP) is killed after that
    long, its streams end with an error event rather than waiting forever, and it comes back."""
    config = server_config([model_config("frozen", long_llama(tiny_model))], engine_hang_timeout_s=2)
    with run_server(config, tmp_path) as server, server.http() as http:
        pid = server.admin_models()["frozen"]["replicas"][0]["pid"]
        assert 2 <= stream_until_error(http, "frozen", pid, signal.SIGSTOP) < 8
        deadline = time.monotonic() + 60
        while (model := server.admin_models()["frozen"])["status"] != "ready" or model["replicas"][0]["pid"] == pid:
            assert time.monotonic() < deadline, "the hung engine did not come back"
            time.sleep(0.1)
        assert http.post("/v1/completions", json={**COMPLETION, "model": "frozen"}).status_code == 200


def test_200_streams_against_a_queue_cap_of_50_all_end_cleanly(two_models):
    """The real server (bench/load.py's flood): each stream completes with [DONE] or gets 429 with Retry-After."""
    result = asyncio.run(flood(two_models.base_url, "bystander", 200, max_tokens=8, api_key=API_KEY, timeout_s=180))
    print(f"\n200 concurrent streams, queue cap 50 + 4 running: {result.outcomes}, "
          f"max latency {max(result.latencies_s):.1f} s")
    assert set(result.outcomes) <= {"completed", "429", "503"}, result.outcomes
    assert result.outcomes.get("completed", 0) >= 54  # at least what the queue and the running slots admit at once
    assert result.outcomes.get("429", 0) > 0  # the flood did overflow the queue
    with two_models.http() as http:  # and the server is fine afterwards
        assert http.post("/v1/completions", json={**COMPLETION, "model": "bystander"}).status_code == 200


@pytest.mark.parametrize(("mutate", "key_path"), [
    (lambda c: c["models"][0]["kv_cache"].update(blok_size=16), "models[0].kv_cache.blok_size"),
    (lambda c: c["models"][0]["scheduler"].update(max_num_seqs="many"), "models[0].scheduler.max_num_seqs"),
    (lambda c: c["models"].append(dict(c["models"][0])), "models[1].name"),
])
def test_bad_configs_stop_serve_before_anything_starts(tiny_model, tmp_path, mutate, key_path):
    config = server_config([model_config("llama", tiny_model("llama"))])
    mutate(config)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(config))
    result = subprocess.run([sys.executable, "-m", "appliance.cli", "serve", "-c", str(path)], capture_output=True,
                            text=True, timeout=60)
    assert result.returncode != 0
    assert key_path in result.stderr + result.stdout
    assert "API:" not in result.stdout  # nothing was served


def test_reload_adds_and_removes_models_and_leaves_the_rest_alone(tiny_model, tmp_path):
    keep = model_config("keep", tiny_model("llama"))
    config = server_config([keep, model_config("drop", tiny_model("qwen3"))])
    with run_server(config, tmp_path) as server:
        kept_pid = server.admin_models()["keep"]["replicas"][0]["pid"]
        config_path = tmp_path / "kvbox.yaml"
        config_path.write_text(yaml.safe_dump(server_config([keep, model_config("added", tiny_model("qwen2"))])))
        with server.http(ADMIN_KEY) as admin:
            changes = admin.post("/admin/reload", timeout=120).json()
            assert changes["added"] == ["added"] and changes["removed"] == ["drop"]
            assert changes["unchanged"] == ["keep"]
            assert server.admin_models()["keep"]["replicas"][0]["pid"] == kept_pid
            with server.http() as http:
                names = [m["id"] for m in http.get("/v1/models").json()["data"]]
                assert sorted(names) == ["added", "keep"]
                assert http.post("/v1/completions", json={**COMPLETION, "model": "added"}).status_code == 200
            config_path.write_text("models: [{name: broken}]\n")  # invalid: the running config stays
            refused = admin.post("/admin/reload")
            assert refused.status_code == 400 and "models[0]" in refused.json()["error"]["message"]
            assert sorted(server.admin_models()) == ["added", "keep"]
            config_path.write_text(yaml.safe_dump(server_config([keep])))
            server.process.send_signal(signal.SIGHUP)  # the same through the signal
            deadline = time.monotonic() + 60
            while sorted(server.admin_models()) != ["keep"]:
                assert time.monotonic() < deadline, "SIGHUP did not reload"
                time.sleep(0.1)


def test_data_parallel_replicas_share_the_requests(tiny_model, tmp_path):
    config = server_config([model_config("llama", tiny_model("llama"), parallelism={"data": 2},
                                         scheduler={"max_num_seqs": 2})])
    with run_server(config, tmp_path) as server:
        replicas = server.admin_models()["llama"]["replicas"]
        assert len(replicas) == 2 and replicas[0]["pid"] != replicas[1]["pid"]
        prompt = "The quick brown fox jumps over the lazy dog " * 4  # several KV blocks: each replica counts lookups
        with server.http() as http:
            def complete(_):
                return http.post("/v1/completions", json={**COMPLETION, "prompt": prompt, "max_tokens": 16,
                                                          "model": "llama", "ignore_eos": True}).status_code
            with ThreadPoolExecutor(8) as pool:
                assert list(pool.map(complete, range(8))) == [200] * 8
        time.sleep(0.6)  # idle engines report their stats a few times a second
        lookups = [r["stats"]["prefix_cache_queries"] for r in server.admin_models()["llama"]["replicas"]]
        assert all(n > 0 for n in lookups), lookups


def test_a_tokenizer_that_cannot_load_fails_its_model_and_stops_its_engines(tiny_model, tmp_path):
    """Engines start while the supervisor loads the tokenizer: when that fails, the model's engines (2 replicas) are
    stopped, not left running, and the other model serves."""
    empty = tmp_path / "no-tokenizer"  # a folder, as the config requires, but without a tokenizer
    empty.mkdir()
    config = server_config([model_config("broken", tiny_model("llama"), tokenizer=str(empty), parallelism={"data": 2}),
                            model_config("fine", tiny_model("qwen3"))])
    with run_server(config, tmp_path) as server:
        broken = server.admin_models()["broken"]
        assert broken["status"] == "failed" and "cannot load the tokenizer" in broken["errors"][-1]["message"], broken
        assert [r["pid"] for r in server.admin_models()["fine"]["replicas"]] == server.engine_pids()
        with server.http() as http:
            assert http.post("/v1/completions", json={**COMPLETION, "model": "fine"}).status_code == 200
            assert http.post("/v1/completions", json={**COMPLETION, "model": "broken"}).status_code == 503


def test_killed_supervisor_leaves_no_engine_behind(tiny_model, tmp_path):
    """SIGKILL gives the server no chance to stop its engines: each notices its socket close (even mid-stream) and
    exits on its own, well within 10 s."""
    config = server_config([model_config("busy", long_llama(tiny_model)), model_config("idle", tiny_model("qwen3"))])
    with run_server(config, tmp_path) as server, server.http() as http:
        engines = server.engine_pids()
        assert len(engines) == 2
        body = {**COMPLETION, "model": "busy", "max_tokens": 2000, "ignore_eos": True, "stream": True}
        with http.stream("POST", "/v1/completions", json=body) as response:
            next(response.iter_lines())  # "busy" is mid-stream
            server.expected_exit_code = -signal.SIGKILL
            server.process.kill()
            server.process.wait(10)
        deadline = time.monotonic() + 10
        while alive := [pid for pid in engines if _running(pid)]:
            assert time.monotonic() < deadline, f"engines {alive} outlived their supervisor by 10 s"
            time.sleep(0.1)


def _running(pid: int) -> bool:
    """Alive and not a zombie (an orphan is reaped by init; one not yet reaped has exited all the same)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


def test_reload_under_load_completes_every_stream_of_the_unchanged_model(tiny_model, tmp_path):
    keep = model_config("keep", long_llama(tiny_model), queue_cap=50, scheduler={"max_num_seqs": 4})
    config = server_config([keep, model_config("drop", tiny_model("qwen3"))])

    async def streams_during_reload(server) -> list[str]:
        async with httpx.AsyncClient(base_url=server.base_url, timeout=120,
                                     headers={"Authorization": f"Bearer {API_KEY}"}) as client:
            async def one() -> str:
                body = {**COMPLETION, "model": "keep", "max_tokens": 1000, "ignore_eos": True, "stream": True}
                async with client.stream("POST", "/v1/completions", json=body) as response:
                    events = [line async for line in response.aiter_lines() if line]
                return "ok" if response.status_code == 200 and events[-1] == "data: [DONE]" and \
                    not any('"error"' in e for e in events) else f"{response.status_code}: {events[-2:]}"

            tasks = [asyncio.create_task(one()) for _ in range(12)]
            await asyncio.sleep(0.5)  # the streams are running
            (tmp_path / "kvbox.yaml").write_text(yaml.safe_dump(server_config([keep, model_config(
                "added", tiny_model("qwen2"))])))
            reload = await client.post("/admin/reload", headers={"Authorization": f"Bearer {ADMIN_KEY}"})
            assert reload.is_success and reload.json()["unchanged"] == ["keep"], reload.text
            assert not all(t.done() for t in tasks), "the streams ended before the reload did: no load to test"
            return await asyncio.wait_for(asyncio.gather(*tasks), 120)

    with run_server(config, tmp_path) as server:
        outcomes = asyncio.run(streams_during_reload(server))
        assert outcomes == ["ok"] * 12, outcomes
        assert sorted(server.admin_models()) == ["added", "keep"]


def test_a_full_disk_under_the_logs_does_not_stop_the_serving(tiny_model, tmp_path):
    """The server's and engines' output go to /dev/full (every write fails with ENOSPC): logging drops the lines,
    the banner is skipped, requests are served, and SIGTERM still drains cleanly."""
    port = _free_port()
    config_path = tmp_path / "kvbox.yaml"
    config_path.write_text(yaml.safe_dump(server_config([model_config("llama", tiny_model("llama"))], port=port)))
    with open("/dev/full", "wb") as full:
        process = subprocess.Popen([sys.executable, "-m", "appliance.cli", "serve", "-c", str(config_path),
                                    "--log-level", "debug"], cwd=ROOT, stdout=full, stderr=full)
    try:
        with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"}) as http:
            deadline = time.monotonic() + 120
            while not _ready(http):
                assert process.poll() is None and time.monotonic() < deadline, "the server did not come up"
                time.sleep(0.2)
            for _ in range(3):
                answer = http.post("/v1/completions", json={**COMPLETION, "model": "llama"})
                assert answer.status_code == 200 and answer.json()["choices"][0]["text"]
            with http.stream("POST", "/v1/completions", json={**COMPLETION, "model": "llama", "stream": True}) as r:
                assert [line for line in r.iter_lines() if line][-1] == "data: [DONE]"
    finally:
        process.send_signal(signal.SIGTERM)
        assert process.wait(60) == 0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ready(http: httpx.Client) -> bool:
    try:
        return http.get("/ready").status_code == 200
    except httpx.TransportError:
        return False


def test_a_corrupt_checkpoint_fails_its_model_with_a_clear_error_while_the_others_serve(tiny_model, tmp_path):
    corrupt = tmp_path / "corrupt"
    shutil.copytree(tiny_model("llama"), corrupt)
    weights = corrupt / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:weights.stat().st_size // 2])  # a download cut short
    config = server_config([model_config("corrupt", str(corrupt)), model_config("fine", tiny_model("qwen3"))])
    with run_server(config, tmp_path) as server, server.http() as http:
        broken = server.admin_models()["corrupt"]
        assert broken["status"] == "failed", broken
        print("\n", broken["errors"][-1]["message"])
        assert "model.safetensors" in broken["errors"][-1]["message"]
        assert http.post("/v1/completions", json={**COMPLETION, "model": "fine"}).status_code == 200
        refused = http.post("/v1/completions", json={**COMPLETION, "model": "corrupt"})
        assert refused.status_code == 503 and refused.json()["error"]["message"]
