"""Regenerate `samples/`: prompt gallery, heatmap examples (+ viewer screenshot), edit and reweight strips,
accuracy against training time, and accuracy against the guidance scale per sampler.

    diffxattn samples [--pipeline pipelines/shapes-32] [--curve pipelines/shapes-32/curve.json]
                      [--guidance-reports EVAL.json ...] -o samples
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image, ImageDraw

from .atomic import save_image
from .control import AttentionStore, StepRange
from .generation import edit, generate
from .heatmaps import export
from .images import labelled_grid

GALLERY = [
    "a red circle at the left", "a blue square at the top", "a green triangle at the right",
    "a large yellow circle in the center", "a small purple diamond at the bottom", "an orange square on the left",
    "a red circle left of a blue square", "a green square above a purple circle",
    "a yellow triangle right of a blue diamond", "a small orange circle below a large green square",
    "a red triangle at the top", "a blue circle at the right",  # the last two are held-out combinations
]
FEATURES = {"feature_replace": StepRange.fraction(0, 0.8)}
EDITS = [  # (source, target, edit options)
    ("a red circle at the left", "a blue circle at the left", {}),
    ("a red circle at the left", "a blue circle at the left", FEATURES),
    ("a green square at the top", "a green triangle at the top", {}),
    ("a green square at the top", "a green triangle at the top", FEATURES),
    ("a purple diamond at the right", "a large purple diamond at the right", {}),
    ("a red circle left of a blue square", "a red circle left of a yellow square", {}),
]
REWEIGHT = ("a (red:{w}) circle at the left", (0.25, 0.5, 1.0, 1.5, 2.0, 3.0))
HEATMAP_PROMPT = "a red circle left of a blue square"
# attention-guided sampling: (prompt, method, guide options); for each, the first seed whose plain image fails
GUIDED = [
    ("a red circle left of a blue square", "arrange", dict(arrange="auto")),
    ("a green triangle above a yellow square", "arrange", dict(arrange="auto")),
    ("a blue circle", "box", dict(boxes=(("circle", (0.05, 0.05, 0.5, 0.5)),))),
    ("a red circle above a blue square", "boxes", dict(boxes=(("circle", (0.55, 0.05, 0.95, 0.45)),
                                                             ("square", (0.05, 0.55, 0.45, 0.95))))),
]
GUIDED_SEEDS = 8  # seeds searched for a failure of plain sampling
# inverted and edited: renders of never-seen scenes of the shapes data, and one image drawn here by hand
INVERSION_SCENES = (0, 2, 5)  # scenes of the shapes generator with seed 90210 (bench/bench_inversion.py's renders)
HAND_DRAWN = ("a green triangle at the right", "a blue triangle at the right")


def hand_drawn(size: int = 32) -> Image.Image:
    """A lopsided green triangle drawn with PIL, not by the data generator (its shapes are exact and centred)."""
    image = Image.new("RGB", (size, size), "black")
    s = size / 32
    ImageDraw.Draw(image).polygon([(19 * s, 22 * s), (29 * s, 24 * s), (25 * s, 9 * s)], fill=(40, 190, 60))
    return image


def inversion_examples(pipe) -> list[tuple[str, Image.Image, str]]:
    """(prompt, image, edited prompt): renders of never-seen scenes with their first color swapped, and the
    hand-drawn triangle."""
    from .data.shapes import ShapesConfig, render, sample_scene
    from .eval.prompts import color_swap

    examples = []
    for k in INVERSION_SCENES:
        scene = sample_scene(ShapesConfig(seed=90210, size=pipe.unet.config.sample_size), k)
        examples.append((scene.caption, Image.fromarray(render(scene)[0]), color_swap(scene.caption)))
    return examples + [(HAND_DRAWN[0], hand_drawn(pipe.unet.config.sample_size), HAND_DRAWN[1])]


def inversion_grid(pipe) -> Image.Image:
    """Per example: the input, the pipeline's image from its inversion, and the color edit of that image."""
    from .data.captions import SHAPES
    from .inversion import invert, reconstruct

    cells = []
    for prompt, image, target in inversion_examples(pipe):
        inv = invert(pipe, image, prompt)
        shape = next(w for w in prompt.split() if w in SHAPES)
        edited = edit(pipe, prompt, target, inversion=inv, local_blend=[shape], **FEATURES).edited
        cells += [(f"input: {prompt}", image), ("inverted, drawn again", reconstruct(pipe, inv).images[0]),
                  (f"edit: {target}", edited)]
    return labelled_grid(cells, columns=3)


def line_chart(points: dict[str, list[tuple[float, float]]], title: str, xlabel: str, size=(640, 360)) -> Image.Image:
    """A small line chart (values in [0, 1]) drawn with PIL: one polyline per series, legend at the right."""
    w, h = size
    left, right, top, bottom = 50, 170, 30, 40
    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.text((left, 8), title, fill="black")
    xmax = max((x for pts in points.values() for x, _ in pts), default=1) or 1
    to_px = lambda x, y: (left + x / xmax * (w - left - right), h - bottom - y * (h - top - bottom))  # noqa: E731
    for frac in (0, 0.25, 0.5, 0.75, 1.0):
        _, y = to_px(0, frac)
        d.line([(left, y), (w - right, y)], fill=(225, 225, 225))
        d.text((8, y - 6), f"{frac:.2f}", fill="black")
    d.text(((left + w - right) // 2 - 30, h - 18), xlabel, fill="black")
    for x in _ticks(xmax):
        px, py = to_px(x, 0)
        d.line([(px, py), (px, py + 4)], fill="black")
        d.text((px - 6, py + 6), f"{x:g}", fill="black")
    colors = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189)]
    for k, (name, pts) in enumerate(points.items()):
        c = colors[k % len(colors)]
        xy = [to_px(x, y) for x, y in sorted(pts)]
        if len(xy) > 1:
            d.line(xy, fill=c, width=2)
        for px, py in xy:
            d.ellipse([px - 3, py - 3, px + 3, py + 3], fill=c)
        d.text((w - right + 10, top + 16 * k), name, fill=c)
    return img


def _ticks(xmax: float, most: int = 6) -> list[float]:
    """0 and the multiples of a round step (1, 2 or 5 x 10^k) up to `xmax`, at most `most` steps."""
    step = next(m * 10.0 ** e for e in range(-3, 10) for m in (1, 2, 5) if xmax / (m * 10.0 ** e) <= most)
    return [round(i * step, 6) for i in range(int(xmax / step + 1e-9) + 1)]


def _seed(s: int) -> torch.Generator:
    return torch.Generator().manual_seed(s)


def guidance_curve(report: dict, name: str) -> list[tuple[float, float]]:
    """(guidance scale, all-correct) of one prompt set of an eval report: its guidance curve plus its main scale
    (scored in its "sets"), sorted by scale."""
    curve = {float(g): v[name] for g, v in report["guidance"].items()}
    curve.setdefault(float(report["config"]["guidance_scale"]), report["sets"][name]["all"])
    return sorted(curve.items())


def guidance_chart(reports: list[dict]) -> Image.Image:
    """All-correct accuracy against the guidance scale: one panel per prompt set, one line per eval report
    (labelled with its sampler and settings)."""
    def label(report: dict) -> str:
        c = report["config"]
        words = [c.get("scheduler", "?"), f"{c['steps']} steps"]
        if c.get("scheduler_config", {}).get("clip_sample"):
            words.append("clip_sample")
        if c.get("guidance_rescale"):
            words.append(f"rescale {c['guidance_rescale']:g}")
        if c.get("guidance_interval", [0, 1]) != [0, 1]:
            words.append(f"interval {c['guidance_interval'][0]:g}-{c['guidance_interval'][1]:g}")
        return " ".join(words)

    names = [n for n in ("single", "two", "heldout") if any(n in r["sets"] for r in reports)]
    panels = [line_chart({label(r): guidance_curve(r, name) for r in reports},
                         f"{name}: all-correct vs guidance", "guidance scale") for name in names]
    canvas = Image.new("RGB", (sum(p.width for p in panels), panels[0].height), "white")
    for k, panel in enumerate(panels):
        canvas.paste(panel, (k * panel.width, 0))
    return canvas


def make_samples(pipe, out: str | Path, *, seed: int = 0, curve: str | Path | None = None,
                 screenshot: bool = True, guidance_reports: list[str | Path] = ()) -> list[Path]:
    """Write every sample image into `out`; returns the paths written."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    written = []

    images = pipe(GALLERY, generator=[_seed(seed) for _ in GALLERY]).images
    save_image(labelled_grid(list(zip(GALLERY, images)), columns=6), out / "gallery.png")
    written.append(out / "gallery.png")

    with AttentionStore(pipe, per_layer=True) as store:
        image = pipe(HEATMAP_PROMPT, generator=_seed(seed)).images[0]
    export(out / "heatmaps", store, image, HEATMAP_PROMPT, seed=seed)
    written.append(out / "heatmaps" / "grid.png")
    if screenshot:
        try:
            from .browser import chromium_available, screenshot as take

            if chromium_available():
                written.append(take(out / "heatmaps" / "index.html", out / "viewer.png"))
        except ImportError:  # selenium is a test extra
            print("selenium not installed: skipped the viewer screenshot")
        try:
            written.append(app_screenshot(pipe, out / "serve.png", seed=seed))
        except ImportError as e:  # selenium: a test extra; starlette/uvicorn: the serve extra
            print(f"{e.name} not installed: skipped the live app screenshot")

    cells = []
    for source, target, options in EDITS:
        src, tgt = edit(pipe, source, target, seed=seed, **options)
        how = f"edit, features {options['feature_replace'].end:g}" if options else "edit"
        cells += [(f"source: {source}", src), (f"{how}: {target}", tgt)]
    save_image(labelled_grid(cells, columns=4), out / "edits.png")
    written.append(out / "edits.png")

    save_image(inversion_grid(pipe), out / "inversion.png")
    written.append(out / "inversion.png")

    save_image(guided_strip(pipe, seed=seed), out / "guided.png")
    written.append(out / "guided.png")

    template, weights = REWEIGHT
    strip = [(f"{mode}: {template.format(w=w)}",
              generate(pipe, template.format(w=w), weight_mode=mode, generator=_seed(seed)).images[0])
             for mode in ("attention", "embedding") for w in weights]
    save_image(labelled_grid(strip, columns=len(weights)), out / "reweight.png")
    written.append(out / "reweight.png")

    if curve is not None and Path(curve).is_file():
        data = json.loads(Path(curve).read_text())  # [{"step":, "minutes":, "single":, "two":, "heldout":}, ...]
        series = {name: [(p["minutes"], p[name]) for p in data if p.get(name) is not None]
                  for name in ("single", "two", "heldout")}
        save_image(line_chart(series, "all-correct accuracy vs training time", "training minutes"), out / "accuracy.png")
        written.append(out / "accuracy.png")
    if guidance_reports:
        guidance_chart([json.loads(Path(r).read_text()) for r in guidance_reports]).save(out / "guidance.png")
        written.append(out / "guidance.png")
    return written


def _box_failure(image, prompt: str, boxes=()) -> str | None:
    """Why a boxed image fails: its prompt's failure, or a boxed object's detected box off its requested one (the
    object whose shape is the boxed word)."""
    import numpy as np

    from .data.captions import parse_caption_words
    from .eval.detector import detect, failure_of
    from .eval.metrics import object_box_iou

    pixels = np.asarray(image)
    detections = detect(pixels)
    failure = failure_of(prompt, detections, pixels.shape[0])
    if failure:
        return failure
    objects = parse_caption_words(prompt)[0]["objects"] if boxes else []
    for word, box in boxes:
        index = next((k for k, o in enumerate(objects) if o["shape"] == word), 0)
        iou = object_box_iou(prompt, detections, box, pixels.shape[0], index)
        if iou < 0.5:
            return f"{word} off its box (IoU {iou:.2f})"
    return None


def guided_strip(pipe, *, seed: int = 0) -> Image.Image:
    """For each of `GUIDED`: the first of `GUIDED_SEEDS` seeds from `seed` whose plain image fails (by the eval
    detector; for a box, also an object box with IoU < 0.5), next to the guided image of the same seed, each
    labelled with the detector's verdict. Not a selection of successes: the guided image is shown either way."""
    from .control.guided import Guide

    cells = []
    for prompt, method, options in GUIDED:
        boxes = options.get("boxes", ())
        seeds = range(seed, seed + GUIDED_SEEDS)
        plain = pipe([prompt] * len(seeds), generator=[_seed(s) for s in seeds]).images
        failures = [_box_failure(image, prompt, boxes) for image in plain]
        k = next((k for k, f in enumerate(failures) if f), 0)
        guided = generate(pipe, prompt, guide=Guide(**options), generator=_seed(seeds[k])).images[0]
        verdict = _box_failure(guided, prompt, boxes)
        images = [plain[k], guided]
        if boxes:
            images = [_outlined(image, [box for _, box in boxes]) for image in images]
        plain_verdict = failures[k] or f"correct (all {len(seeds)} seeds)"
        cells += [(f"{prompt}, seed {seeds[k]}, plain: {plain_verdict}", images[0]),
                  (f"{method}: {verdict or 'correct'}", images[1])]
    return labelled_grid(cells, columns=4, cell=160)


def _outlined(image: Image.Image, boxes, cell: int = 160) -> Image.Image:
    """The image enlarged to `cell` pixels with the requested boxes drawn in white."""
    big = image.convert("RGB").resize((cell, cell), Image.NEAREST)
    draw = ImageDraw.Draw(big)
    for box in boxes:
        draw.rectangle([v * cell for v in box], outline="white")
    return big


def app_screenshot(pipe, path: str | Path, *, seed: int = 0, prompt: str = HEATMAP_PROMPT) -> Path:
    """`diffxattn serve`'s page in headless Chromium: a generated image, a word's heatmap, one weight moved."""
    from selenium.webdriver.support.ui import WebDriverWait

    from .browser import chromium
    from .serve.app import LiveApp, running

    def wait_for_run(driver, runs: int) -> None:
        WebDriverWait(driver, 120).until(lambda d: d.execute_script(
            f"return window.appState.runs > {runs} && window.appState.shown === window.appState.result.run"))

    path = Path(path)
    with running(LiveApp(pipe=pipe)) as url, chromium(width=1280, height=1000) as driver:
        driver.get(url)
        WebDriverWait(driver, 60).until(lambda d: d.execute_script("return window.appState.ready"))
        box = driver.find_element("id", "prompt-input")
        box.clear()
        box.send_keys(prompt)
        driver.find_element("id", "seed").clear()
        driver.find_element("id", "seed").send_keys(str(seed))
        driver.find_element("id", "generate").click()
        wait_for_run(driver, 0)
        driver.execute_script("const s = document.querySelector('#weights input[data-word=\"1\"]'); s.value = '1.5';"
                              "s.dispatchEvent(new Event('input')); s.dispatchEvent(new Event('change'));")
        wait_for_run(driver, 1)
        driver.find_elements("css selector", "#words .chip")[2].click()
        for _ in range(3):  # grow the window until the viewport holds the page
            page_h, view_h, outer_h = driver.execute_script(
                "return [document.documentElement.scrollHeight, window.innerHeight, window.outerHeight]")
            if view_h >= page_h:
                break
            driver.set_window_size(1280, page_h + outer_h - view_h)
        path.parent.mkdir(parents=True, exist_ok=True)
        driver.save_screenshot(str(path))
    return path
