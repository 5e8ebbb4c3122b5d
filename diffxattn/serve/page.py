"""The live app's page: one HTML document, everything inline (no CDN, no file from elsewhere).

It embeds the heatmap viewer's own markup, CSS and JS (`viewer.VIEWER_HTML/CSS/JS`) and drives it with
`mountViewer(data)` after each run; around it: the prompt form, a streamed progress bar, the per-word weight
sliders, the edit box, the source/edit pair and the download links. Text from prompts is only ever inserted
with `textContent` or form values, never as HTML.
"""

from __future__ import annotations

import re

from ..viewer import VIEWER_CSS, VIEWER_HTML, VIEWER_JS

# inline CSS and JS are the page's own; connect-src 'self' lets it talk to this server only
CSP = ("default-src 'none'; img-src 'self' data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
       "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")

_BLANK = "data:image/gif;base64,R0lGODlhAQABAAAAACH5BAEKAAEALAAAAAABAAEAAAICTAEAOw=="  # 1x1 transparent

_APP_HTML = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>diffxattn live</title>
<style>__VIEWERCSS__
__APPCSS__</style>
</head>
<body>
<header class="top"><h1>diffxattn <span class="muted">live</span></h1>
  <span id="status" class="status loading">loading model&hellip;</span></header>
<section class="panel form">
  <label class="wide">prompt <span class="muted">&mdash; weights: (red:1.5), red++, [red]; over steps: [red:blue:0.5]</span>
    <input id="prompt-input" type="text" spellcheck="false" autocomplete="off" value="a red circle at the left"></label>
  <div id="prompt-error" class="error" role="alert" hidden></div>
  <div class="fields">
    <label>seed <input id="seed" type="number" min="0" step="1" value="0"></label>
    <label>steps <input id="steps" type="number" min="1" step="1"></label>
    <label>guidance <input id="guidance" type="number" min="1" max="100" step="0.5"></label>
    <label>sampler <select id="sampler"></select></label>
    <label>weight mode <select id="weight-mode">
      <option value="attention">attention</option><option value="embedding">embedding</option>
      <option value="embedding-a1111">embedding-a1111</option></select></label>
    <button id="generate" type="button" disabled>Generate</button>
    <button id="cancel" type="button" disabled>Cancel</button>
  </div>
  <div class="progress"><progress id="progress" max="1" value="0"></progress><span id="progress-text"></span></div>
  <div id="message" class="error" role="alert" hidden></div>
</section>
<section class="panel edit">
  <h2>edit (prompt-to-prompt)</h2>
  <div class="fields">
    <label class="wide">edited prompt <input id="edit-to" type="text" spellcheck="false" autocomplete="off"
      value="a blue circle at the left"></label>
    <label>local blend words <input id="blend" type="text" placeholder="e.g. circle"></label>
    <label class="check"><input id="feature" type="checkbox"> feature injection (attribute edits)</label>
    <button id="edit" type="button" disabled>Edit</button>
  </div>
  <div id="to-error" class="error" role="alert" hidden></div>
  <div id="pair" class="row" hidden>
    <figure><img id="source-image" class="pixel" alt="source image" src="__BLANK__"><figcaption>source</figcaption></figure>
    <figure><img id="edited-image" class="pixel" alt="edited image" src="__BLANK__"><figcaption>edit</figcaption></figure>
  </div>
</section>
<main id="viewer" class="panel" hidden>__VIEWER__</main>
<section id="weights-panel" class="panel" hidden>
  <h2>word weights <span class="muted">(regenerates with the same seed)</span></h2>
  <div id="weights" class="weights"></div>
</section>
<section id="downloads" class="panel" hidden>
  <h2>downloads</h2>
  <div class="links"><a id="dl-image" download>image.png</a><a id="dl-maps" download>maps.safetensors</a>
    <a id="dl-meta" download>maps.json</a><a id="dl-command" download>command.txt</a></div>
  <pre id="command"></pre>
</section>
<script>__VIEWERJS__
__APPJS__</script>
</body>
</html>
"""

_APP_CSS = """
.top { display: flex; align-items: baseline; gap: 16px; }
.muted { color: var(--muted); font-weight: normal; font-size: 12px; }
.panel { background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 12px 14px; margin: 0 0 14px; }
.panel h2 { margin-bottom: 8px; }
.fields { display: flex; flex-wrap: wrap; gap: 10px 14px; align-items: flex-end; }
.form label, .edit label { display: flex; flex-direction: column; gap: 3px; font-size: 12px; color: var(--muted); }
label.wide { flex: 1 1 420px; }
label.check { flex-direction: row; align-items: center; gap: 6px; }
input[type=text], input[type=number], select { font: inherit; font-size: 14px; padding: 5px 7px; color: var(--fg);
  border: 1px solid var(--line); border-radius: 5px; background: #fff; }
input[type=number] { width: 90px; }
#prompt-input, #edit-to { width: 100%; font-family: ui-monospace, monospace; }
button { font: inherit; padding: 6px 16px; border-radius: 6px; border: 1px solid var(--accent); background: var(--accent);
  color: #fff; cursor: pointer; }
button:disabled { opacity: .45; cursor: default; }
#cancel { background: #fff; color: var(--fg); border-color: var(--line); }
.progress { display: flex; align-items: center; gap: 10px; margin-top: 10px; }
#progress { width: 320px; height: 10px; accent-color: var(--accent); }
#progress-text { color: var(--muted); font-size: 12px; font-variant-numeric: tabular-nums; }
.error { color: #b42318; background: #fef3f2; border: 1px solid #fecdca; border-radius: 5px; padding: 6px 9px;
  margin-top: 8px; white-space: pre-wrap; font-family: ui-monospace, monospace; font-size: 12px; }
.error[hidden], [hidden] { display: none !important; }
.status { font-size: 12px; padding: 2px 8px; border-radius: 10px; background: #eef2ff; color: var(--accent); }
.status.loading { background: #fffaeb; color: #b54708; }
.status.failed { background: #fef3f2; color: #b42318; }
.pixel { display: block; width: 256px; height: 256px; image-rendering: pixelated; }
#pair { margin-top: 12px; }
.weights { display: grid; grid-template-columns: repeat(auto-fill, minmax(200px, 1fr)); gap: 8px 18px; }
.weights label { display: grid; grid-template-columns: 1fr 44px; gap: 2px 6px; font-size: 13px; }
.weights label span { white-space: pre; overflow: hidden; text-overflow: ellipsis; }
.weights label input { grid-column: 1 / 3; }
.links { display: flex; gap: 14px; flex-wrap: wrap; }
.links a { color: var(--accent); }
#command { background: #f6f7f9; border: 1px solid var(--line); border-radius: 5px; padding: 8px; margin: 10px 0 0;
  white-space: pre-wrap; word-break: break-all; font-size: 12px; }
main#viewer { display: block; }
"""

_APP_JS = r"""
const app = { ready: false, run: null, source: null, result: null, runs: 0, errors: 0 };
window.appState = app;
const form = { prompt: $("prompt-input"), seed: $("seed"), steps: $("steps"), guidance: $("guidance"),
               sampler: $("sampler"), mode: $("weight-mode") };

function show(id, text) { const e = $(id); e.textContent = text || ""; e.hidden = !text; }
function status(text, cls) { const s = $("status"); s.textContent = text; s.className = "status " + (cls || ""); }
function busy(on) { $("cancel").disabled = !on; }

async function waitForModel() {
  for (;;) {
    let j;
    try { j = await (await fetch("/api/status?wait=5")).json(); }
    catch (e) { await new Promise((r) => setTimeout(r, 1000)); continue; }
    if (j.error) { status("model failed to load", "failed"); show("message", j.error); return; }
    if (!j.ready) continue;
    for (const name of j.samplers) {
      const o = document.createElement("option"); o.value = o.textContent = name; form.sampler.appendChild(o);
    }
    form.sampler.value = j.defaults.sampler; form.steps.value = j.defaults.steps; form.guidance.value = j.defaults.guidance;
    app.ready = true; status("ready");
    $("generate").disabled = false; $("edit").disabled = false;
    return;
  }
}

function settings() {
  return { prompt: form.prompt.value, seed: form.seed.value, steps: form.steps.value, guidance: form.guidance.value,
           sampler: form.sampler.value, weight_mode: form.mode.value };
}

async function submit(body) {
  show("prompt-error"); show("to-error"); show("message");
  let r, j;
  try {
    r = await fetch("/api/runs", { method: "POST", headers: { "Content-Type": "application/json" },
                                    body: JSON.stringify(body) });
    j = await r.json();
  } catch (e) { show("message", "the server did not answer: " + e); return; }
  if (!r.ok) {
    app.errors++;
    const where = j.field === "prompt" ? "prompt-error" : j.field === "to" ? "to-error" : "message";
    show(where, j.error);
    return;
  }
  if (body.weights) form.prompt.value = j.prompt;  // the slider's weight, written into the prompt
  follow(j.run, j.steps);
}

function follow(id, total) {
  if (app.source) app.source.close();
  app.run = id; busy(true);
  $("progress").max = total; $("progress").value = 0; $("progress-text").textContent = "queued";
  const es = new EventSource("/api/runs/" + id + "/events");
  app.source = es;
  const mine = (fn) => (e) => { if (app.run === id) fn(JSON.parse(e.data)); };
  es.addEventListener("running", mine(() => { $("progress-text").textContent = "sampling"; }));
  es.addEventListener("progress", mine((d) => {
    $("progress").max = d.total; $("progress").value = d.step;
    $("progress-text").textContent = "step " + d.step + " / " + d.total;
  }));
  const end = (text) => { es.close(); if (app.run === id) { busy(false); $("progress-text").textContent = text; } };
  es.addEventListener("done", (e) => { end("done"); if (app.run === id) render(JSON.parse(e.data)); });
  es.addEventListener("failed", (e) => {
    end("failed"); if (app.run === id) { app.errors++; show("message", JSON.parse(e.data).message); }
  });
  es.onerror = () => { if (es.readyState === EventSource.CLOSED) end("connection lost"); };
  es.addEventListener("cancelled", (e) => end(JSON.parse(e.data).reason || "cancelled"));
}

function render(r) {
  app.result = r; app.runs++;
  $("pair").hidden = r.kind !== "edit";
  if (r.kind === "edit") { $("source-image").src = r.source; $("edited-image").src = r.image; }
  const img = $("raw");
  img.onload = () => { $("viewer").hidden = false; mountViewer(r.viewer); app.shown = r.run; };
  img.src = r.image;
  buildWeights(r);
  const base = "/api/runs/" + r.run + "/";
  $("dl-image").href = base + "image.png"; $("dl-maps").href = base + "maps.safetensors";
  $("dl-meta").href = base + "maps.json"; $("dl-command").href = base + "command.txt";
  $("command").textContent = r.command;
  $("downloads").hidden = false;
}

function buildWeights(r) {
  const box = $("weights");
  box.replaceChildren();
  $("weights-panel").hidden = !r.weightable;
  if (!r.weightable) return;
  r.viewer.words.forEach((word, w) => {
    const label = document.createElement("label"), name = document.createElement("span");
    const value = document.createElement("output"), slider = document.createElement("input");
    name.textContent = word; name.title = word;
    slider.type = "range"; slider.min = "0"; slider.max = "2"; slider.step = "0.05";
    slider.value = String(r.weights[w]); slider.dataset.word = String(w);
    value.textContent = Number(r.weights[w]).toFixed(2);
    slider.addEventListener("input", () => { value.textContent = Number(slider.value).toFixed(2); });
    // on release only: a drag is one run (and the server cancels a run a newer one supersedes)
    slider.addEventListener("change", () => {
      const weights = {}; weights[w] = Number(slider.value);
      submit({ ...settings(), prompt: r.prompt, seed: r.seed, kind: "generate", weights: weights });
    });
    label.append(name, value, slider);
    box.appendChild(label);
  });
}

$("generate").addEventListener("click", () => submit({ ...settings(), kind: "generate" }));
form.prompt.addEventListener("keydown", (e) => { if (e.key === "Enter" && app.ready) submit({ ...settings(), kind: "generate" }); });
$("edit").addEventListener("click", () => submit({ ...settings(), kind: "edit", to: $("edit-to").value,
  local_blend: $("blend").value, feature_injection: $("feature").checked }));
$("cancel").addEventListener("click", () => {
  if (app.run !== null) fetch("/api/runs/" + app.run + "/cancel", { method: "POST" });
});
waitForModel();
"""


def app_page() -> str:
    """The page's HTML (the same for every request: all data comes from the API)."""
    fields = {"VIEWERCSS": VIEWER_CSS, "APPCSS": _APP_CSS, "VIEWERJS": VIEWER_JS, "APPJS": _APP_JS,
              "VIEWER": VIEWER_HTML.replace("__IMAGE__", _BLANK), "BLANK": _BLANK}
    return re.sub(r"__([A-Z]+)__", lambda m: fields[m.group(1)], _APP_HTML)
