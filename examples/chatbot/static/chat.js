"use strict";
// The chat page: answers streamed from POST /api/ask (server-sent events read from fetch), the knowledge
// panel from GET /api/knowledge (EventSource, resumed by Last-Event-ID), votes to POST /api/feedback.
// Everything shown comes from the server as text (textContent), never as HTML.

const $ = (id) => document.getElementById(id);
const messages = $("messages"), form = $("ask-form"), input = $("question"), send = $("send");

function el(tag, cls, text) {
  const node = document.createElement(tag);
  if (cls) node.className = cls;
  if (text !== undefined) node.textContent = text;
  return node;
}

function showError(message) {
  const box = $("error");
  box.textContent = message;
  box.hidden = !message;
}

function scrollDown() { messages.scrollTop = messages.scrollHeight; }

// Server-sent events from a fetch body: "event: X\ndata: {...}\n\n" frames.
async function* readEvents(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buffer += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buffer.indexOf("\n\n")) >= 0) {
      const frame = buffer.slice(0, cut);
      buffer = buffer.slice(cut + 2);
      let event = "message", data = "";
      for (const line of frame.split("\n")) {
        if (line.startsWith("event: ")) event = line.slice(7);
        else if (line.startsWith("data: ")) data += line.slice(6);
      }
      if (data) yield { event, data: JSON.parse(data) };
    }
  }
}

function citationLine(c) {
  const li = el("li");
  li.append(el("span", "cite-id", `${c.index ? `[${c.index}] ` : ""}${c.doc_id} v${c.version}`));
  const when = c.valid_from ? `, valid from ${c.valid_from.slice(0, 10)}` : "";
  li.append(document.createTextNode(` ${c.source}${when}`));
  li.title = c.text;
  li.dataset.docId = c.doc_id;
  li.dataset.version = String(c.version);
  return li;
}

function renderDone(bubble, done) {
  bubble.dataset.answerId = done.answer_id;
  bubble.dataset.state = "done";
  if (done.not_found) bubble.classList.add("refused");
  const meta = el("div", "meta");
  if (done.citations.length) {
    meta.append(el("div", "", "Sources:"));
    const list = el("ol", "citations");
    done.citations.forEach((c) => list.append(citationLine(c)));
    meta.append(list);
  } else {
    meta.append(el("div", "", "No document answered this."));
  }
  if (done.superseded.length) {
    meta.append(el("div", "superseded-note", "Superseded by a newer document (not used):"));
    const list = el("ul", "superseded");
    done.superseded.forEach((c) => list.append(citationLine(c)));
    meta.append(list);
  }
  if (!done.not_found) meta.append(el("div", "timing", `first words after ${Math.round(done.ttft_ms)} ms, ${done.model}${done.adapter ? " + " + done.adapter : ""}`));
  const votes = el("div", "votes");
  for (const [vote, label] of [["up", "Helpful"], ["down", "Not helpful"]]) {
    const button = el("button", `vote-${vote}`, label);
    button.type = "button";
    button.addEventListener("click", () => sendVote(done.answer_id, vote, votes, button));
    votes.append(button);
  }
  meta.append(votes);
  bubble.append(meta);
}

async function sendVote(answerId, vote, votes, button) {
  try {
    const response = await fetch("/api/feedback", {
      method: "POST", headers: { "Content-Type": "application/json" },
      body: JSON.stringify({ answer_id: answerId, vote }),
    });
    if (!response.ok) { showError((await response.json()).error); return; }
    votes.querySelectorAll("button").forEach((b) => b.classList.remove("chosen"));
    button.classList.add("chosen");
  } catch (err) {
    showError("The chat server is not reachable; the vote was not saved.");
  }
}

async function ask(question) {
  showError("");
  const asked = el("li", "question", question);
  messages.append(asked);
  const bubble = el("li", "answer");
  bubble.dataset.state = "streaming";
  const text = el("div", "text");
  bubble.append(text);
  messages.append(bubble);
  scrollDown();
  let response;
  try {
    response = await fetch("/api/ask", {
      method: "POST", headers: { "Content-Type": "application/json" }, body: JSON.stringify({ question }),
    });
  } catch (err) {
    bubble.remove();
    asked.remove();
    if (!input.value) input.value = question;
    showError("The chat server is not reachable. Check that it is running, then try again.");
    return;
  }
  if (!response.ok) {  // refused before answering: the question goes back into the box to be mended
    bubble.remove();
    asked.remove();
    if (!input.value) input.value = question;
    let message = `The chat server answered ${response.status}.`;
    try { message = (await response.json()).error || message; } catch (err) { /* not JSON */ }
    showError(message);
    return;
  }
  try {
    for await (const { event, data } of readEvents(response)) {
      if (event === "delta") { text.textContent += data.text; scrollDown(); }
      else if (event === "done") renderDone(bubble, data);
      else if (event === "error") { bubble.dataset.state = "error"; bubble.remove(); showError(data.message); }
    }
  } catch (err) {
    bubble.dataset.state = "error";
    showError("The answer was cut off (the connection to the chat server dropped). Try again.");
  }
  scrollDown();
}

form.addEventListener("submit", async (event) => {
  event.preventDefault();
  const question = input.value.trim();
  if (!question) { showError("Type a question first."); return; }
  send.disabled = true;
  input.value = "";
  try { await ask(question); } finally { send.disabled = false; input.focus(); }
});
input.addEventListener("keydown", (event) => {
  if (event.key === "Enter" && !event.shiftKey) { event.preventDefault(); form.requestSubmit(); }
});

// -- the knowledge panel ---------------------------------------------------------------------------
const documents = $("knowledge");
function showChange(c) {
  let row = documents.querySelector(`li[data-doc-id="${CSS.escape(c.id)}"]`);
  if (!row) { row = el("li"); row.dataset.docId = c.id; documents.prepend(row); }
  row.replaceChildren();
  row.dataset.version = String(c.version);
  row.dataset.op = c.op;
  row.dataset.seq = String(c.seq);
  row.dataset.shownAtMs = String(Date.now());
  row.dataset.searchableAtMs = String(c.searchable_at_ms);
  row.classList.toggle("deleted", c.op === "delete");
  row.append(el("div", "doc-title", c.title || c.id));
  const what = c.op === "delete" ? `deleted (v${c.version})` : `v${c.version}`;
  row.append(el("div", "doc-meta", `${c.id} \u00b7 ${what} \u00b7 searchable ${Math.round(c.lag_ms)} ms after ack \u00b7 ${c.acked_at.slice(11, 19)} UTC`));
  row.classList.add("fresh");
  setTimeout(() => row.classList.remove("fresh"), 50);
}
const feed = new EventSource("/api/knowledge");
feed.addEventListener("change", (event) => { $("knowledge-problem").hidden = true; showChange(JSON.parse(event.data)); });
feed.addEventListener("problem", (event) => {
  const box = $("knowledge-problem");
  box.textContent = JSON.parse(event.data).message + " (retrying)";
  box.hidden = false;
});

async function refreshStatus() {
  const status = $("status");
  try {
    const s = await (await fetch("/api/status")).json();
    status.classList.toggle("down", !s.reachable);
    status.textContent = s.reachable
      ? `${s.documents} documents \u00b7 ${s.model}${s.model_ready ? "" : " (starting)"}`
      : s.message;
  } catch (err) {
    status.classList.add("down");
    status.textContent = "The chat server is not reachable.";
  }
}
refreshStatus();
setInterval(refreshStatus, 5000);
