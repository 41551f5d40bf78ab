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
  const state = { last: null, updates: 0, mode: "connecting", selected: null, lastUpdate: 0 };
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
    drawSelected();
    refreshConnection();
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
      "quantization " + m.quantization, parallelism, "up " + fmtDuration(m.uptime_s)].filter(Boolean).join(" · "));

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
    const spec = m.spec_decode;
    set(p, "spec-acceptance", spec ? fmtPct(spec.acceptance_rate) : "off", spec && spec.acceptance_rate);
    set(p, "spec-acceptance-lifetime", spec ? fmtPct(spec.lifetime_acceptance_rate) : "off",
        spec && spec.lifetime_acceptance_rate);
    for (const kind of ["ttft", "itl"]) {
      const lat = m.latency[kind];
      for (const q of ["p50", "p90", "p99"]) set(p, `${kind}-${q}`, fmtSeconds(lat[q]), lat[q]);
      set(p, `${kind}-count`, fmtInt(lat.count), lat.count);
    }
    renderErrors(p, m.errors);
    if (m.lora && m.lora.enabled) {
      const card = document.querySelector(`[data-lora="${CSS.escape(m.name)}"]`);
      if (card) refreshAdapters(card, m.lora.adapters);
    }
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
    const charts = p.section.querySelectorAll("svg[data-chart]");
    for (const svg of charts) {
      const kind = svg.dataset.chart;
      if (kind === "throughput") {
        const span = state.last.rate_window_s;
        chart(svg, [{ values: trailingMean(s.prompt_tokens_per_s, span), cls: "s-prompt", area: true },
          { values: trailingMean(s.generation_tokens_per_s, span), cls: "s-generation", area: true }],
        { format: fmtAxis });
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

  // Per-second counts averaged over the `window` seconds up to each point (as the "now" rates are); null where the
  // model was not there.
  function trailingMean(values, window) {
    const out = new Array(values.length);
    let sum = 0, count = 0;
    for (let i = 0; i < values.length; i++) {
      if (values[i] != null) { sum += values[i]; count += 1; }
      const old = i - window;
      if (old >= 0 && values[old] != null) { sum -= values[old]; count -= 1; }
      out[i] = values[i] == null ? null : sum / Math.max(count, 1);
    }
    return out;
  }

  const fmtAxis = (v) => (v >= 1000 ? +(v / 1000).toFixed(1) + "k" : Number.isInteger(v) ? String(v) : v.toFixed(1));

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
    for (let ago = 0; ago < n; ago += 60) {
      const label = ago === 0 ? "now" : `−${ago / 60}m`;
      nodes.push(el("text", { class: "axis-label", x: x(n - 1 - ago), y: h - 4, "text-anchor": ago === 0 ? "end" : "middle" }, label));
    }
    for (const line of lines) {
      let path = "", area = "", runStart = -1;
      const closeRun = (end) => { if (runStart >= 0 && line.area) area += `L${x(end).toFixed(1)},${y(0).toFixed(1)}L${x(runStart).toFixed(1)},${y(0).toFixed(1)}Z`; };
      line.values.forEach((v, i) => {
        if (v == null) { closeRun(i - 1); runStart = -1; return; }
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

  function startStream() {
    if (typeof window.EventSource !== "function") return startPolling();
    const source = new EventSource(boot.stream_url);
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
        const response = await fetch(boot.stats_url, { credentials: "same-origin", cache: "no-store",
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

  let resizeQueued = false;
  window.addEventListener("resize", () => {
    if (resizeQueued) return;
    resizeQueued = true;
    requestAnimationFrame(() => { resizeQueued = false; drawSelected(); });
  });
  window.matchMedia("(prefers-color-scheme: dark)").addEventListener("change", drawSelected);
  setInterval(refreshConnection, 1000);

  const wanted = decodeURIComponent(location.hash.slice(1));
  state.selected = panels.has(wanted) ? wanted : panels.keys().next().value;
  if (state.selected !== undefined) select(state.selected, false);
  apply(boot.snapshot);
  startStream();
})();
