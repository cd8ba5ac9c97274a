// The playground: a chat against this server's /v1/chat/completions, streamed.
// Plain browser JavaScript (no build step, no CDN). Model output is only ever set
// as text (textContent), never parsed as HTML.
"use strict";

const $ = (id) => document.getElementById(id);
const history = []; // the conversation sent with each request: {role, content}
let running = null; // the AbortController of the request in flight

function headers() {
  const key = $("api-key").value.trim();
  localStorage.setItem("switchyard-api-key", key);
  return key ? { "Content-Type": "application/json", Authorization: `Bearer ${key}` } : { "Content-Type": "application/json" };
}

function addMessage(role, text) {
  const node = document.createElement("div");
  node.className = `message ${role}`;
  node.dataset.role = role;
  node.textContent = text;
  $("log").append(node);
  node.scrollIntoView({ block: "end" });
  return node;
}

function parseJsonField(id, what) {
  try {
    return JSON.parse($(id).value);
  } catch (err) {
    throw new Error(`${what} is not valid JSON: ${err.message}`);
  }
}

// The request body from the settings panel; throws on a malformed schema or tool list.
function requestBody() {
  const body = {
    model: $("model").dataset.id || "tgi",
    messages: [...history],
    stream: true,
    stream_options: { include_usage: true },
    temperature: Number($("temperature").value),
    top_p: Number($("top-p").value),
    max_tokens: Number($("max-tokens").value),
  };
  const system = $("system").value.trim();
  if (system) body.messages.unshift({ role: "system", content: system });
  if ($("seed").value !== "") body.seed = Number($("seed").value);
  const mode = $("mode").value;
  if (mode === "json_schema") {
    const schema = parseJsonField("schema", "The JSON schema");
    body.response_format = { type: "json_schema", json_schema: { name: "playground", schema, strict: true } };
  } else if (mode === "tools") {
    body.tools = parseJsonField("tools", "The tool definitions");
    body.tool_choice = $("tool-choice").value;
  }
  return body;
}

// Yields the JSON payload of each `data:` event of a server-sent event stream.
async function* events(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of event.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        if (data === "[DONE]") return;
        yield JSON.parse(data);
      }
    }
  }
}

class Stats {
  constructor() {
    this.start = performance.now();
    this.first = null;
    this.tokens = 0;
  }
  token(count = 1) {
    if (this.first === null) {
      this.first = performance.now();
      $("ttft").textContent = `${Math.round(this.first - this.start)} ms`;
    }
    this.tokens += count;
    this.show();
  }
  show(exactTokens) {
    if (exactTokens !== undefined) this.tokens = exactTokens;
    $("tokens").textContent = String(this.tokens);
    const seconds = (performance.now() - this.first) / 1000;
    // Decode speed: the tokens after the first, over the time since the first.
    if (this.first !== null && this.tokens > 1 && seconds > 0) $("tps").textContent = ((this.tokens - 1) / seconds).toFixed(1);
  }
}

function showToolCalls(node, calls) {
  node.querySelectorAll(".tool-call").forEach((el) => el.remove());
  for (const call of calls) {
    const el = document.createElement("div");
    el.className = "tool-call";
    el.textContent = `${call.name}(${call.arguments})`;
    node.append(el);
  }
}

async function readAnswer(response, node, stats) {
  let text = "";
  const calls = [];
  let finish = null;
  for await (const chunk of events(response)) {
    if (chunk.error) throw new Error(chunk.error.message);
    if (chunk.usage) stats.show(chunk.usage.completion_tokens);
    for (const choice of chunk.choices || []) {
      const delta = choice.delta || {};
      if (delta.content) {
        text += delta.content;
        node.textContent = text;
        stats.token();
      }
      for (const call of delta.tool_calls || []) {
        calls[call.index] ??= { name: "", arguments: "" };
        if (call.function?.name) calls[call.index].name += call.function.name;
        if (call.function?.arguments) calls[call.index].arguments += call.function.arguments;
        stats.token();
        showToolCalls(node, calls);
      }
      finish = choice.finish_reason || finish;
    }
  }
  return { text, calls, finish };
}

async function send(prompt) {
  let body;
  try {
    history.push({ role: "user", content: prompt });
    body = requestBody();
  } catch (err) {
    history.pop();
    addMessage("error", err.message);
    return;
  }
  addMessage("user", prompt);
  const node = addMessage("assistant", "");
  const stats = new Stats();
  running = new AbortController();
  setBusy(true, "generating");
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: running.signal,
    });
    if (!response.ok) {
      const error = await response.json().catch(() => ({}));
      throw new Error(error.error?.message || `${response.status} ${response.statusText}`);
    }
    const answer = await readAnswer(response, node, stats);
    const said = answer.calls.length ? answer.calls.map((c) => `${c.name}(${c.arguments})`).join("\n") : answer.text;
    history.push({ role: "assistant", content: said });
    setBusy(false, `done (${answer.finish})`);
  } catch (err) {
    history.pop(); // the turn did not complete: it is not part of the conversation
    if (err.name === "AbortError") {
      setBusy(false, "stopped");
      node.classList.add("stopped");
    } else {
      node.remove();
      addMessage("error", err.message);
      setBusy(false, "error");
    }
  } finally {
    running = null;
  }
}

function setBusy(busy, status) {
  $("send").disabled = busy;
  $("stop").disabled = !busy;
  $("status").textContent = status;
}

async function loadModel() {
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    const listing = await response.json();
    if (response.status === 401) throw new Error("enter the server's API key (it sets API_KEY)");
    if (!response.ok) throw new Error(listing.error?.message || response.statusText);
    $("model").textContent = listing.data[0].id;
    $("model").dataset.id = listing.data[0].id;
  } catch (err) {
    $("model").textContent = `model unknown: ${err.message}`;
  }
}

function bindSettings() {
  for (const id of ["temperature", "top-p"]) {
    $(id).addEventListener("input", () => ($(`${id}-value`).textContent = $(id).value));
  }
  $("mode").addEventListener("change", () => {
    $("schema-field").hidden = $("mode").value !== "json_schema";
    $("tools-field").hidden = $("mode").value !== "tools";
  });
  $("api-key").value = localStorage.getItem("switchyard-api-key") || "";
  $("api-key").addEventListener("change", loadModel);
}

function bindComposer() {
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const prompt = $("prompt").value.trim();
    if (!prompt || running) return;
    $("prompt").value = "";
    send(prompt);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => running?.abort());
  $("clear").addEventListener("click", () => {
    history.length = 0;
    $("log").replaceChildren();
  });
}

bindSettings();
bindComposer();
loadModel();
