/* The dashboard's fleet cards (ui/templates/fleet_card.html), one per model: its state and memory (weights on the
 * device, KV cache, the weights' host copy while asleep at level 1) polled from /admin/fleet once a second, and the
 * buttons that sleep (level 1 or 2), wake and restart the model or reload the config through the admin API, with
 * the session cookie and the dashboard's CSRF header. */
(function () {
  "use strict";
  const cards = [...document.querySelectorAll("[data-fleet]")];
  if (!cards.length) return;
  const fleetUrl = cards[0].dataset.fleetUrl;
  const csrf = cards[0].dataset.csrf;
  const POLL_MS = 1000;

  function bytes(n) {
    if (n >= 2 ** 30) return (n / 2 ** 30).toFixed(2) + " GiB";
    if (n >= 2 ** 20) return (n / 2 ** 20).toFixed(1) + " MiB";
    if (n >= 2 ** 10) return (n / 2 ** 10).toFixed(0) + " KiB";
    return n + " B";
  }

  function render(model) {
    const card = cards.find((c) => c.dataset.fleet === model.name);
    if (!card) return;
    const state = model.status + (model.sleep_level ? ` (level ${model.sleep_level})` : "");
    card.querySelector("[data-fleet-state]").textContent = state;
    card.dataset.state = state;
    for (const dd of card.querySelectorAll("[data-fleet-memory]")) {
      dd.textContent = bytes(model.memory[dd.dataset.fleetMemory]);
    }
    card.querySelector("[data-fleet-wake]").textContent = model.last_wake_s == null ? ""
      : `Last wake took ${model.last_wake_s.toFixed(2)} s · ${model.restarts} restarts`;
  }

  async function call(method, url) {
    const response = await fetch(url, { method, credentials: "same-origin", cache: "no-store",
      headers: { Accept: "application/json", [csrf]: "1" } });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) throw new Error((data && data.error && data.error.message) || `The server answered ${response.status}.`);
    return data;
  }

  async function refresh() {
    try {
      (await call("GET", fleetUrl)).models.forEach(render);
    } catch (e) { /* the dashboard's connection badge reports an unreachable server */ }
  }

  function say(card, text, error) {
    const box = card.querySelector("[data-fleet-message]");
    box.textContent = text;
    box.hidden = !text;
    box.toggleAttribute("data-error", Boolean(error));
  }

  async function act(card, url, done) {
    const buttons = [...card.querySelectorAll("button")];
    buttons.forEach((b) => { b.disabled = true; });
    say(card, "", false);
    try {
      say(card, done(await call("POST", url)), false);
    } catch (e) {
      say(card, e.message, true);
    } finally {
      buttons.forEach((b) => { b.disabled = false; });
      refresh();
    }
  }

  for (const card of cards) {
    const base = `${fleetUrl.replace(/\/fleet$/, "/models")}/${encodeURIComponent(card.dataset.fleet)}/`;
    card.querySelector(".fleet-actions").addEventListener("click", (event) => {
      const button = event.target.closest("button");
      if (!button) return;
      if (button.hasAttribute("data-fleet-reload")) {
        act(card, fleetUrl.replace(/\/fleet$/, "/reload"), (r) =>
          `Config reloaded: ${["added", "removed", "restarted"].map((k) => `${r[k].length} ${k}`).join(", ")}.`);
      } else {
        act(card, base + button.dataset.fleetAction, (r) => `${card.dataset.fleet} is ${r.status}.`);
      }
    });
  }
  refresh();
  setInterval(refresh, POLL_MS);
})();
