"""The dashboard's embedding figures: an embed model's pooled inputs and their tokens counted exactly in
`GET /admin/stats` (`appliance.stats_pooling`), a generation model's figures untouched by them, and in a browser
(headless Debian chromium driven by playwright, as in test_dashboard.py) the embedder's panel shows inputs/s and
tokens/s in place of generation figures, and they move under embedding traffic."""

from __future__ import annotations

import threading
import time

import pytest
from test_dashboard import CHROMIUM, _browser_or_skip, logged_in_page, wait_for_update

pytest.register_assert_rewrite("helpers_server")
from helpers_server import ADMIN_KEY, model_config, run_inprocess, server_config

TEXTS = ["hello world", "the fibonacci sequence in python", "a"]


@pytest.fixture(scope="module")
def server(tiny_model):
    config = server_config([model_config("embedder", tiny_model("bert", pooling="mean"), task="embed"),
                            model_config("llama", tiny_model("llama"))])
    with run_inprocess(config) as running:
        yield running


def stats(server) -> dict[str, dict]:
    with server.http(ADMIN_KEY) as admin:
        return {m["name"]: m for m in admin.get("/admin/stats").json()["models"]}


def test_stats_count_pooled_inputs_and_tokens(server):
    before = stats(server)
    assert before["embedder"]["task"] == "embed" and before["llama"]["task"] == "generate"
    client = server.client()
    usage = [client.embeddings.create(model="embedder", input=TEXTS).usage.prompt_tokens for _ in range(3)]
    client.completions.create(model="llama", prompt="hi", max_tokens=3)
    after = stats(server)
    pooling = after["embedder"]["pooling"]
    assert pooling["total_inputs"] - before["embedder"]["pooling"]["total_inputs"] == 3 * len(TEXTS)
    assert pooling["total_tokens"] - before["embedder"]["pooling"]["total_tokens"] == sum(usage)
    assert pooling["inputs_per_s"] > 0 and pooling["tokens_per_s"] > pooling["inputs_per_s"]
    assert after["embedder"]["totals"]["generation_tokens"] == 0
    # a generation model has no pooling figures, and its generation figures are as before
    assert after["llama"]["pooling"] is None and after["llama"]["totals"]["generation_tokens"] >= 3


class EmbeddingLoad:
    """A thread embedding batches until stopped."""

    def __init__(self, server):
        self.client, self.stop, self.errors = server.client(), threading.Event(), []
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self.stop.is_set():
            try:
                self.client.embeddings.create(model="embedder", input=TEXTS * 4)
            except Exception as e:  # noqa: BLE001 - reported by the test
                self.errors.append(repr(e))

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join(30)


def _figures(page) -> dict[str, float]:
    return page.evaluate("""() => Object.fromEntries([...document.querySelectorAll(
        'section.model[data-model="embedder"] [data-embed]')]
        .map(el => [el.dataset.embed, Number(el.dataset.value)]))""")


def test_embedding_panel_in_a_browser(server):
    sync_playwright = _browser_or_skip()
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = logged_in_page(browser, server.base_url, viewport={"width": 1280, "height": 900})
            errors = []
            page.on("pageerror", lambda error: errors.append(str(error)))
            page.on("console", lambda message: message.type == "error" and errors.append(message.text))
            page.goto(f"{server.base_url}/ui")
            page.click('[data-tab="embedder"]')
            embedder = page.locator('section.model[data-model="embedder"]')
            # the embedder's panel replaces the generation figures; the generation model keeps its own
            assert embedder.locator("[data-f=gen-tps], svg[data-chart=generation]").count() == 0
            assert embedder.locator("svg[data-embed-chart]").count() == 2
            assert "inputs/s" in page.locator('#overview tr[data-model="embedder"]').inner_text()
            llama = page.locator('section.model[data-model="llama"]')
            assert llama.locator("[data-embed]").count() == 0 and llama.locator("[data-f=gen-tps]").count() == 1

            wait_for_update(page)
            start = _figures(page)
            with EmbeddingLoad(server) as load:
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    wait_for_update(page)
                    now = _figures(page)
                    if now["inputs-per-s"] > 0 and now["tokens-per-s"] > 0 and now["total-inputs"] > start[
                            "total-inputs"]:
                        break
                else:
                    raise AssertionError(f"the panel never moved: {start} -> {now}, {load.errors}")
                assert not load.errors
                wait_for_update(page)
                drawn = embedder.locator('svg[data-embed-chart="inputs"] path.line').count()
            # the page shows the snapshot it rendered
            shown, pooling = _figures(page), page.evaluate(
                "window.kvbox.last.models.find(m => m.name === 'embedder').pooling")
            assert shown["total-inputs"] == pooling["total_inputs"] and shown["total-tokens"] == pooling["total_tokens"]
            assert shown["inputs-per-s"] == pytest.approx(pooling["inputs_per_s"])
            assert drawn == 1
            assert page.locator('#overview tr[data-model="embedder"] [data-embed="inputs-per-s"]').inner_text() != "—"
            assert not errors, errors
        finally:
            browser.close()
