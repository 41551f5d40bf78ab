"""The dashboard's operator tools: the log view (the redacted ring of `appliance.log_ring`, the engines' pipes of
`appliance.log_pipe`, `GET /admin/logs`), the playground (a streamed chat through the public API), and what the
dashboard's own polling costs an idle server (`bench/dashboard_cpu.py`, bounded here).

`KVBOX_UPDATE_SCREENSHOT=1` also writes the log view and playground screenshots under docs/ (the README shows them).
"""

from __future__ import annotations

import asyncio
import logging
import os
import select
import shutil
import threading
import time

import pytest
from litestar.testing import TestClient

from appliance.app import create_app
from appliance.config import parse_config
from appliance.log_pipe import PipeHandler, forward_engine_logs, open_pipe
from appliance.log_ring import LogRing, RingHandler, secret_values
from appliance.supervisor import Supervisor

pytest.register_assert_rewrite("helpers_server")
from helpers_server import ADMIN_KEY, API_KEY, ROOT, model_config, run_server, server_config
from test_dashboard import CHROMIUM, _browser_or_skip, logged_in_page

pytest_plugins = ["helpers_server"]

UPDATE_SCREENSHOT = os.environ.get("KVBOX_UPDATE_SCREENSHOT") == "1"
IDLE_CPU_BOUND = 0.01  # of one core; measured ~0.0025 (bench/dashboard_cpu.py)


# ---- the ring and its redaction ------------------------------------------------------------------------------------


def test_the_ring_redacts_keys_headers_and_configured_secrets():
    ring = LogRing()
    ring.remember_secrets(["plain-admin-secret"])
    for message in ["login with plain-admin-secret", "headers: {'authorization': 'Bearer abc.def-123'}",
                    "Authorization: Basic dXNlcjpwYXNz", "curl -H 'Bearer tok_9f8e7d'", "client key sk-live-0123456789",
                    "api_key=hunter22 admin-key: 's3cret' token=xyz password: pw"]:
        ring.add("info", "t", message)
    messages = [e["message"] for e in ring.read()["lines"]]
    assert messages == ["login with ***", "headers: {'authorization': 'Bearer ***'}", "Authorization: Basic ***",
                        "curl -H 'Bearer ***'", "client key sk-***",
                        "api_key=*** admin-key: '***' token=*** password: ***"]
    # A key learnt later (a reload) is redacted from lines stored before, too; ordinary text is left alone.
    ring.add("info", "t", "new-key-777 arrived; 12 tokens at 3.4 tok/s")
    ring.remember_secrets(["new-key-777"])
    assert ring.read(after=6)["lines"][0]["message"] == "*** arrived; 12 tokens at 3.4 tok/s"


def test_the_ring_is_bounded_and_read_after_a_seq_and_from_a_level():
    ring = LogRing(max_lines=5)
    for i, level in enumerate(["debug", "info", "warning", "error", "info", "warning", "critical"]):
        ring.add(level, "t", f"line {i}")
    everything = ring.read()
    assert [e["seq"] for e in everything["lines"]] == [3, 4, 5, 6, 7] and everything["last"] == 7
    assert [e["message"] for e in ring.read(min_level="warning")["lines"]] == ["line 2", "line 3", "line 5", "line 6"]
    assert [e["seq"] for e in ring.read(after=5)["lines"]] == [6, 7]
    assert ring.read(after=7) == {"lines": [], "last": 7}
    assert [e["seq"] for e in ring.read(limit=2)["lines"]] == [6, 7]
    long = LogRing()
    long.add("info", "t", "x" * 10_000)
    assert len(long.read()["lines"][0]["message"]) < 4100


def test_the_configs_secrets_are_found_by_the_schema():
    config = parse_config("server: {api_keys: [k-one, k-two], admin_keys: [k-admin]}\n"
                          "models: [{name: m, source: 'builtin:none'}]\n")
    import msgspec

    assert sorted(secret_values(msgspec.to_builtins(config), config.redacted())) == ["k-admin", "k-one", "k-two"]


def test_records_and_exceptions_reach_the_ring_through_a_handler():
    ring = LogRing()
    logger = logging.getLogger("kvbox.test.ring")
    handler = RingHandler(ring, source="srv")
    logger.addHandler(handler)
    try:
        logger.warning("about %s", "this")
        try:
            raise ValueError("boom")
        except ValueError:
            logger.exception("failed")
    finally:
        logger.removeHandler(handler)
    first, second = ring.read()["lines"]
    assert (first["level"], first["logger"], first["source"], first["message"]) == (
        "warning", "kvbox.test.ring", "srv", "about this")
    assert second["level"] == "error" and "ValueError: boom" in second["message"]


def test_an_engines_lines_cross_the_pipe_and_a_full_pipe_never_blocks():
    read_fd, write_fd = open_pipe()
    logger = logging.getLogger("kvbox.test.pipe")
    handler = PipeHandler(write_fd)
    logger.addHandler(handler)
    ring = LogRing()
    try:
        logger.warning("engine says %d", 42)
        logger.warning("é" * 5000)  # escapes make it longer than PIPE_BUF: cut, not torn
        # Nobody reads: the writer drops lines instead of waiting (a blocked engine would stop serving).
        done = threading.Event()
        threading.Thread(target=lambda: ([logger.warning("filler " * 50) for _ in range(2000)], done.set()),
                         daemon=True).start()
        assert done.wait(10), "a full pipe blocked the logging engine"
    finally:
        logger.removeHandler(handler)
        os.close(write_fd)
    asyncio.run(forward_engine_logs(read_fd, "m[0]", ring))
    lines = ring.read()["lines"]
    assert (lines[0]["message"], lines[0]["source"], lines[0]["logger"]) == ("engine says 42", "m[0]",
                                                                             "kvbox.test.pipe")
    assert lines[1]["message"].startswith("éé") and lines[1]["message"].endswith("[...]")
    assert len(lines[1]["message"].encode()) < select.PIPE_BUF
    assert 2 < len(lines) < 2002 and all(e["message"].startswith("filler") for e in lines[2:])


# ---- the route ----------------------------------------------------------------------------------------------------


def test_the_logs_route_needs_the_admin_key_or_the_session_and_checks_its_parameters():
    config = parse_config(f"server: {{api_keys: [{API_KEY}], admin_keys: [{ADMIN_KEY}]}}\n"
                          "models: [{name: m, source: 'builtin:none', device: cpu}]\n")
    with TestClient(create_app(config, Supervisor(config))) as client:
        logging.getLogger("kvbox.test.route").error("sent %s to the server", ADMIN_KEY)
        assert client.get("/admin/logs").status_code == 401
        assert client.get("/admin/logs", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 401
        admin = {"Authorization": f"Bearer {ADMIN_KEY}"}
        body = client.get("/admin/logs?level=error", headers=admin).json()
        assert "sent *** to the server" in [e["message"] for e in body["lines"]]
        assert ADMIN_KEY not in str(body) and all(e["level"] in ("error", "critical") for e in body["lines"])
        assert client.get(f"/admin/logs?after={body['last']}", headers=admin).json()["lines"] == []
        bad = client.get("/admin/logs?level=loud", headers=admin)
        assert bad.status_code == 400 and bad.json()["error"]["param"] == "level"
        assert client.get("/admin/logs?limit=0", headers=admin).json()["error"]["param"] == "limit"
        client.post("/ui/login", data={"key": ADMIN_KEY})
        assert client.get("/admin/logs").status_code == 200  # the dashboard's cookie


# ---- a real server: engine processes, the page ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def operator_server(tiny_model, tmp_path_factory):
    config = server_config([model_config("llama", tiny_model("llama"))])
    with run_server(config, tmp_path_factory.mktemp("operator_server")) as server:
        yield server


def test_engine_process_lines_reach_the_log_view(operator_server):
    with operator_server.http(ADMIN_KEY) as http:
        lines = http.get("/admin/logs").json()["lines"]
    engine = [e for e in lines if e["source"] == "llama[0]"]
    assert any("building the engine" in e["message"] for e in engine), lines
    assert any(e["message"].startswith("read ") and "tensors" in e["message"] for e in engine)
    assert any(e["source"] == "server" and e["logger"] == "kvbox.supervisor" for e in lines)


def test_log_view_and_playground_in_a_browser(operator_server, tmp_path):
    sync_playwright = _browser_or_skip()
    base = operator_server.base_url
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = logged_in_page(browser, base, viewport={"width": 1280, "height": 900}, color_scheme="light")
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.goto(f"{base}/ui")
            html = page.content()
            assert API_KEY not in html and ADMIN_KEY not in html  # the page is given no key

            # The log view: the start's lines, the engine's among them, then new lines as they come.
            page.wait_for_function("() => window.kvboxLogs.polls > 0")
            sources = page.locator("#logs .log-line .src").all_inner_texts()
            assert "llama[0]" in sources and "server" in sources
            with operator_server.http() as http:  # its access line names the request id: a key, redacted
                http.get("/v1/models", headers={"X-Request-Id": f"look-{API_KEY}"})
            page.wait_for_function("() => [...document.querySelectorAll('#logs .log-line')].some("
                                   "(l) => l.textContent.includes('look-*** GET /v1/models 200'))", timeout=10_000)
            assert API_KEY not in page.locator("#logs").inner_text()
            page.select_option("[data-logs-level]", "warning")
            page.wait_for_function("() => [...document.querySelectorAll('#logs .log-line')].every("
                                   "(l) => l.dataset.level !== 'info')")
            page.select_option("[data-logs-level]", "info")
            page.wait_for_function("() => document.querySelectorAll('#logs .log-line').length > 3")

            # The playground: a greedy answer streamed in chunks, the same as the API gives a client.
            page.fill("#playground input[name=api_key]", API_KEY)
            page.fill("#playground input[name=temperature]", "0")
            page.fill("#playground input[name=max_tokens]", "24")
            page.fill("#playground textarea[name=system]", "You are terse.")
            page.fill("#playground textarea[name=message]", "Say hello to the operator.")
            page.click("[data-pg-send]")
            page.wait_for_function("() => window.kvboxPlayground.finish !== null", timeout=30_000)
            answer = page.locator("#playground .pg-msg[data-role=assistant]").evaluate("(e) => e.firstChild.data")
            state = page.evaluate("window.kvboxPlayground")
            expected = operator_server.client().chat.completions.create(
                model="llama", temperature=0, max_tokens=24, messages=[
                    {"role": "system", "content": "You are terse."},
                    {"role": "user", "content": "Say hello to the operator."}])
            assert answer == expected.choices[0].message.content and answer
            assert state["chunks"] > 1 and state["finish"] == expected.choices[0].finish_reason
            assert [m["role"] for m in state["messages"]] == ["user", "assistant"]
            # A wrong key: OpenAI's error object, shown; the message goes back into the box.
            page.fill("#playground input[name=api_key]", "sk-wrong")
            page.fill("#playground textarea[name=message]", "Again?")
            page.click("[data-pg-send]")
            page.wait_for_function("() => !document.querySelector('[data-pg-error]').hidden")
            assert "Invalid or missing API key" in page.locator("[data-pg-error]").inner_text()
            assert page.input_value("#playground textarea[name=message]") == "Again?"
            page.fill("#playground input[name=api_key]", API_KEY)
            page.locator("#playground").screenshot(path=tmp_path / "playground.png")
            page.locator("#logs").screenshot(path=tmp_path / "logs.png")
            assert errors == [] or all("401" in e for e in errors), errors  # the wrong key's 401, logged by Chromium
        finally:
            browser.close()
    for name in ("playground.png", "logs.png"):
        assert (tmp_path / name).stat().st_size > 5_000
        if UPDATE_SCREENSHOT:
            shutil.copyfile(tmp_path / name, ROOT / "docs" / name)


def test_the_dashboards_polling_costs_an_idle_server_under_1_percent_of_a_core(operator_server):
    _browser_or_skip()
    from bench.dashboard_cpu import measure

    time.sleep(2)  # the previous test's requests are over
    result = measure(operator_server.base_url, operator_server.process.pid, ADMIN_KEY, seconds=15, baseline_s=8)
    print(f"dashboard at idle: {result}")
    assert result["page_mode"] == "live" and result["page_updates"] >= 12
    assert result["dashboard_cost"] < IDLE_CPU_BOUND, result
