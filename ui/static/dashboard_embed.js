/* kvbox dashboard: the embedding panel of embed and score models (templates/dashboard_embed.html), in place of their
 * generation figures: pooled inputs and tokens per second, totals and charts, from each snapshot's `pooling`.
 * dashboard.js hands every snapshot over as a `kvbox:snapshot` event and lends its formatting and chart drawing
 * (window.kvbox). */
(function () {
  "use strict";

  const kvbox = window.kvbox;

  function setText(el, text, raw) {
    if (el.textContent !== text) el.textContent = text;
    const value = raw == null ? "" : String(raw);
    if (el.dataset.value !== value) el.dataset.value = value;
  }

  function render(snapshot) {
    for (const m of snapshot.models) {
      if (m.task === "generate" || !m.pooling) continue;
      const p = m.pooling;
      const figures = { "inputs-per-s": [kvbox.fmtRate(p.inputs_per_s), p.inputs_per_s],
        "tokens-per-s": [kvbox.fmtRate(p.tokens_per_s), p.tokens_per_s],
        "total-inputs": [kvbox.fmtInt(p.total_inputs), p.total_inputs],
        "total-tokens": [kvbox.fmtInt(p.total_tokens), p.total_tokens] };
      for (const root of document.querySelectorAll("[data-model]")) {
        if (root.dataset.model !== m.name) continue;
        for (const el of root.querySelectorAll("[data-embed]")) setText(el, ...figures[el.dataset.embed]);
        if (!p.series || root.hidden || m.name !== kvbox.selected) continue;
        for (const svg of root.querySelectorAll("svg[data-embed-chart]")) {
          const values = svg.dataset.embedChart === "inputs" ? p.series.inputs_per_s : p.series.tokens_per_s;
          const cls = svg.dataset.embedChart === "inputs" ? "s-generation" : "s-prompt";
          kvbox.chart(svg, [{ values, cls, area: true }], { format: kvbox.fmtAxis });
        }
      }
    }
  }

  if (kvbox.last) render(kvbox.last);
  document.addEventListener("kvbox:snapshot", (event) => render(event.detail));
})();
