/* kvbox dashboard, playground: a chat with a served model or adapter through the public API
 * (POST /v1/chat/completions, stream: true), exactly as a client would call it. The API key is the one the operator
 * types here, kept in this tab's sessionStorage; the page is given none. The conversation stays in the page.
 */
(function () {
  "use strict";

  const KEY_STORAGE = "kvbox-playground-key";
  const section = document.getElementById("playground");
  if (!section) return;
  const form = section.querySelector("[data-pg-form]");
  const transcript = section.querySelector("[data-pg-transcript]");
  const sendButton = section.querySelector("[data-pg-send]");
  const stopButton = section.querySelector("[data-pg-stop]");
  const errorBox = section.querySelector("[data-pg-error]");
  const keyInput = form.elements.api_key;
  // Exposed for tests: the conversation and the last answer's fate.
  const state = window.kvboxPlayground = { messages: [], busy: false, chunks: 0, finish: null, controller: null };

  if (keyInput) {
    keyInput.value = sessionStorage.getItem(KEY_STORAGE) || "";
    keyInput.addEventListener("change", () => sessionStorage.setItem(KEY_STORAGE, keyInput.value.trim()));
  }

  function bubble(role, text) {
    const div = document.createElement("div");
    div.className = "pg-msg";
    div.dataset.role = role;
    div.textContent = text;
    transcript.append(div);
    transcript.scrollTop = transcript.scrollHeight;
    return div;
  }

  function showError(message) {
    errorBox.textContent = message || "";
    errorBox.hidden = !message;
  }

  function setBusy(busy) {
    state.busy = busy;
    sendButton.disabled = busy;
    stopButton.disabled = !busy;
  }

  function number(name) {
    const value = form.elements[name].value.trim();
    return value === "" ? undefined : Number(value);
  }

  function requestBody() {
    const system = form.elements.system.value.trim();
    const messages = (system ? [{ role: "system", content: system }] : []).concat(state.messages);
    return { model: form.elements.model.value, messages, stream: true, temperature: number("temperature"),
      top_p: number("top_p"), max_tokens: number("max_tokens") };
  }

  async function errorMessage(response) {
    try {
      const data = await response.json();
      if (data && data.error && data.error.message) {
        return data.error.message + (data.error.param ? ` (${data.error.param})` : "");
      }
    } catch (e) { /* not JSON */ }
    return `The server answered ${response.status}.`;
  }

  // Server-sent events: "data: {chunk}" lines separated by blank lines, ending with "data: [DONE]".
  async function readStream(response, onChunk) {
    const reader = response.body.getReader();
    const decoder = new TextDecoder();
    let buffer = "";
    for (;;) {
      const { value, done } = await reader.read();
      if (done) return;
      buffer += decoder.decode(value, { stream: true });
      let end;
      while ((end = buffer.indexOf("\n\n")) >= 0) {
        const event = buffer.slice(0, end);
        buffer = buffer.slice(end + 2);
        for (const line of event.split("\n")) {
          if (!line.startsWith("data: ")) continue;
          const data = line.slice(6);
          if (data === "[DONE]") return;
          onChunk(JSON.parse(data));
        }
      }
    }
  }

  async function send(text) {
    showError("");
    state.messages.push({ role: "user", content: text });
    const question = bubble("user", text);
    const answer = bubble("assistant", "");
    const started = performance.now();
    let content = "", tokens = 0, finish = null;
    const controller = state.controller = new AbortController();
    setBusy(true);
    try {
      const headers = { "Content-Type": "application/json", Accept: "text/event-stream" };
      const key = keyInput ? keyInput.value.trim() : "";
      if (key) headers.Authorization = "Bearer " + key;
      const response = await fetch(section.dataset.chatUrl, { method: "POST", headers, cache: "no-store",
        credentials: "omit", body: JSON.stringify(requestBody()), signal: controller.signal });
      if (!response.ok) throw new Error(await errorMessage(response));
      await readStream(response, (chunk) => {
        if (chunk.error) throw new Error(chunk.error.message);
        const choice = chunk.choices && chunk.choices[0];
        if (!choice) return;
        if (choice.delta && choice.delta.content) {
          content += choice.delta.content;
          tokens += 1;
          state.chunks += 1;
          answer.textContent = content;
          transcript.scrollTop = transcript.scrollHeight;
        }
        if (choice.finish_reason) finish = choice.finish_reason;
      });
    } catch (e) {
      if (e.name === "AbortError") finish = "stopped";
      else showError(e.message);
    } finally {
      state.controller = null;
      setBusy(false);
    }
    if (content) state.messages.push({ role: "assistant", content });
    else if (finish === null) {  // failed: the message goes back into the box, to be sent again
      question.remove();
      answer.remove();
      state.messages.pop();
      if (!form.elements.message.value) form.elements.message.value = text;
      return;
    }
    state.finish = finish;
    const meta = document.createElement("span");
    meta.className = "meta";
    meta.textContent = `${tokens} chunks · ${((performance.now() - started) / 1000).toFixed(1)} s · ${finish || "?"}`;
    answer.append(meta);
  }

  form.addEventListener("submit", (event) => {
    event.preventDefault();
    const text = form.elements.message.value.trim();
    if (!text || state.busy) return;
    form.elements.message.value = "";
    send(text);
  });
  form.elements.message.addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
  });
  stopButton.addEventListener("click", () => { if (state.controller) state.controller.abort(); });
  section.querySelector("[data-pg-clear]").addEventListener("click", () => {
    if (state.controller) state.controller.abort();
    state.messages = [];
    transcript.replaceChildren();
    showError("");
  });
})();
