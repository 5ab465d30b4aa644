// cuga console: live run pages (server-sent events from the coordinator's Watch) and
// countdowns to approval expiry. No framework, no inline script (the CSP forbids it):
// every text from the server is set with textContent, never parsed as HTML.
"use strict";

function left(iso) {
  const ms = Date.parse(iso) - Date.now();
  if (isNaN(ms)) return "";
  if (ms <= 0) return "expired";
  const s = Math.floor(ms / 1000);
  const h = Math.floor(s / 3600), m = Math.floor((s % 3600) / 60), r = s % 60;
  return (h ? h + "h " : "") + (h || m ? m + "m " : "") + r + "s left";
}

function tickCountdowns() {
  document.querySelectorAll(".countdown[data-expires]").forEach((el) => {
    const text = left(el.dataset.expires);
    if (text) {
      el.textContent = text;
      el.classList.toggle("expired", text === "expired");
    }
  });
}

function cell(tr, text) {
  const td = document.createElement("td");
  td.textContent = text;
  tr.appendChild(td);
  return td;
}

function setStep(stepId, state) {
  const g = document.querySelector('g.step[data-step="' + CSS.escape(stepId) + '"]');
  if (!g) return;
  if (state === "failed" && g.classList.contains("state-denied")) return;  // stays "denied"
  g.setAttribute("class", "step state-" + state);
  g.querySelectorAll(".state-name").forEach((t) => { t.textContent = state; });
}

function addPending(row) {
  const list = document.getElementById("pending");
  if (!list) return;
  const a = row.approval;
  const existing = list.querySelector('li[data-approval="' + CSS.escape(a.approval_id) + '"]');
  if (a.status !== "PENDING") {
    if (existing) existing.remove();
  } else if (!existing) {
    const none = list.querySelector("li.none");
    if (none) none.remove();
    const li = document.createElement("li");
    li.dataset.approval = a.approval_id;
    li.textContent = "step " + row.step_id + " · approval " + a.approval_id + " · rule " +
      (a.rule || "-") + " · ";
    const span = document.createElement("span");
    span.className = "countdown";
    span.dataset.expires = a.expires_at;
    li.appendChild(span);
    list.appendChild(li);
  }
  if (!list.querySelector("li")) {
    const li = document.createElement("li");
    li.className = "muted none";
    li.textContent = "none";
    list.appendChild(li);
  }
}

function addEvent(row) {
  const body = document.querySelector("#timeline tbody");
  if (body.querySelector('tr[data-seq="' + row.seq + '"]')) return;
  const tr = document.createElement("tr");
  tr.className = "stage-" + row.stage;
  tr.dataset.seq = String(row.seq);
  cell(tr, String(row.seq));
  cell(tr, (row.at || "").slice(11, 19));
  cell(tr, row.stage);
  cell(tr, row.step_id);
  const what = cell(tr, row.text);
  if (row.reasoning) {
    const div = document.createElement("div");
    div.className = "why";
    div.textContent = row.reasoning;
    what.appendChild(div);
  }
  if (row.alternatives && row.alternatives.length) {
    const ul = document.createElement("ul");
    ul.className = "alternatives";
    row.alternatives.forEach((alt) => {
      const li = document.createElement("li");
      li.textContent = alt;
      ul.appendChild(li);
    });
    what.appendChild(ul);
  }
  body.appendChild(tr);
  document.getElementById("run-stage").textContent = row.stage;
  document.body.dataset.lastSeq = String(row.seq);
  if (row.step_id && row.step_state) {
    setStep(row.step_id, row.step_state);
    document.getElementById("run-steps").textContent =
      String(document.querySelectorAll("g.step.state-done").length);
  }
  if (row.approval && row.approval.approval_id) addPending(row);
  tickCountdowns();
}

function follow(runId, after) {
  const status = document.getElementById("live-status");
  const source = new EventSource("/runs/" + encodeURIComponent(runId) + "/events?after=" + after);
  source.addEventListener("open", () => { status.textContent = "live"; });
  source.addEventListener("orchestration", (e) => addEvent(JSON.parse(e.data)));
  source.addEventListener("end", () => {
    source.close();
    status.textContent = "run ended; reloading";
    window.location.reload();
  });
  source.addEventListener("failure", (e) => {
    source.close();
    status.textContent = "live view stopped: " + JSON.parse(e.data).error;
  });
  source.addEventListener("error", () => {
    // The browser reconnects by itself with Last-Event-ID; say so meanwhile.
    if (source.readyState !== EventSource.CLOSED) status.textContent = "reconnecting";
  });
}

document.addEventListener("DOMContentLoaded", () => {
  tickCountdowns();
  setInterval(tickCountdowns, 1000);
  const body = document.body;
  if (body.dataset.live) follow(body.dataset.run, body.dataset.lastSeq || "0");
});
