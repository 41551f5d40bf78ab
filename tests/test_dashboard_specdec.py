"""The dashboard's speculative-decoding card: the snapshot's `spec_decoding` (summed over replicas, None without
`speculative:`), and in a browser (headless Debian chromium driven by playwright, as in test_dashboard.py) the card
of an n-gram speculative model going from empty to its live acceptance figures under traffic."""

from __future__ import annotations

import pytest
from test_dashboard import CHROMIUM, _browser_or_skip, logged_in_page, wait_for_update

from appliance.stats_specdec import spec_decoding_snapshot
from engine.contract import SchedulerStats, SpecDecodingStats

pytest.register_assert_rewrite("helpers_server")
from helpers_server import model_config, run_inprocess, server_config

pytest_plugins = ["helpers_server"]

SPECULATIVE = {"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "prompt_lookup_max": 3}


def _stats(spec: SpecDecodingStats | None) -> SchedulerStats:
    return SchedulerStats(0, 0, 0, 0.0, 8, 8, 0, 0, 0, 0, 0, 0, spec_decoding=spec)


def test_the_snapshot_sums_replicas_counters():
    replicas = [_stats(SpecDecodingStats(4, 12, 6, [3, 2, 1])), _stats(SpecDecodingStats(2, 6, 0, [0, 0, 0])),
                _stats(None)]
    assert spec_decoding_snapshot(True, replicas) == {
        "drafts": 6, "draft_tokens": 18, "accepted_tokens": 6, "acceptance_rate": 6 / 18,
        "mean_accepted_length": 2.0, "per_position": [0.5, 2 / 6, 1 / 6]}
    empty = spec_decoding_snapshot(True, [])
    assert empty["acceptance_rate"] is None and empty["mean_accepted_length"] is None and empty["per_position"] == []
    assert spec_decoding_snapshot(False, replicas) is None


_READ_CARD = """() => {
    const card = document.querySelector('[data-specdec="spec"]');
    const text = (name) => card.querySelector(`[data-sd="${name}"]`).textContent;
    const model = window.kvbox.last.models.find((m) => m.name === "spec");
    return {rate: text("acceptance-rate"), length: text("mean-length"), tokens: text("tokens"),
            positions: [...card.querySelectorAll('[data-sd="positions"] li')].map((li) => li.textContent.trim()),
            sd: model.spec_decoding};
}"""


def test_the_card_updates_under_ngram_speculative_traffic(tiny_model):
    sync_playwright = _browser_or_skip()
    model = model_config("spec", tiny_model("llama", max_position_embeddings=256), speculative=SPECULATIVE)
    with run_inprocess(server_config([model])) as server, sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-dev-shm-usage"])
        try:
            page = logged_in_page(browser, server.base_url)
            page_errors = []
            page.on("pageerror", lambda error: page_errors.append(str(error)))
            page.goto(f"{server.base_url}/ui")
            wait_for_update(page)
            idle = page.evaluate(_READ_CARD)
            assert (idle["rate"], idle["length"], idle["tokens"]) == ("–", "–", "0 / 0")
            assert all(p.endswith("–") for p in idle["positions"])  # no draft verified yet

            client = server.client()
            for _ in range(3):  # a repeating prompt: the n-gram proposer finds drafts at once
                client.completions.create(model="spec", prompt=[5, 6, 7, 8] * 8, max_tokens=24, temperature=0)
            page.wait_for_function("""() => window.kvbox.last.models[0].spec_decoding.draft_tokens > 0
                && document.querySelector('[data-specdec="spec"] [data-sd="acceptance-rate"]').dataset.value
                   !== "" """, timeout=15000)
            card = page.evaluate(_READ_CARD)
            sd = card["sd"]
            assert sd["draft_tokens"] > 0 and sd["drafts"] > 0
            assert card["rate"] == f"{100 * sd['accepted_tokens'] / sd['draft_tokens']:.1f}%"
            assert card["length"] == f"{1 + sd['accepted_tokens'] / sd['drafts']:.2f}"
            assert card["tokens"] == f"{sd['accepted_tokens']:,} / {sd['draft_tokens']:,}"
            assert [p.split()[0] for p in card["positions"]] == ["#1", "#2", "#3"]
            assert not page_errors
        finally:
            browser.close()
