/* The speculative-decoding card (ui/templates/specdec_card.html): each snapshot's `spec_decoding` of a model
 * (acceptance rate, mean accepted length, counters, acceptance per draft position), as dashboard.js announces
 * snapshots with the "kvbox:snapshot" event. */
(function () {
  "use strict";
  const pct = (v) => (v === null || v === undefined ? "–" : (100 * v).toFixed(1) + "%");
  const int = (v) => v.toLocaleString("en-US");

  function render(card, sd) {
    const field = (name) => card.querySelector(`[data-sd="${name}"]`);
    field("acceptance-rate").textContent = pct(sd.acceptance_rate);
    field("acceptance-rate").dataset.value = sd.acceptance_rate ?? "";
    field("mean-length").textContent = sd.mean_accepted_length === null ? "–" : sd.mean_accepted_length.toFixed(2);
    field("tokens").textContent = `${int(sd.accepted_tokens)} / ${int(sd.draft_tokens)}`;
    field("drafts").textContent = int(sd.drafts);
    const list = field("positions");
    list.replaceChildren(...sd.per_position.map((rate, i) => {
      const item = document.createElement("li");
      const bar = document.createElement("span");
      bar.className = "specdec-bar";
      bar.style.width = `${(100 * (rate ?? 0)).toFixed(1)}%`;
      item.append(`#${i + 1} ${pct(rate)} `, bar);
      return item;
    }));
  }

  document.addEventListener("kvbox:snapshot", (event) => {
    for (const model of event.detail.models) {
      const card = document.querySelector(`[data-specdec="${CSS.escape(model.name)}"]`);
      if (card && model.spec_decoding) render(card, model.spec_decoding);
    }
  });
})();
