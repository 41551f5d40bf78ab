"""The dashboard's LoRA card: loading and unloading adapters through the admin API with the session cookie, in a
browser (headless Debian chromium driven by playwright, as in test_dashboard.py), and the CSRF rule for the cookie: a
cookie-authenticated change without `X-Kvbox-Dashboard: 1` is refused, a Bearer admin key needs no header."""

from __future__ import annotations

import time

import httpx
import pytest
from test_dashboard import CHROMIUM, _browser_or_skip, logged_in_page, session_cookie
from test_lora import ADAPTERS, make_adapter

from ui import session

pytest.register_assert_rewrite("helpers_server")
from helpers_server import ADMIN_KEY, API_KEY, model_config, run_server, server_config

pytest_plugins = ["helpers_server"]


@pytest.fixture(scope="module")
def lora_server(tiny_model, tmp_path_factory):
    """(server, adapter path inside allowed_dirs, adapter path outside them)."""
    base_dir = tiny_model("llama", max_position_embeddings=128)
    root = tmp_path_factory.mktemp("dashboard_lora")
    allowed, outside = root / "allowed", root / "outside"
    good = make_adapter(base_dir, allowed / "dash-attn", seed=0, **ADAPTERS["attn"])
    bad = make_adapter(base_dir, outside / "stray", seed=1, **ADAPTERS["attn"])
    config = server_config([model_config("llama", base_dir, lora={"enabled": True, "allowed_dirs": [str(allowed)]})])
    with run_server(config, root) as server:
        with server.http() as http:
            deadline = time.monotonic() + 120
            while http.get("/ready").status_code != 200:
                assert time.monotonic() < deadline, "the model did not load"
                time.sleep(0.2)
        yield server, good, bad


def served(server) -> list[str]:
    with server.http(ADMIN_KEY) as admin:
        response = admin.get("/admin/models/llama/loras")
        assert response.status_code == 200, response.text
        return [a["name"] for a in response.json()["loras"]]


def listed_models(server) -> set[str]:
    with server.http() as http:
        return {m["id"] for m in http.get("/v1/models").json()["data"]}


def test_cookie_changes_need_the_dashboard_header(lora_server):
    server, good, _ = lora_server
    cookies = {session.COOKIE_NAME: session_cookie(server.base_url)}
    with httpx.Client(base_url=server.base_url, cookies=cookies, timeout=60) as http:
        # Reading needs no header; changing does, with the cookie alone (what a cross-site form would bring).
        assert http.get("/admin/models/llama/loras").status_code == 200
        refused = http.post("/admin/models/llama/loras", json={"name": "csrf", "path": good})
        assert refused.status_code == 403, refused.text
        assert "X-Kvbox-Dashboard" in refused.json()["error"]["message"]
        assert http.delete("/admin/models/llama/loras/csrf").status_code == 403
        assert http.post("/admin/models/llama/loras", json={"name": "csrf", "path": good},
                         headers={"X-Kvbox-Dashboard": "0"}).status_code == 403
        assert "csrf" not in served(server)
    with httpx.Client(base_url=server.base_url, timeout=60) as http:  # no cookie, no key: still a 401
        assert http.post("/admin/models/llama/loras", json={"name": "csrf", "path": good},
                         headers={"X-Kvbox-Dashboard": "1"}).status_code == 401
    with server.http(API_KEY) as http:  # an API key is not an admin key
        assert http.get("/admin/models/llama/loras").status_code == 401
    with server.http(ADMIN_KEY) as admin:  # Bearer admin keys work as before, no header needed
        loaded = admin.post("/admin/models/llama/loras", json={"name": "bearer", "path": good})
        assert loaded.status_code == 200, loaded.text
        assert [a["name"] for a in loaded.json()["loras"]] == ["bearer"]
        assert admin.delete("/admin/models/llama/loras/bearer").json()["loras"] == []


def test_load_and_unload_adapters_from_the_dashboard(lora_server):
    sync_playwright = _browser_or_skip()
    server, good, bad = lora_server
    assert served(server) == []
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM,
                                             args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = logged_in_page(browser, server.base_url, viewport={"width": 1440, "height": 1000})
            problems = []
            page.on("pageerror", lambda error: problems.append(str(error)))
            page.on("console", lambda msg: problems.append(msg.text) if msg.type == "error" else None)
            page.goto(f"{server.base_url}/ui")

            card = page.locator('[data-lora="llama"]')
            card.wait_for()
            items = card.locator("[data-lora-list] li")
            error = card.locator("[data-lora-error]")
            assert card.locator("[data-lora-empty]").is_visible() and items.count() == 0
            page.wait_for_function("window.kvbox.updates > 0")

            # Load through the form: the list shows it without a page reload, and the API serves it.
            updates = page.evaluate("window.kvbox.updates")
            page.evaluate("window.kvbox.marker = 'same page'")
            card.locator("input[name=name]").fill("dash-attn")
            card.locator("input[name=path]").fill(good)
            card.locator("button[type=submit]").click()
            items.filter(has_text="dash-attn").wait_for()
            assert items.count() == 1 and good in items.first.inner_text()
            assert not error.is_visible() and not card.locator("[data-lora-empty]").is_visible()
            assert card.locator("input[name=name]").input_value() == ""  # the form is cleared after a load
            assert page.evaluate("window.kvbox.marker") == "same page"
            assert served(server) == ["dash-attn"] and "dash-attn" in listed_models(server)

            # A path outside lora.allowed_dirs: the server's 400 message on the page, and nothing changes.
            card.locator("input[name=name]").fill("stray")
            card.locator("input[name=path]").fill(bad)
            card.locator("button[type=submit]").click()
            error.wait_for(state="visible")
            with server.http(ADMIN_KEY) as admin:
                expected = admin.post("/admin/models/llama/loras", json={"name": "stray", "path": bad})
            assert expected.status_code == 400
            assert error.inner_text() == expected.json()["error"]["message"]
            assert "allowed_dirs" in error.inner_text()
            assert [li.get_attribute("data-adapter") for li in items.all()] == ["dash-attn"]
            assert served(server) == ["dash-attn"] and "stray" not in listed_models(server)

            # Unload with the adapter's button: gone from the page and from the API; the error is cleared.
            items.filter(has_text="dash-attn").locator("button[data-unload]").click()
            items.first.wait_for(state="detached")
            assert card.locator("[data-lora-empty]").is_visible() and not error.is_visible()
            assert served(server) == [] and "dash-attn" not in listed_models(server)
            assert page.evaluate("window.kvbox.marker") == "same page"
            assert page.evaluate("window.kvbox.updates") >= updates  # the live stats kept going

            # Changed elsewhere (the admin API): the page follows within seconds, usage included, no reload.
            with server.http(ADMIN_KEY) as admin:
                assert admin.post("/v1/load_lora_adapter",
                                  json={"lora_name": "api-attn", "lora_path": good}).status_code == 200
            items.filter(has_text="api-attn").wait_for(timeout=15_000)
            assert "0 requests" in items.first.inner_text()
            with server.http() as http:
                assert http.post("/v1/completions", json={"model": "api-attn", "prompt": "hello",
                                                          "max_tokens": 2}).status_code == 200
            items.filter(has_text="1 requests").wait_for(timeout=15_000)  # the page's CSP forbids evaluated strings
            assert "GPU slot" in items.first.inner_text()
            with server.http(ADMIN_KEY) as admin:
                assert admin.post("/v1/unload_lora_adapter", json={"lora_name": "api-attn"}).status_code == 200
            items.first.wait_for(state="detached", timeout=15_000)
            assert card.locator("[data-lora-empty]").is_visible()
            assert page.evaluate("window.kvbox.marker") == "same page"
            # Console errors include Content-Security-Policy violations; Chromium also logs the expected 400.
            expected_400 = "the server responded with a status of 400"
            assert [p for p in problems if expected_400 not in p] == [], problems
        finally:
            browser.close()
