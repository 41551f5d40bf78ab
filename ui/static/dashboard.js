/* kvbox dashboard: keeps the server-rendered page live from the stats endpoint's snapshots.
 *
 * Data: server-sent events from /admin/stats/stream (one snapshot a second); where EventSource is missing or the
 * stream never delivers, the page polls /admin/stats every second instead. The session cookie authenticates both.
 * Drawing: numbers go into elements marked data-f="NAME" (text via textContent only, never parsed as markup; the
 * raw value also in data-value), charts are SVG paths, the block pool a canvas. Charts and the block map are drawn
 * for the selected model only.
 */
(function () {
  "use strict";

  const SVG_NS = "http://www.w3.org/2000/svg";
  const POLL_INTERVAL_MS = 1000;
  const STALE_AFTER_MS = 5000;
  const boot = JSON.parse(document.getElementById("kvbox-boot").textContent);
  const panels = new Map(); // model name -> { section, row, tab, fields: Map(name -> [elements]) }
  // Exposed for tests and for curious operators: the last snapshot and how the page gets its data.
  const state = { last: null, updates: 0, mode: "connecting", selected: null, lastUpdate: 0,
    range: boot.snapshot.window_s, requestView: "inflight", source: null };
  window.kvbox = state;

  // ---- formatting ----
  const integer = new Intl.NumberFormat("en-US", { maximumFractionDigits: 0 });
  const fmtInt = (v) => (v == null ? "—" : integer.format(v));
  const fmtRate = (v) => (v == null ? "—" : v >= 100 ? integer.format(v) : v.toFixed(1));
  const fmtPct = (v) => (v == null ? "—" : (100 * v).toFixed(1) + "%");
  const fmtSeconds = (s) => {
    if (s == null) return "—";
    const ms = s * 1000;
    return ms >= 1000 ? s.toFixed(2) + " s" : ms >= 10 ? Math.round(ms) + " ms" : ms.toFixed(1) + " ms";
  };
  const fmtDuration = (seconds) => {
    const s = Math.max(0, Math.floor(seconds));
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    if (d) return `${d}d ${h}h`;
    if (h) return `${h}h ${m}m`;
    if (m) return `${m}m ${s % 60}s`;
    return `${s % 60}s`;
  };
  const fmtClock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });
  const fmtDate = (t) => new Date(t * 1000).toLocaleString([], { hour12: false });
  const fmtBytes = (v) => {
    if (v == null) return "—";
    const units = ["B", "KiB", "MiB", "GiB", "TiB"];
    let i = 0;
    while (v >= 1024 && i < units.length - 1) { v /= 1024; i += 1; }
    return (v >= 100 || i === 0 ? Math.round(v) : v.toFixed(1)) + " " + units[i];
  };
  const level = (usage) => (usage >= 0.9 ? "crit" : usage >= 0.7 ? "warn" : "ok");

  // ---- the page's parts ----
  function collectFields(roots) {
    const fields = new Map();
    for (const root of roots) {
      if (!root) continue;
      for (const el of root.querySelectorAll("[data-f]")) {
        const name = el.dataset.f;
        if (!fields.has(name)) fields.set(name, []);
        fields.get(name).push(el);
      }
    }
    return fields;
  }

  for (const section of document.querySelectorAll("section.model")) {
    const name = section.dataset.model;
    const row = [...document.querySelectorAll("#overview tbody tr")].find((r) => r.dataset.model === name);
    const tab = [...document.querySelectorAll(".tabs [data-tab]")].find((t) => t.dataset.tab === name);
    panels.set(name, { section, row, tab, fields: collectFields([section, row]), errorsKey: null, maps: [] });
    if (row) {
      row.addEventListener("click", () => select(name, true));
      row.addEventListener("keydown", (e) => { if (e.key === "Enter" || e.key === " ") { e.preventDefault(); select(name, true); } });
    }
    if (tab) tab.addEventListener("click", () => select(name, false));
  }

  function set(panel, name, text, raw) {
    const elements = panel.fields.get(name);
    if (!elements) return;
    const value = raw === undefined ? "" : raw === null ? "" : String(raw);
    for (const el of elements) {
      if (el.textContent !== text) el.textContent = text;
      if (raw !== undefined && el.dataset.value !== value) el.dataset.value = value;
    }
  }

  function each(panel, name, fn) {
    for (const el of panel.fields.get(name) || []) fn(el);
  }

  function select(name, scroll) {
    if (!panels.has(name)) return;
    state.selected = name;
    for (const [other, p] of panels) {
      const on = other === name;
      p.section.hidden = !on;
      if (p.row) p.row.classList.toggle("selected", on);
      if (p.tab) p.tab.setAttribute("aria-selected", on ? "true" : "false");
    }
    history.replaceState(null, "", "#" + encodeURIComponent(name));
    const charted = state.last && state.last.models.find((m) => m.name === name);
    if (charted && !charted.series) restartStream();  // the next snapshot brings its series
    drawSelected();
    if (scroll) panels.get(name).section.scrollIntoView({ behavior: "smooth", block: "start" });
  }

  // ---- applying a snapshot ----
  function apply(snapshot) {
    const names = snapshot.models.map((m) => m.name);
    if (names.length !== panels.size || names.some((n) => !panels.has(n))) {
      // Models were added or removed (a reload of the config): the page's sections come from the server.
      if (!state.reloading) { state.reloading = true; setTimeout(() => location.reload(), 500); }
    }
    state.last = snapshot;
    state.updates += 1;
    state.lastUpdate = Date.now();
    document.getElementById("updated").textContent = "updated " + fmtClock(snapshot.time);
    document.getElementById("server-state").hidden = !snapshot.draining;
    for (const model of snapshot.models) {
      const panel = panels.get(model.name);
      if (panel) renderModel(panel, model, snapshot);
    }
    document.dispatchEvent(new CustomEvent("kvbox:snapshot", { detail: snapshot }));  // cards in files of their own
    renderHost(snapshot.host);
    renderRequests(snapshot.requests);
    drawSelected();
    refreshConnection();
    document.dispatchEvent(new CustomEvent("kvbox:snapshot", { detail: snapshot }));  // panels in other files
  }

  function renderModel(p, m, snapshot) {
    const kv = m.kv, requests = m.requests, rates = m.throughput, par = m.parallelism;
    set(p, "status", m.status, m.status);
    each(p, "status", (el) => { el.dataset.state = m.status; });
    if (p.tab) p.tab.querySelector(".state-dot").dataset.state = m.status;
    set(p, "device", m.device, m.device);
    set(p, "dtype", m.dtype, m.dtype);
    set(p, "quantization", m.quantization, m.quantization);
    let parallelism = `TP ${par.tensor} · PP ${par.pipeline} · DP ${par.data}`;
    if (par.expert > 1) parallelism += ` · EP ${par.expert}`;
    set(p, "parallelism", parallelism);
    set(p, "uptime", fmtDuration(m.uptime_s), m.uptime_s);
    set(p, "restarts", fmtInt(m.restarts), m.restarts);
    set(p, "facts", [m.device, m.dtype, m.kernel_backend + " kernels",
      m.max_model_len ? fmtInt(m.max_model_len) + " tokens of context" : null,
      "quantization " + m.quantization, "KV cache " + m.kv_cache_dtype, parallelism, "up " + fmtDuration(m.uptime_s)].filter(Boolean).join(" · "));

    set(p, "running", fmtInt(requests.running), requests.running);
    set(p, "waiting", fmtInt(requests.waiting), requests.waiting);
    set(p, "preempted", fmtInt(requests.preempted), requests.preempted);
    set(p, "preemptions", fmtInt(requests.preemptions), requests.preemptions);
    set(p, "finished", fmtInt(m.totals.finished_requests), m.totals.finished_requests);

    set(p, "kv-usage", fmtPct(kv.usage), kv.usage);
    set(p, "kv-used", fmtInt(kv.num_used_blocks), kv.num_used_blocks);
    set(p, "kv-blocks", fmtInt(kv.num_blocks), kv.num_blocks);
    set(p, "block-size", fmtInt(m.block_size), m.block_size);
    each(p, "kv-bar", (el) => { el.style.width = (100 * kv.usage).toFixed(1) + "%"; el.className = level(kv.usage); });
    each(p, "kv-arc", (el) => {
      el.setAttribute("stroke-dasharray", `${(100 * kv.usage).toFixed(2)} 100`);
      el.setAttribute("class", "gauge-value " + level(kv.usage) + (kv.usage > 0 ? "" : " zero"));
    });
    set(p, "legend-used", fmtInt(kv.num_used_blocks), kv.num_used_blocks);
    set(p, "legend-cached", fmtInt(kv.num_cached_free_blocks), kv.num_cached_free_blocks);
    const empty = kv.num_free_blocks - kv.num_cached_free_blocks;
    set(p, "legend-free", fmtInt(empty), empty);
    const exact = kv.maps.length > 0 && kv.maps.every((map) => map.exact);
    const perCell = Math.max(1, ...kv.maps.map((map) => map.blocks_per_cell));
    set(p, "map-note", (exact ? "by block id" : "by state") + (perCell > 1 ? ` · ${perCell} blocks a cell` : ""));

    set(p, "rate-window", String(snapshot.rate_window_s));
    set(p, "latency-window", String(snapshot.latency_window_s));
    set(p, "prompt-tps", fmtRate(rates.prompt_tokens_per_s), rates.prompt_tokens_per_s);
    set(p, "gen-tps", fmtRate(rates.generation_tokens_per_s), rates.generation_tokens_per_s);
    set(p, "steps", fmtRate(rates.steps_per_s), rates.steps_per_s);
    set(p, "total-prompt", fmtInt(m.totals.prompt_tokens), m.totals.prompt_tokens);
    set(p, "total-gen", fmtInt(m.totals.generation_tokens), m.totals.generation_tokens);
    set(p, "batch", m.batch.mean.toFixed(1), m.batch.mean);
    set(p, "hit-rate", fmtPct(m.prefix_cache.hit_rate), m.prefix_cache.hit_rate);
    set(p, "hit-rate-lifetime", fmtPct(m.prefix_cache.lifetime_hit_rate), m.prefix_cache.lifetime_hit_rate);
    for (const kind of ["ttft", "itl", "e2e", "queue", "prefill", "decode"]) {
      const lat = m.latency[kind];
      for (const q of ["p50", "p90", "p99"]) set(p, `${kind}-${q}`, fmtSeconds(lat[q]), lat[q]);
      set(p, `${kind}-count`, fmtInt(lat.count), lat.count);
    }
    for (const [reason, count] of Object.entries(m.finish_reasons)) set(p, `finish-${reason}`, fmtInt(count), count);
    set(p, "length-window", fmtDuration(snapshot.latency_window_s));
    const processes = m.replicas.filter((r) => r.alive && r.rss != null);
    const rss = processes.length ? processes.reduce((a, r) => a + r.rss, 0) : null;
    const cpu = processes.length ? processes.reduce((a, r) => a + r.cpu, 0) : null;
    const device = m.replicas.reduce((a, r) => a + (r.device_memory || 0), 0);
    set(p, "rss", fmtBytes(rss), rss);
    set(p, "engine-cpu", cpu == null ? "—" : cpu.toFixed(1), cpu);
    set(p, "device-memory", device ? fmtBytes(device) : "—", device || null);
    renderErrors(p, m.errors);
    if (m.lora && m.lora.enabled) {
      const card = document.querySelector(`[data-lora="${CSS.escape(m.name)}"]`);
      if (card) refreshAdapters(card, m.lora.adapters);
    }
  }

  // ---- the host (every model's) ----
  function setHost(name, text) {
    for (const el of document.querySelectorAll(`[data-h="${name}"]`)) if (el.textContent !== text) el.textContent = text;
  }

  function renderHost(host) {
    const s = host.series, lastOf = (values) => { for (let i = values.length - 1; i >= 0; i--) if (values[i] != null) return values[i]; return null; };
    const cpu = lastOf(s.cpu), ram = lastOf(s.ram_used);
    setHost("cpu", cpu == null ? "—" : fmtPct(cpu));
    setHost("num-cpus", String(host.num_cpus));
    setHost("ram", fmtBytes(ram));
    setHost("ram-total", fmtBytes(host.ram_total));
    for (const c of ["2xx", "4xx", "429", "5xx", "503"]) setHost(`http-${c}`, fmtInt(host.http[c]));
    const svg = (kind) => document.querySelector(`svg[data-chart="${kind}"]`);
    chart(svg("host-cpu"), [{ values: s.cpu, cls: "s-generation", area: true }], { max: 1, format: (v) => Math.round(100 * v) + "%" });
    chart(svg("host-ram"), [{ values: s.ram_used, cls: "s-kv", area: true }, { values: s.server_rss, cls: "s-info" }],
      { max: host.ram_total, format: fmtBytesAxis });
    chart(svg("host-http"), [{ values: s.http_4xx, cls: "s-waiting" }, { values: s.http_429, cls: "s-info" },
      { values: s.http_5xx, cls: "s-crit" }, { values: s.http_503, cls: "s-cached" }], { format: fmtAxis });
  }

  // ---- the request table (every model's) ----
  const REQUEST_COLUMNS = [
    (r) => r.id, (r) => r.model + (r.adapter ? " · " + r.adapter : ""), (r) => r.state,
    (r) => (r.status == null ? "—" : String(r.status)), (r) => fmtInt(r.prompt_tokens), (r) => fmtInt(r.output_tokens),
    (r) => fmtSeconds(r.queue_s), (r) => fmtSeconds(r.ttft_s), (r) => fmtSeconds(r.e2e_s),
    (r) => r.finish_reason || "—", (r) => fmtClock(r.created)];
  const NUMERIC = new Set([3, 4, 5, 6, 7, 8]);
  let requestsKey = null;

  function renderRequests(requests) {
    document.getElementById("req-inflight-count").textContent = fmtInt(requests.num_inflight);
    document.getElementById("req-finished-count").textContent = fmtInt(requests.finished.length);
    const rows = state.requestView === "inflight" ? requests.inflight : requests.finished;
    const key = state.requestView + JSON.stringify(rows);
    if (key === requestsKey) return;
    requestsKey = key;
    const tbody = document.querySelector("#request-table tbody");
    tbody.replaceChildren(...rows.map((r) => {
      const tr = document.createElement("tr");
      tr.dataset.id = r.id;
      tr.dataset.state = r.state;
      REQUEST_COLUMNS.forEach((column, i) => {
        const td = document.createElement("td");
        td.textContent = column(r);
        if (NUMERIC.has(i)) td.className = "num";
        if (i === 2) td.className = "req-state";
        if (i === 3 && r.status >= 400) td.className = "num bad";
        if (i === 0 && r.prompt != null) {
          const prompt = document.createElement("div");
          prompt.className = "prompt muted small";
          prompt.textContent = r.prompt;
          td.append(prompt);
        }
        tr.append(td);
      });
      return tr;
    }));
    document.getElementById("req-empty").hidden = rows.length > 0;
  }

  for (const button of document.querySelectorAll("[data-req]")) {
    button.addEventListener("click", () => {
      state.requestView = button.dataset.req;
      for (const b of document.querySelectorAll("[data-req]")) b.setAttribute("aria-selected", String(b === button));
      if (state.last) renderRequests(state.last.requests);
    });
  }

  function renderErrors(p, errors) {
    const key = JSON.stringify(errors);
    if (key === p.errorsKey) return;
    p.errorsKey = key;
    each(p, "errors", (ul) => {
      const items = errors.slice().reverse().map((e) => {
        const li = document.createElement("li");
        const time = document.createElement("time");
        time.dateTime = new Date(e.time * 1000).toISOString();
        time.textContent = fmtDate(e.time);
        const msg = document.createElement("span");
        msg.className = "msg";
        msg.textContent = e.message;
        li.append(time, msg);
        return li;
      });
      if (!items.length) {
        const li = document.createElement("li");
        li.className = "muted";
        li.textContent = "No errors.";
        items.push(li);
      }
      ul.replaceChildren(...items);
    });
  }

  // ---- charts and the block map (selected model only) ----
  function drawSelected() {
    const p = panels.get(state.selected);
    const model = state.last && state.last.models.find((m) => m.name === state.selected);
    if (!p || !model) return;
    const s = model.series;
    if (!s) return;
    const charts = p.section.querySelectorAll("svg[data-chart]");
    for (const svg of charts) {
      const kind = svg.dataset.chart;
      if (kind === "generation") {
        chart(svg, [{ values: s.generation_tokens_per_s, cls: "s-generation", area: true }], { format: fmtAxis });
      } else if (kind === "prompt") {
        chart(svg, [{ values: s.prompt_tokens_per_s, cls: "s-prompt", area: true }], { format: fmtAxis });
      } else if (kind === "rate") {
        chart(svg, [{ values: s.requests_per_s, cls: "s-running", area: true }], { format: fmtAxis });
      } else if (kind === "latency") {
        chart(svg, [{ values: s.ttft_mean, cls: "s-prompt", connect: true }, { values: s.e2e_mean, cls: "s-generation", connect: true }],
          { format: fmtSecondsAxis });
      } else if (kind === "memory") {
        chart(svg, [{ values: s.rss, cls: "s-info", area: true }, { values: s.device_memory, cls: "s-used" }], { format: fmtBytesAxis });
      } else if (kind === "prompt-lengths" || kind === "output-lengths") {
        const lengths = model.lengths;
        bars(svg, lengths[kind === "prompt-lengths" ? "prompt" : "output"], lengths.edges);
      } else if (kind === "kv") {
        chart(svg, [{ values: s.kv_usage, cls: "s-kv", area: true }],
          { max: 1, format: (v) => Math.round(100 * v) + "%" });
      } else if (kind === "requests") {
        chart(svg, [{ values: s.running, cls: "s-running", area: true }, { values: s.waiting, cls: "s-waiting" }],
          { format: fmtAxis, integers: true });
      } else if (kind === "batch") {
        chart(svg, [{ values: s.batch_size, cls: "s-batch", area: true }], { format: fmtAxis, integers: true });
      }
    }
    drawMaps(p, model.kv.maps);
  }

  const fmtAxis = (v) => (v >= 1000 ? +(v / 1000).toFixed(1) + "k" : Number.isInteger(v) ? String(v) : +v.toPrecision(2) + "");
  const fmtSecondsAxis = (v) => (v === 0 ? "0" : fmtSeconds(v));
  const fmtBytesAxis = (v) => (v === 0 ? "0" : fmtBytes(v));

  // A histogram of lengths: one bar per power-of-two bin, labelled by its lower edge.
  function bars(svg, counts, edges) {
    const w = svg.clientWidth, h = svg.clientHeight;
    if (!w || !h) return;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    let first = counts.findIndex((c) => c > 0), last = counts.length - 1 - [...counts].reverse().findIndex((c) => c > 0);
    if (first < 0) { first = 0; last = Math.min(10, counts.length - 1); }
    const shown = counts.slice(first, last + 1), max = niceCeil(Math.max(...shown), true);
    const left = 40, bottom = 20, top = 8, slot = (w - left - 4) / shown.length;
    const nodes = [el("text", { class: "axis-label", x: left - 6, y: top + 4, "text-anchor": "end" }, fmtAxis(max)),
      el("text", { class: "axis-label", x: left - 6, y: h - bottom, "text-anchor": "end" }, "0")];
    shown.forEach((c, i) => {
      const height = (c / max) * (h - top - bottom), x = left + i * slot;
      nodes.push(el("rect", { class: "bar-rect", x: x + 1, y: h - bottom - height, width: Math.max(1, slot - 2), height },
        undefined));
      nodes[nodes.length - 1].append(el("title", {}, `${c} requests of ${edges[first + i]}+ tokens`));
      const e = edges[first + i];
      nodes.push(el("text", { class: "axis-label", x: x + slot / 2, y: h - 4, "text-anchor": "middle" }, e >= 1024 ? e / 1024 + "k" : String(e)));
    });
    svg.replaceChildren(...nodes);
  }

  function niceCeil(v, integers) {
    if (!(v > 0)) return 1;
    const power = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 4, 5, 6, 8, 10]) {
      const top = m * power;
      if (top >= v && (!integers || Number.isInteger(top / 2))) return top;
    }
    return 10 * power;
  }

  function el(name, attrs, text) {
    const node = document.createElementNS(SVG_NS, name);
    for (const [k, v] of Object.entries(attrs)) node.setAttribute(k, v);
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function chart(svg, lines, options) {
    if (!svg) return;
    const w = svg.clientWidth, h = svg.clientHeight;
    if (!w || !h) return;
    svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
    const left = 48, right = 8, top = 8, bottom = 20;
    const n = lines[0].values.length;
    let max = options.max;
    if (max == null) {
      let highest = 0;
      for (const line of lines) for (const v of line.values) if (v != null && v > highest) highest = v;
      max = niceCeil(highest * 1.15, options.integers); // headroom: a line at its cap stays visible
    }
    const x = (i) => left + (n <= 1 ? 0 : (i * (w - left - right)) / (n - 1));
    const y = (v) => top + (1 - Math.min(v, max) / max) * (h - top - bottom);
    const nodes = [];
    for (const f of [0, 0.5, 1]) {
      const yy = y(max * f);
      nodes.push(el("line", { class: "grid-line", x1: left, x2: w - right, y1: yy, y2: yy }));
      nodes.push(el("text", { class: "axis-label", x: left - 6, y: yy + 3.5, "text-anchor": "end" }, options.format(max * f)));
    }
    const res = state.last ? state.last.resolution_s : 1, range = n * res, tick = range > 900 ? 600 : range > 300 ? 120 : 60;
    for (let ago = 0; ago < range; ago += tick) {
      const label = ago === 0 ? "now" : `−${ago / 60}m`;
      nodes.push(el("text", { class: "axis-label", x: x(n - 1 - ago / res), y: h - 4, "text-anchor": ago === 0 ? "end" : "middle" }, label));
    }
    for (const line of lines) {
      let path = "", area = "", runStart = -1;
      const closeRun = (end) => { if (runStart >= 0 && line.area) area += `L${x(end).toFixed(1)},${y(0).toFixed(1)}L${x(runStart).toFixed(1)},${y(0).toFixed(1)}Z`; };
      line.values.forEach((v, i) => {
        if (v == null) { if (!line.connect) { closeRun(i - 1); runStart = -1; } return; }
        const point = `${x(i).toFixed(1)},${y(v).toFixed(1)}`;
        if (runStart < 0) { runStart = i; path += "M" + point; area += "M" + point; } else { path += "L" + point; area += "L" + point; }
      });
      closeRun(n - 1);
      if (line.area && area) nodes.push(el("path", { class: `area ${line.cls}`, d: area }));
      if (path) nodes.push(el("path", { class: `line ${line.cls}`, d: path }));
    }
    svg.replaceChildren(...nodes);
  }

  function drawMaps(p, maps) {
    const container = p.fields.get("block-maps")[0];
    while (p.maps.length < maps.length) {
      const label = document.createElement("div");
      label.className = "replica-label";
      const canvas = document.createElement("canvas");
      canvas.setAttribute("role", "img");
      container.append(label, canvas);
      p.maps.push({ label, canvas });
    }
    while (p.maps.length > maps.length) {
      const gone = p.maps.pop();
      gone.label.remove();
      gone.canvas.remove();
    }
    const style = getComputedStyle(document.documentElement);
    const colors = { 0: style.getPropertyValue("--free").trim(), 1: style.getPropertyValue("--used").trim(),
      2: style.getPropertyValue("--cached").trim() };
    maps.forEach((map, i) => {
      const { label, canvas } = p.maps[i];
      label.hidden = maps.length < 2;
      label.textContent = `replica ${map.replica}`;
      canvas.setAttribute("aria-label", `KV block map${maps.length > 1 ? " of replica " + map.replica : ""}`);
      canvas.dataset.cells = String(map.cells.length);
      drawMap(canvas, map.cells, colors);
    });
  }

  function drawMap(canvas, cells, colors) {
    const w = canvas.clientWidth, h = canvas.clientHeight, n = cells.length;
    if (!w || !h) return;
    const ratio = window.devicePixelRatio || 1;
    canvas.width = Math.round(w * ratio);
    canvas.height = Math.round(h * ratio);
    const ctx = canvas.getContext("2d");
    ctx.setTransform(ratio, 0, 0, ratio, 0, 0);
    ctx.clearRect(0, 0, w, h);
    if (!n) return;
    // The largest square cell that fits every block in the canvas.
    let size = Math.max(1, Math.floor(Math.sqrt((w * h) / n)));
    while (size > 1 && Math.ceil(n / Math.floor(w / size)) * size > h) size -= 1;
    const columns = Math.max(1, Math.floor(w / size));
    const gap = size >= 8 ? 2 : size >= 4 ? 1 : 0;
    const radius = size >= 8 ? 2 : 0;
    for (const stateChar of ["0", "1", "2"]) {
      ctx.fillStyle = colors[stateChar];
      ctx.beginPath();
      for (let i = 0; i < n; i++) {
        if (cells[i] !== stateChar) continue;
        const cx = (i % columns) * size, cy = Math.floor(i / columns) * size;
        if (radius && ctx.roundRect) ctx.roundRect(cx, cy, size - gap, size - gap, radius);
        else ctx.rect(cx, cy, size - gap, size - gap);
      }
      ctx.fill();
    }
  }

  // ---- LoRA adapters: load and unload through the admin API (session cookie + the CSRF header) ----
  function loraUrl(model, name) {
    let url = boot.loras_url.replace("{model}", encodeURIComponent(model));
    if (name !== undefined) url += "/" + encodeURIComponent(name);
    return url;
  }

  async function loraRequest(method, url, body) {
    const headers = { Accept: "application/json", [boot.csrf_header]: "1" };
    if (body !== undefined) headers["Content-Type"] = "application/json";
    const response = await fetch(url, { method, credentials: "same-origin", cache: "no-store", headers,
      body: body === undefined ? undefined : JSON.stringify(body) });
    let data = null;
    try { data = await response.json(); } catch (e) { data = null; }
    if (!response.ok) {
      const message = data && data.error && data.error.message;
      throw new Error(message || `The server answered ${response.status}.`);
    }
    return data;
  }

  function adapterItem(a) {
    const li = document.createElement("li");
    li.dataset.adapter = a.name;
    const name = document.createElement("b");
    name.textContent = a.name;
    const path = document.createElement("code");
    path.textContent = a.path;
    li.append(name, " ", path);
    if (a.rank != null) {
      const usage = document.createElement("span");
      usage.className = "muted small";
      usage.dataset.usage = "";
      usage.textContent = adapterUsage(a);
      li.append(" ", usage);
    }
    const unload = document.createElement("button");
    unload.type = "button";
    unload.className = "link unload";
    unload.dataset.unload = a.name;
    unload.textContent = "unload";
    li.append(" ", unload);
    return li;
  }

  // The stats give `requests`/`tokens`, the admin API `num_requests`/`num_tokens`.
  function adapterUsage(a) {
    return ` rank ${a.rank} · ${a.slot == null ? "in host memory" : "GPU slot " + a.slot} · ` +
      `${fmtInt(a.num_requests ?? a.requests)} requests · ${fmtInt(a.num_tokens ?? a.tokens)} tokens`;
  }

  function renderAdapters(card, loras) {
    const list = card.querySelector("[data-lora-list]");
    list.replaceChildren(...loras.map(adapterItem));
    list.hidden = loras.length === 0;
    card.querySelector("[data-lora-empty]").hidden = loras.length > 0;
  }

  // Live view from the stats (adapters changed elsewhere: the API, another operator, a restarted engine). The
  // list is rebuilt only when its adapters change, else their usage is updated in place, so an unload button is
  // never replaced under the pointer; for a moment after a change made here, snapshots taken before it are
  // ignored.
  const LOCAL_CHANGE_HOLD_MS = 2500;
  function refreshAdapters(card, adapters) {
    if (Date.now() - Number(card.dataset.changedAt || 0) < LOCAL_CHANGE_HOLD_MS) return;
    const list = card.querySelector("[data-lora-list]");
    const items = [...list.children];
    const same = items.length === adapters.length && adapters.every((a, i) => items[i].dataset.adapter === a.name
      && Boolean(items[i].querySelector("[data-usage]")) === (a.rank != null));
    if (!same) return renderAdapters(card, adapters);
    adapters.forEach((a, i) => {
      const usage = items[i].querySelector("[data-usage]");
      if (usage) usage.textContent = adapterUsage(a);
    });
  }

  function showLoraError(card, message) {
    const box = card.querySelector("[data-lora-error]");
    box.textContent = message || "";
    box.hidden = !message;
  }

  async function loraChange(card, controls, method, url, body) {
    showLoraError(card, "");
    for (const c of controls) c.disabled = true;
    card.setAttribute("aria-busy", "true");
    try {
      const listing = await loraRequest(method, url, body);
      card.dataset.changedAt = String(Date.now());
      renderAdapters(card, listing.loras);
      return true;
    } catch (e) {
      showLoraError(card, e.message);
      return false;
    } finally {
      for (const c of controls) c.disabled = false;
      card.removeAttribute("aria-busy");
    }
  }

  for (const card of document.querySelectorAll("[data-lora]")) {
    const model = card.dataset.lora;
    const form = card.querySelector("[data-lora-form]");
    form.addEventListener("submit", async (event) => {
      event.preventDefault();
      const name = form.elements.name.value.trim(), path = form.elements.path.value.trim();
      if (!name || !path) return;
      const done = await loraChange(card, [...form.querySelectorAll("input, button")], "POST", loraUrl(model),
        { name, path });
      if (done) form.reset();
    });
    // One listener for every unload button, present and future (the list is re-rendered after each change).
    card.querySelector("[data-lora-list]").addEventListener("click", (event) => {
      const button = event.target.closest("button[data-unload]");
      if (!button) return;
      loraChange(card, [button], "DELETE", loraUrl(model, button.dataset.unload));
    });
  }

  // ---- getting the data ----
  function refreshConnection() {
    const conn = document.getElementById("conn");
    const stale = state.lastUpdate && Date.now() - state.lastUpdate > STALE_AFTER_MS;
    const shown = stale && (state.mode === "live" || state.mode === "polling") ? "stale" : state.mode;
    const labels = { live: "live", polling: "polling", connecting: "connecting", reconnecting: "reconnecting",
      stale: "no data for a while", offline: "server unreachable" };
    conn.dataset.mode = shown;
    document.getElementById("conn-label").textContent = labels[shown] || shown;
  }

  function setMode(mode) {
    state.mode = mode;
    refreshConnection();
  }

  // The charts' range, and only the selected model's series (the others' are not drawn).
  function statsQuery(url) {
    return `${url}?range=${state.range}&model=${encodeURIComponent(state.selected || "")}`;
  }

  function restartStream() {
    if (state.source) { state.source.close(); state.source = null; startStream(); }  // polling reads the state
  }

  function startStream() {
    if (typeof window.EventSource !== "function") return startPolling();
    const source = state.source = new EventSource(statsQuery(boot.stream_url));
    let delivered = false;
    source.onmessage = (event) => {
      delivered = true;
      state.mode = "live";
      apply(JSON.parse(event.data));
    };
    source.onerror = () => {
      // A stream that never delivered (a buffering proxy) or was refused (the session ended): poll instead, which
      // also notices a 401 and goes to the login page. Otherwise EventSource reconnects by itself.
      if (!delivered || source.readyState === EventSource.CLOSED) {
        source.close();
        startPolling();
      } else {
        setMode("reconnecting");
      }
    };
  }

  function startPolling() {
    setMode("polling");
    const tick = async () => {
      try {
        const response = await fetch(statsQuery(boot.stats_url), { credentials: "same-origin", cache: "no-store",
          headers: { Accept: "application/json" } });
        if (response.status === 401) { location.href = boot.login_url; return; }
        if (!response.ok) throw new Error(String(response.status));
        state.mode = "polling";
        apply(await response.json());
      } catch (e) {
        setMode("offline");
      }
      setTimeout(tick, POLL_INTERVAL_MS);
    };
    tick();
  }

  for (const button of document.querySelectorAll("[data-range]")) {
    button.addEventListener("click", () => {
      state.range = Number(button.dataset.range);
      for (const b of document.querySelectorAll("[data-range]")) b.setAttribute("aria-pressed", String(b === button));
      restartStream();
    });
  }

  let resizeQueued = false;
  window.addEventListener("resize", () => {
    if (resizeQueued) return;
    resizeQueued = true;
    requestAnimationFrame(() => { resizeQueued = false; drawSelected(); });
  });
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", drawSelected);
  setInterval(refreshConnection, 1000);

  Object.assign(state, { chart, fmtRate, fmtInt, fmtAxis });  // lent to the panels in other files
  const wanted = decodeURIComponent(location.hash.slice(1));
  state.selected = panels.has(wanted) ? wanted : panels.keys().next().value;
  if (state.selected !== undefined) select(state.selected, false);
  apply(boot.snapshot);
  startStream();
})();
