"""The dashboard's fleet card (ui/templates/fleet_card.html, ui/static/fleet.js) in a browser (headless chromium
driven by playwright, as in test_dashboard.py): each button pressed, the model's state and memory seen to change;
and the session's CSRF rule on the fleet routes."""

from __future__ import annotations

import time

import httpx
import pytest
from test_dashboard import CHROMIUM, _browser_or_skip, logged_in_page, session_cookie

from ui import session

pytest.register_assert_rewrite("helpers_server")
from helpers_server import model_config, run_server, server_config  # noqa: E402

pytest_plugins = ["helpers_server"]


@pytest.fixture(scope="module")
def fleet_server(tiny_model, tmp_path_factory):
    config = server_config([model_config("llama", tiny_model("llama"))])
    with run_server(config, tmp_path_factory.mktemp("dashboard_fleet")) as server:
        with server.http() as http:
            deadline = time.monotonic() + 120
            while http.get("/ready").status_code != 200:
                assert time.monotonic() < deadline, "the model did not load"
                time.sleep(0.2)
        yield server


def test_fleet_changes_through_the_cookie_need_the_dashboard_header(fleet_server):
    cookies = {session.COOKIE_NAME: session_cookie(fleet_server.base_url)}
    with httpx.Client(base_url=fleet_server.base_url, cookies=cookies, timeout=60) as http:
        assert http.get("/admin/fleet").json()["models"][0]["status"] == "ready"
        for path in ("/admin/models/llama/sleep", "/admin/models/llama/restart", "/admin/reload"):
            assert http.post(path).status_code == 403, path
    with httpx.Client(base_url=fleet_server.base_url, timeout=60) as http:
        assert http.get("/admin/fleet").status_code == 401
        assert http.post("/admin/models/llama/wake", headers={"X-Kvbox-Dashboard": "1"}).status_code == 401
    assert fleet_server.admin_models()["llama"]["status"] == "ready"


def test_sleep_wake_restart_and_reload_from_the_dashboard(fleet_server):
    sync_playwright = _browser_or_skip()
    server = fleet_server
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"])
        try:
            page = logged_in_page(browser, server.base_url, viewport={"width": 1440, "height": 1000})
            problems = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.goto(f"{server.base_url}/ui")
            card = page.locator('[data-fleet="llama"]')
            kv = card.locator('[data-fleet-memory="kv_cache_bytes"]')
            weights = card.locator('[data-fleet-memory="weight_bytes"]')

            def state_becomes(text: str) -> None:
                page.wait_for_function(
                    "t => document.querySelector('[data-fleet=\"llama\"]').dataset.state === t", arg=text,
                    timeout=60_000)

            state_becomes("ready")
            awake_kv, awake_weights = kv.inner_text(), weights.inner_text()
            assert awake_kv.endswith("B") and awake_kv != "0 B" and awake_weights != "0 B"

            card.get_by_role("button", name="Sleep (level 1)").click()
            state_becomes("sleeping (level 1)")
            page.wait_for_function("() => document.querySelector('[data-fleet=\"llama\"] "
                                   "[data-fleet-memory=\"kv_cache_bytes\"]').textContent === '0 B'")
            assert weights.inner_text() == awake_weights  # a CPU engine keeps its weights in host memory
            assert server.admin_models()["llama"]["sleep_level"] == 1

            card.get_by_role("button", name="Wake").click()
            state_becomes("ready")
            page.wait_for_function("t => document.querySelector('[data-fleet=\"llama\"] "
                                   "[data-fleet-memory=\"kv_cache_bytes\"]').textContent === t", arg=awake_kv)

            card.get_by_role("button", name="Sleep (level 2)").click()
            state_becomes("sleeping (level 2)")
            page.wait_for_function("() => document.querySelector('[data-fleet=\"llama\"] "
                                   "[data-fleet-memory=\"weight_bytes\"]').textContent === '0 B'")
            card.get_by_role("button", name="Wake").click()
            state_becomes("ready")

            restarts = server.admin_models()["llama"]["restarts"]
            card.get_by_role("button", name="Restart").click()
            page.wait_for_function("() => document.querySelector('[data-fleet=\"llama\"] [data-fleet-message]')"
                                   ".textContent === 'llama is ready.'", timeout=60_000)
            assert server.admin_models()["llama"]["restarts"] == restarts + 1

            card.get_by_role("button", name="Reload config").click()
            message = card.locator("[data-fleet-message]")
            page.wait_for_function("() => document.querySelector('[data-fleet=\"llama\"] [data-fleet-message]')"
                                   ".textContent.startsWith('Config reloaded')")
            assert message.inner_text() == "Config reloaded: 0 added, 0 removed, 0 restarted."
            assert problems == []
        finally:
            browser.close()
