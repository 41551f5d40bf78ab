/* kvbox dashboard, log view: polls /admin/logs (session cookie) for the lines after the last one shown, every two
 * seconds while the page is visible; the level filter is applied by the server. Lines are text (textContent), the
 * view keeps the last MAX_SHOWN, and it follows new lines while "follow" is on and the reader is at the bottom.
 */
(function () {
  "use strict";

  const POLL_MS = 2000;
  const MAX_SHOWN = 1000;
  const section = document.getElementById("logs");
  if (!section) return;
  const box = section.querySelector("[data-logs-lines]");
  const levelSelect = section.querySelector("[data-logs-level]");
  const follow = section.querySelector("[data-logs-follow]");
  const status = section.querySelector("[data-logs-status]");
  const count = section.querySelector("[data-logs-count]");
  // Exposed for tests, like window.kvbox.
  const state = window.kvboxLogs = { last: 0, polls: 0, shown: 0, timer: null, generation: 0 };

  const clock = (t) => new Date(t * 1000).toLocaleTimeString([], { hour12: false });

  function lineElement(entry) {
    const div = document.createElement("div");
    div.className = "log-line";
    div.dataset.level = entry.level;
    div.dataset.seq = String(entry.seq);
    const parts = [["t", clock(entry.time) + " "], ["lv", entry.level.toUpperCase()], ["src", entry.source],
      ["lg", " " + entry.logger + ": "]];
    for (const [cls, text] of parts) {
      const span = document.createElement("span");
      span.className = cls;
      span.textContent = text;
      div.append(span);
    }
    div.append(entry.message);
    return div;
  }

  function show(lines) {
    if (!lines.length) return;
    const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 24;
    box.append(...lines.map(lineElement));
    while (box.childElementCount > MAX_SHOWN) box.firstElementChild.remove();
    state.shown = box.childElementCount;
    count.textContent = String(state.shown);
    if (follow.checked && atBottom) box.scrollTop = box.scrollHeight;
  }

  function setStatus(text) {
    status.textContent = text || "";
    status.hidden = !text;
  }

  async function poll() {
    const generation = state.generation;
    try {
      const url = `${section.dataset.logsUrl}?after=${state.last}&level=${encodeURIComponent(levelSelect.value)}`;
      const response = await fetch(url, { credentials: "same-origin", cache: "no-store",
        headers: { Accept: "application/json" } });
      if (response.status === 401) { setStatus("The session has ended: sign in again."); return; }
      if (!response.ok) throw new Error(`The server answered ${response.status}.`);
      const data = await response.json();
      if (generation !== state.generation) return;  // the filter changed while this was on its way
      state.last = data.last;
      state.polls += 1;
      show(data.lines);
      setStatus("");
    } catch (e) {
      setStatus("Cannot read the logs: " + e.message);
    }
    schedule();
  }

  function schedule() {
    clearTimeout(state.timer);
    state.timer = document.hidden ? null : setTimeout(poll, POLL_MS);
  }

  levelSelect.addEventListener("change", () => {
    state.generation += 1;
    state.last = 0;
    box.replaceChildren();
    clearTimeout(state.timer);
    poll();
  });
  follow.addEventListener("change", () => { if (follow.checked) box.scrollTop = box.scrollHeight; });
  // A hidden tab does not poll; it catches up (the ring keeps the lines) when shown again.
  document.addEventListener("visibilitychange", () => { if (!document.hidden && state.timer === null) poll(); });
  poll();
})();
