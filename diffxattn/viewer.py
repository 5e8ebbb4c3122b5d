"""A self-contained interactive HTML page for per-word cross-attention heatmaps.

One file, no network: the image is an inline PNG data URI, the maps are JSON numbers, the CSS and JS
are inline, and a Content-Security-Policy meta forbids every remote load. The prompt is untrusted
text: it reaches the page only inside a ``<script type="application/json">`` block with ``<``, ``>``,
``&`` and U+2028/2029 escaped, and the page's JS inserts it with ``textContent`` only.
"""

from __future__ import annotations

import base64
import html
import io
import json
import os
import re
from pathlib import Path

import numpy as np
from PIL import Image

from .atomic import write_text

MAX_MAP_SIDE = 64
CSP = (
    "default-src 'none'; img-src data:; style-src 'unsafe-inline'; script-src 'unsafe-inline'; "
    "base-uri 'none'; form-action 'none'"
)
# Characters that could end the <script> block or start an HTML construct, or that old JS parsers
# treat as line terminators; \\u escapes keep the JSON identical after JSON.parse.
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def write_viewer(
    path: str | os.PathLike,
    *,
    prompt: str,
    image: Image.Image,
    words: list[str],
    maps: np.ndarray,
    steps: list[int] | None = None,
    layers: list[str] | None = None,
    layer_maps: np.ndarray | None = None,
    title: str = "diffxattn heatmaps",
) -> Path:
    """Write one HTML file showing ``image`` with a per-word attention overlay; return its path.

    ``maps`` is (S, W, h, w): per step bin, per word of ``words``, a non-negative low-res map.
    ``steps`` labels the S bins (default 0..S-1). ``layers`` + ``layer_maps`` (L, W, h, w), if given,
    add a second slider mode over layers.

    >>> write_viewer("out.html", prompt="a red circle", image=img, words=["a", "red", "circle"],
    ...              maps=np.random.rand(10, 3, 16, 16))
    """
    maps = _check_maps(np.asarray(maps), "maps", len(words))
    steps = list(range(maps.shape[0])) if steps is None else [int(s) for s in steps]
    if len(steps) != maps.shape[0]:
        raise ValueError(f"steps has {len(steps)} labels but maps has {maps.shape[0]} bins")
    if (layers is None) != (layer_maps is None):
        raise ValueError("pass layers and layer_maps together, or neither")
    if layer_maps is not None:
        layer_maps = _check_maps(np.asarray(layer_maps), "layer_maps", len(words))
        if len(layers) != layer_maps.shape[0]:
            raise ValueError(f"layers has {len(layers)} names but layer_maps has {layer_maps.shape[0]} layers")

    data = {
        "prompt": str(prompt),
        "words": [str(w) for w in words],
        "steps": steps,
        "maps": np.round(maps, 4).tolist(),
        "layers": None if layers is None else [str(name) for name in layers],
        "layer_maps": None if layer_maps is None else np.round(layer_maps, 4).tolist(),
    }
    fields = {
        "CSP": html.escape(CSP, quote=False),  # the attribute is "-quoted; keep the readable quotes
        "TITLE": html.escape(title),
        "CSS": VIEWER_CSS,
        "JS": VIEWER_JS,
        "VIEWER": VIEWER_HTML.replace("__IMAGE__", _png_data_uri(image)),
        "DATA": _script_safe_json(data),
    }
    # One pass, so text from a field (the title, the prompt) is never scanned for placeholders.
    page = re.sub(r"__([A-Z]+)__", lambda m: fields[m.group(1)], _PAGE)  # VIEWER carries no placeholder
    return write_text(Path(path), page)


def _check_maps(maps: np.ndarray, name: str, n_words: int) -> np.ndarray:
    if maps.ndim != 4:
        raise ValueError(f"{name} must be (bins, words, h, w), got shape {maps.shape}")
    if maps.shape[0] < 1:
        raise ValueError(f"{name} needs at least one bin")
    if maps.shape[1] != n_words:
        raise ValueError(f"{name} has {maps.shape[1]} word maps but there are {n_words} words")
    if max(maps.shape[2:]) > MAX_MAP_SIDE:
        raise ValueError(f"{name} maps are {maps.shape[2:]}; at most {MAX_MAP_SIDE}")
    maps = maps.astype(np.float64)
    if not np.isfinite(maps).all():
        raise ValueError(f"{name} contains NaN or inf")
    if (maps < 0).any():
        raise ValueError(f"{name} must be non-negative (attention probabilities)")
    return maps


def _png_data_uri(image: Image.Image) -> str:
    buf = io.BytesIO()
    image.convert("RGBA" if "A" in image.getbands() else "RGB").save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _script_safe_json(data: dict) -> str:
    text = json.dumps(data, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    for char, escaped in _JSON_ESCAPES.items():
        text = text.replace(char, escaped)
    return text


# The viewer's markup: word chips, the image and its overlay, the controls and the share chart. The standalone
# page below and the live app (serve/page.py) both embed it and drive it with VIEWER_JS's mountViewer(data).
VIEWER_HTML = """
<p id="prompt" class="prompt"></p>
<nav id="words" class="chips" aria-label="prompt words"></nav>
<div class="row">
  <figure><img id="raw" alt="generated image" src="__IMAGE__"><figcaption>image</figcaption></figure>
  <figure><canvas id="overlay" data-word="0"></canvas><figcaption id="caption"></figcaption></figure>
  <section class="controls">
    <label>overlay opacity <output id="opacity-value"></output>
      <input id="opacity" type="range" min="0" max="1" step="0.01" value="0.6"></label>
    <div id="mode" class="mode" hidden>
      <label><input type="radio" name="mode" value="steps" checked> slide over steps</label>
      <label><input type="radio" name="mode" value="layers"> slide over layers</label>
    </div>
    <label><span id="slider-name">step</span> <output id="step-value"></output>
      <input id="step" type="range" min="0" step="1"></label>
    <label class="check"><input id="cumulative" type="checkbox" checked> cumulative (sum from the first)</label>
    <div class="colorbar"><canvas id="colorbar" width="256" height="1"></canvas>
      <div class="ends"><span>low</span><span>per-word min&ndash;max</span><span>high</span></div></div>
  </section>
</div>
<section class="chart">
  <h2>share of attention per step bin</h2>
  <svg id="chart" viewBox="0 0 760 240" role="img" aria-label="share of attention per word"></svg>
  <div id="legend" class="legend"></div>
</section>
"""

_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta http-equiv="Content-Security-Policy" content="__CSP__">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>__TITLE__</title>
<style>__CSS__</style>
</head>
<body>
<header><h1>__TITLE__</h1></header>
<main>__VIEWER__</main>
<script type="application/json" id="data">__DATA__</script>
<script>__JS__
const img0 = document.getElementById("raw"), data0 = JSON.parse(document.getElementById("data").textContent);
if (img0.complete && img0.naturalWidth) mountViewer(data0); else img0.addEventListener("load", () => mountViewer(data0));
</script>
</body>
</html>
"""

VIEWER_CSS = """
:root { --fg: #1d1f23; --muted: #6b7079; --line: #dde0e5; --accent: #2563eb; }
* { box-sizing: border-box; }
body { margin: 0; padding: 20px 28px; background: #f6f7f9; color: var(--fg);
       font: 14px/1.45 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif; }
h1 { font-size: 18px; margin: 0 0 2px; }
h2 { font-size: 13px; font-weight: 600; color: var(--muted); margin: 0 0 6px; text-transform: uppercase;
     letter-spacing: .04em; }
.prompt { margin: 0 0 12px; color: var(--muted); white-space: pre-wrap; word-break: break-word; }
.chips { display: flex; flex-wrap: wrap; gap: 6px; margin-bottom: 16px; }
.chip { font: inherit; font-size: 15px; padding: 4px 10px 3px; border: 1px solid var(--line);
        border-bottom: 3px solid var(--c); border-radius: 6px; background: #fff; color: var(--fg);
        cursor: pointer; white-space: pre; }
.chip:hover { background: #eef2ff; }
.chip.selected { background: var(--fg); color: #fff; border-color: var(--fg); border-bottom-color: var(--c); }
.row { display: flex; flex-wrap: wrap; gap: 20px; align-items: flex-start; }
figure { margin: 0; background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 6px; }
figcaption { color: var(--muted); font-size: 12px; margin-top: 4px; min-height: 1.4em; }
#raw, #overlay { display: block; width: 384px; height: 384px; image-rendering: pixelated; }
.controls { display: flex; flex-direction: column; gap: 14px; width: 260px;
            background: #fff; border: 1px solid var(--line); border-radius: 8px; padding: 14px; }
.controls label { display: flex; flex-direction: column; gap: 4px; }
.controls label.check, .mode label { flex-direction: row; align-items: center; gap: 6px; }
.mode { display: flex; flex-direction: column; gap: 2px; }
.mode[hidden] { display: none; }
output { color: var(--muted); font-variant-numeric: tabular-nums; }
input[type=range] { width: 100%; accent-color: var(--accent); }
.colorbar canvas { width: 100%; height: 12px; border-radius: 3px; display: block; }
.colorbar .ends { display: flex; justify-content: space-between; color: var(--muted); font-size: 11px; }
.chart { margin-top: 20px; background: #fff; border: 1px solid var(--line); border-radius: 8px;
         padding: 12px 14px; max-width: 800px; }
#chart { width: 100%; height: auto; display: block; }
#chart text { font-size: 11px; fill: var(--muted); }
#chart .axis { stroke: #b9bdc4; }
#chart .grid { stroke: #eceef1; }
#chart .marker { stroke: var(--fg); stroke-dasharray: 3 3; }
#chart .series { fill: none; stroke-width: 1.5; opacity: .35; }
#chart .series.selected { stroke-width: 3.5; opacity: 1; }
#chart .dot { opacity: .35; }
#chart .dot.selected { opacity: 1; }
.legend { display: flex; flex-wrap: wrap; gap: 4px 14px; margin-top: 6px; }
.legend span { cursor: pointer; white-space: pre; color: var(--muted); }
.legend span::before { content: ""; display: inline-block; width: 14px; height: 3px; margin: 0 5px 3px 0;
                       background: var(--c); vertical-align: middle; }
.legend span.selected { color: var(--fg); font-weight: 600; }
"""

VIEWER_JS = r"""
"use strict";
// mountViewer(data) shows one image's maps: data = {prompt, words, steps, maps, layers, layer_maps}, #raw
// holding the image (loaded). It may be called again with another image's data (the live app does).
let D = null, shares = [];
const $ = (id) => document.getElementById(id);
const PALETTE = ["#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd",
                 "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22", "#17becf"];
const color = (w) => PALETTE[w % PALETTE.length];
const SVGNS = document.getElementById("chart").namespaceURI;  // no URL literal in the page
const state = { word: 0, step: 0, opacity: 0.6, mode: "steps", cumulative: true, preview: null, ready: false };
window.viewerState = state;

// Turbo colormap, polynomial fit (Mikhailov 2019): x in [0, 1] -> [r, g, b] in 0..255.
function turbo(x) {
  x = Math.min(1, Math.max(0, x));
  const x2 = x * x, x3 = x2 * x, x4 = x3 * x, x5 = x4 * x;
  const r = 0.13572138 + 4.61539260 * x - 42.66032258 * x2 + 132.13108234 * x3 - 152.94239396 * x4 + 59.28637943 * x5;
  const g = 0.09140261 + 2.19418839 * x + 4.84296658 * x2 - 14.18503333 * x3 + 4.27729857 * x4 + 2.82956604 * x5;
  const b = 0.10667330 + 12.64194608 * x - 60.58204836 * x2 + 110.36276771 * x3 - 89.90310912 * x4 + 27.34824973 * x5;
  return [r, g, b].map((v) => Math.round(255 * Math.min(1, Math.max(0, v))));
}

function stack() { return state.mode === "layers" ? D.layer_maps : D.maps; }

// The shown map of word w: bin k alone, or bins 0..k summed; min-max normalised to [0, 1].
function currentMap(w) {
  const bins = stack(), k = state.step, h = bins[0][w].length, wd = bins[0][w][0].length;
  const out = new Float32Array(h * wd);
  for (let s = state.cumulative ? 0 : k; s <= k; s++) {
    const m = bins[s][w];
    for (let y = 0; y < h; y++) for (let x = 0; x < wd; x++) out[y * wd + x] += m[y][x];
  }
  let lo = Infinity, hi = -Infinity;
  for (const v of out) { lo = Math.min(lo, v); hi = Math.max(hi, v); }
  for (let i = 0; i < out.length; i++) out[i] = hi > lo ? (out[i] - lo) / (hi - lo) : 0;
  return { data: out, h: h, w: wd };
}

const img = $("raw"), canvas = $("overlay"), ctx = canvas.getContext("2d");
const lowres = document.createElement("canvas"), lowctx = lowres.getContext("2d");

function drawOverlay() {
  const w = state.preview ?? state.word, m = currentMap(w);
  lowres.width = m.w; lowres.height = m.h;
  const px = lowctx.createImageData(m.w, m.h);
  m.data.forEach((v, i) => { px.data.set(turbo(v), 4 * i); px.data[4 * i + 3] = 255; });
  lowctx.putImageData(px, 0, 0);
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = false;  // the image keeps its pixels ...
  ctx.drawImage(img, 0, 0, canvas.width, canvas.height);
  ctx.imageSmoothingEnabled = true;   // ... the low-res map is bilinearly upsampled
  ctx.globalAlpha = state.opacity;
  ctx.drawImage(lowres, 0, 0, canvas.width, canvas.height);
  ctx.globalAlpha = 1;
  canvas.dataset.word = String(state.word);
  canvas.dataset.shown = String(w);
  $("caption").textContent = "\u201c" + D.words[w] + "\u201d \u00b7 " + sliderText();
}

function sliderText() {
  const k = state.step;
  if (state.mode === "layers") {
    return state.cumulative ? (k === D.layers.length - 1 ? "all layers summed"
                                : "layers " + D.layers[0] + " \u2026 " + D.layers[k] + " summed")
                            : "layer " + D.layers[k];
  }
  return state.cumulative ? (k === D.steps.length - 1 ? "all steps summed"
                              : "steps " + D.steps[0] + "\u2013" + D.steps[k] + " summed")
                          : "step " + D.steps[k];
}

// share[w][s] = sum of word w's map at bin s / sum over all words at bin s.
function computeShares() {
  const tot = D.words.map((_, w) => D.maps.map((bin) => bin[w].flat().reduce((a, b) => a + b, 0)));
  return tot.map((row) => row.map((v, s) => {
    const all = tot.reduce((a, r) => a + r[s], 0);
    return all > 0 ? v / all : 0;
  }));
}

function el(tag, attrs, parent) {
  const e = document.createElementNS(SVGNS, tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  parent.appendChild(e);
  return e;
}

function drawChart() {
  const svg = $("chart"), W = 760, H = 240, L = 44, R = 12, T = 10, B = 30;
  svg.replaceChildren();
  // y axis: 0 .. a round share just above the largest, in 4-6 ticks
  const S = D.steps.length, top = Math.max(...shares.flat(), 0.01);
  const tick = top <= 0.3 ? 0.05 : top <= 0.6 ? 0.1 : 0.2, nticks = Math.ceil(top / tick - 1e-9);
  const ymax = tick * nticks;
  const X = (s) => S === 1 ? (L + W - R) / 2 : L + (s / (S - 1)) * (W - L - R);
  const Y = (v) => H - B - (v / ymax) * (H - T - B);
  for (let i = 0; i <= nticks; i++) {
    const v = tick * i;
    el("line", { x1: L, x2: W - R, y1: Y(v), y2: Y(v), class: i ? "grid" : "axis" }, svg);
    el("text", { x: L - 6, y: Y(v) + 4, "text-anchor": "end" }, svg).textContent = Math.round(100 * v) + "%";
  }
  const every = Math.ceil(S / 12);
  D.steps.forEach((label, s) => {
    if (s % every && s !== S - 1) return;
    el("text", { x: X(s), y: H - B + 16, "text-anchor": "middle" }, svg).textContent = String(label);
  });
  el("text", { x: W - R, y: H - 2, "text-anchor": "end" }, svg).textContent = "step bin";
  if (state.mode === "steps") {
    el("line", { x1: X(state.step), x2: X(state.step), y1: T, y2: H - B, class: "marker" }, svg);
  }
  const order = D.words.map((_, w) => w).filter((w) => w !== state.word).concat([state.word]);
  for (const w of order) {  // selected word drawn last, on top
    const cls = "series" + (w === state.word ? " selected" : "");
    const pts = shares[w].map((v, s) => X(s).toFixed(1) + "," + Y(v).toFixed(1)).join(" ");
    el("polyline", { points: pts, class: cls, stroke: color(w), "data-word": w }, svg);
    if (S <= 30) shares[w].forEach((v, s) =>
      el("circle", { cx: X(s), cy: Y(v), r: w === state.word ? 3.5 : 2, fill: color(w),
                     class: w === state.word ? "dot selected" : "dot" }, svg));
  }
}

function refresh() {
  document.querySelectorAll(".chip, .legend span").forEach((e) =>
    e.classList.toggle("selected", Number(e.dataset.word) === state.word));
  $("opacity-value").textContent = state.opacity.toFixed(2);
  $("step-value").textContent = sliderText();
  drawOverlay();
  drawChart();
}

function select(w) { state.word = w; refresh(); }

function buildWords() {
  $("prompt").textContent = D.prompt;
  $("words").replaceChildren(); $("legend").replaceChildren();
  D.words.forEach((word, w) => {
    const chip = document.createElement("button");
    chip.type = "button"; chip.className = "chip"; chip.textContent = word;
    chip.dataset.word = String(w); chip.title = "word " + w; chip.style.setProperty("--c", color(w));
    chip.addEventListener("click", () => select(w));
    chip.addEventListener("mouseenter", () => { state.preview = w; drawOverlay(); });
    chip.addEventListener("mouseleave", () => { state.preview = null; drawOverlay(); });
    $("words").appendChild(chip);
    const item = document.createElement("span");
    item.textContent = word; item.dataset.word = String(w); item.style.setProperty("--c", color(w));
    item.addEventListener("click", () => select(w));
    $("legend").appendChild(item);
  });
}

function setMode(mode) {
  state.mode = mode;
  const n = stack().length;
  $("slider-name").textContent = mode === "layers" ? "layer" : "step";
  $("step").max = String(n - 1); $("step").value = String(n - 1); state.step = n - 1;
  $("step").disabled = n === 1;
  refresh();
}

function colorbar() {
  const cb = $("colorbar").getContext("2d"), px = cb.createImageData(256, 1);
  for (let i = 0; i < 256; i++) { px.data.set(turbo(i / 255), 4 * i); px.data[4 * i + 3] = 255; }
  cb.putImageData(px, 0, 0);
}

let controlsBound = false;
function bindControls() {
  colorbar();
  $("opacity").addEventListener("input", (e) => { state.opacity = Number(e.target.value); refresh(); });
  $("step").addEventListener("input", (e) => { state.step = Number(e.target.value); refresh(); });
  $("cumulative").addEventListener("change", (e) => { state.cumulative = e.target.checked; refresh(); });
  document.querySelectorAll("input[name=mode]").forEach((r) =>
    r.addEventListener("change", (e) => setMode(e.target.value)));
  state.opacity = Number($("opacity").value);
  controlsBound = true;
}

function mountViewer(data) {
  if (!controlsBound) bindControls();
  D = data; shares = computeShares();
  // Canvas pixels: at least 384 on the long side so the upsampled map is smooth; CSS size 384.
  const nw = img.naturalWidth, nh = img.naturalHeight, scale = Math.max(1, Math.ceil(384 / Math.max(nw, nh)));
  canvas.width = nw * scale; canvas.height = nh * scale;
  for (const e of [img, canvas]) {
    e.style.width = (384 * nw) / Math.max(nw, nh) + "px"; e.style.height = (384 * nh) / Math.max(nw, nh) + "px";
  }
  state.word = Math.min(state.ready ? state.word : 1, D.words.length - 1); state.preview = null;
  buildWords();
  $("mode").hidden = !D.layer_maps;
  document.querySelector("input[name=mode][value=steps]").checked = true;
  setMode("steps");
  state.ready = true;
}
window.mountViewer = mountViewer;
"""
