"""`evaluate(pipe)`: accuracy per prompt set, a guidance curve, heatmap IoU and edit metrics, as one report.

    report = evaluate(pipe, quick=True)        # a dict, JSON-ready
    print(format_report(report))

    diffxattn eval pipelines/shapes-32 --quick -o report.json

Every image has its own generator seeded with its seed, so an image does not depend on the batch
it was drawn in. Prompts are batched for speed; attention maps for heatmap IoU are captured during
the accuracy run at the main guidance scale, so they cost no extra sampling.
"""

from __future__ import annotations

import time
from collections import defaultdict
from contextlib import ExitStack
from dataclasses import asdict, replace

import numpy as np
import torch
from tqdm.auto import tqdm

from ..control.guided import AttentionGuide, Guide
from ..control.steps import StepRange
from ..control.store import AttentionStore, word_keys
from ..data.shapes import ShapesConfig
from ..generation import edit, generate
from ..schedulers import scheduler_name
from . import metrics
from .detector import detect, failure_of, score_prompt
from .prompts import SET_NAMES, box_prompts, color_swap, first_object, prompt_set, prompt_sets, reweighted, shape_swap

__all__ = ["evaluate", "format_report", "DEFAULT_GUIDANCE", "QUICK_GUIDANCE", "REWEIGHTS", "REWEIGHT_MODES"]

DEFAULT_GUIDANCE = (1.0, 2.0, 3.0, 5.0)
QUICK_GUIDANCE = (1.0, 3.0)
REWEIGHTS = (0.5, 0.75, 1.0, 1.5, 2.0)
REWEIGHT_MODES = ("attention", "embedding")
SWAP_FEATURES = StepRange.fraction(0, 0.8)  # feature_replace of the "_features" swaps
SWAPS = {f"{attribute}_swap{suffix}": (attribute, features) for attribute in ("color", "shape")
         for suffix, features in (("", StepRange.fraction(0, 0)), ("_features", SWAP_FEATURES))}
# SWAPS: name -> (attribute, feature_replace)
_QUICK_MAX_STEPS = 10


def _generators(seeds) -> list[torch.Generator]:
    return [torch.Generator().manual_seed(int(s)) for s in seeds]


class _HeatmapTally:
    """IoU curves (over thresholds) of every scored color and shape word map: of the maps averaged over all
    captured resolutions (the heatmaps users see), and of each resolution's maps alone."""

    def __init__(self, thresholds):
        self.thresholds = thresholds
        self.ious: dict[int | None, dict[str, list[np.ndarray]]] = defaultdict(lambda: {"color": [], "shape": []})

    def add(self, store: AttentionStore, index: int, caption: str, detections) -> None:
        keys = word_keys(caption.split())  # same order as the store's words: captions have no punctuation
        words = metrics.word_masks(caption, detections)
        if not words:
            return
        for res in (None, *store.captured_resolutions):  # None: all resolutions together
            maps = store.word_maps(index, prompt=caption, normalize="minmax", resolution=res)
            for i, kind, mask in words:
                if keys[i] in maps:  # words cut off by the tokenizer's length have no map
                    heat = maps[keys[i]].cpu().numpy()
                    self.ious[res][kind].append(metrics.threshold_ious(heat, mask, self.thresholds))

    def summary(self) -> dict:
        """{"color": ..., "shape": ...} of the all-resolution maps (as `summarize_ious`), plus
        "by_resolution": {"16": {"color": ..., "shape": ...}, ...} of each resolution alone."""
        def kinds(res):
            return {kind: metrics.summarize_ious(self.ious[res][kind], self.thresholds) for kind in ("color", "shape")}
        return {**kinds(None), "by_resolution": {str(r): kinds(r) for r in sorted(
            (r for r in self.ious if r is not None), reverse=True)}}


def _score_set(pipe, prompts: list[str], seeds, *, scale: float, steps: int, batch_size: int,
               heat: _HeatmapTally | None = None, progress: bool = False, desc: str = "",
               sampling: dict | None = None, guide: Guide | None = None) -> tuple[list[dict], list[str | None]]:
    """Generate every prompt x seed (batched), detect, score; with `heat`, also tally heatmap IoUs; with `guide`,
    attention-guided. Returns the scores and each image's first failed clause (`failure_of`)."""
    items = [(p, s) for p in prompts for s in seeds]
    scores, failures = [], []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, leave=False):
        batch = items[start:start + batch_size]
        texts = [p for p, _ in batch]
        kwargs = dict(num_inference_steps=steps, guidance_scale=scale, output_type="np",
                      generator=_generators(s for _, s in batch), **(sampling or {}))
        with ExitStack() as stack:
            store = stack.enter_context(AttentionStore(pipe, step_bins=0)) if heat is not None else None
            if guide:
                guided = stack.enter_context(AttentionGuide(pipe, guide))
                kwargs.update(guided.kwargs())
                if guide.arrange:
                    kwargs["latents"] = guided.arrange({"prompt": texts, **kwargs})
            images = metrics.to_uint8(pipe(texts, **kwargs).images)
        for k, (text, image) in enumerate(zip(texts, images)):
            detections = detect(image)
            scores.append(score_prompt(text, detections, image.shape[0]))
            failures.append(failure_of(text, detections, image.shape[0]))
            if heat is not None:
                heat.add(store, k, text, detections)
    return scores, failures


def _box_metrics(pipe, items, seeds, *, scale: float, steps: int, guide: Guide | None, sampling: dict,
                 progress: bool = False) -> dict:
    """Each (prompt, word, box) of `box_prompts` drawn with `guide` plus the box on the word, for every seed: the
    IoU of the detected object's bounding box (the one of the prompt's color and shape, else the largest) with
    the requested box, and whether the object's color and shape are right."""
    ious, correct = [], []
    for prompt, word, box in tqdm(items, desc="boxes", disable=not progress, leave=False):
        boxed = replace(Guide() if guide is None else guide, boxes=((word, box),))  # a false Guide holds settings
        with AttentionGuide(pipe, boxed) as g:
            images = metrics.to_uint8(pipe([prompt] * len(seeds), generator=_generators(seeds), output_type="np",
                                           num_inference_steps=steps, guidance_scale=scale, **sampling,
                                           **g.kwargs()).images)
        for image in images:
            size = image.shape[0]
            detections = detect(image)
            scores = score_prompt(prompt, detections, size)
            correct.append(scores["color"] and scores["shape"])
            ious.append(metrics.object_box_iou(prompt, detections, box, size))
    return {"n": len(ious), "iou": float(np.mean(ious)), "iou_median": float(np.median(ious)),
            "iou>=0.5": float(np.mean([v >= 0.5 for v in ious])), "color_shape": float(np.mean(correct))}


def _change(a: np.ndarray, b: np.ndarray, where: np.ndarray) -> float | None:
    """Mean absolute difference of two uint8 images over the pixels `where`, in [0, 1] (1 = 255 levels)."""
    return float(np.abs(a.astype(np.float32) - b)[where].mean() / 255) if where.any() else None


def _edit_metrics(pipe, prompts: list[str], seeds, *, scale: float, steps: int, weights, holdout,
                  progress: bool = False) -> dict:
    """Color and shape swaps (prompt-to-prompt alone, and with the source's decoder features), reweighting
    (attention and embedding modes) and local blend on single-object prompts."""
    kw = dict(num_inference_steps=steps, guidance_scale=scale)
    swaps = {name: [] for name in SWAPS}
    blends = []
    strengths = {mode: {w: [] for w in weights} for mode in REWEIGHT_MODES}
    rhos = {mode: [] for mode in REWEIGHT_MODES}
    for prompt in tqdm(prompts, desc="edits", disable=not progress, leave=False):
        _, color, shape = first_object(prompt)
        targets = {"color": color_swap(prompt, holdout=holdout), "shape": shape_swap(prompt, holdout=holdout)}
        new = {"color": first_object(targets["color"])[1], "shape": first_object(targets["shape"])[2]}
        for seed in seeds:
            # (a) word swaps: the color (shape) changes, the rest of the object stays
            pairs = {}
            for name, (attribute, features) in SWAPS.items():
                pairs[name] = metrics.to_uint8(list(edit(pipe, prompt, targets[attribute], seed=seed, output_type="np",
                                                         feature_replace=features, **kw)))
                swaps[name].append(metrics.swap_scores(*pairs[name], new[attribute], attribute))
            src, tgt = pairs["color_swap"]
            # (c) local blend on the edited object's word: pixels outside the blend mask stay the source's
            blended = edit(pipe, prompt, targets["color"], local_blend=[shape], seed=seed, output_type="np", **kw)
            (b_src, b_tgt), mask = metrics.to_uint8(list(blended)), blended.mask.cpu().numpy()
            blends.append({"outside": _change(b_src, b_tgt, ~mask), "inside": _change(b_src, b_tgt, mask),
                           "outside_no_blend": _change(src, tgt, ~mask), "mask_fraction": float(mask.mean())})
            # (b) reweight the color word: does its strength grow with the weight?
            for mode in REWEIGHT_MODES:
                values = []
                for w in weights:
                    out = generate(pipe, reweighted(prompt, w), weight_mode=mode,
                                   generator=_generators([seed]), output_type="np", **kw).images
                    values.append(metrics.color_strength(metrics.to_uint8(out)[0], color))
                    strengths[mode][w].append(values[-1])
                valid = [(w, v) for w, v in zip(weights, values) if v is not None]
                rhos[mode].append(metrics.spearman(*zip(*valid)) if len(valid) >= 3 else float("nan"))
    return {
        **{name: {"n": len(rows), **{k: metrics.mean_or_none(r[k] for r in rows) for k in rows[0]},
                  "mask_iou_n": sum(r["mask_iou"] is not None for r in rows)}
           for name, rows in swaps.items()},
        "swap_feature_replace": [SWAP_FEATURES.start, SWAP_FEATURES.end],
        "reweight": {mode: _reweight_summary(weights, strengths[mode], rhos[mode]) for mode in REWEIGHT_MODES},
        "local_blend": {"n": len(blends),
                        **{k: metrics.mean_or_none(b[k] for b in blends)
                           for k in ("outside", "outside_no_blend", "inside", "mask_fraction")}},
    }


def _reweight_summary(weights, strengths: dict, rhos: list[float]) -> dict:
    """spearman: rho between the weights and the mean color strength at each weight (the curve);
    spearman_per_image: the mean of each image's own rho (ties, e.g. a color already at full strength,
    pull it down)."""
    curve = {f"{w:g}": metrics.mean_or_none(v) for w, v in strengths.items()}
    points = [(w, c) for w, c in zip(weights, curve.values()) if c is not None]
    defined = [r for r in rhos if not np.isnan(r)]
    rho = metrics.spearman(*zip(*points)) if len(points) >= 3 else float("nan")
    return {"n": len(rhos), "weights": list(weights), "spearman": None if np.isnan(rho) else rho,
            "spearman_per_image": metrics.mean_or_none(defined), "strength": curve}


def evaluate(pipe, *, quick: bool = False, seeds: int | None = None, guidance_scales=None,
             guidance_scale: float | None = None, steps: int | None = None, sets=SET_NAMES,
             sizes: dict[str, int] | None = None, heatmaps: bool = True, edits: bool = True,
             edit_prompts: int | None = None, weights=REWEIGHTS, holdout=None, batch_size: int = 32,
             thresholds=metrics.THRESHOLDS, pipeline: str | None = None, progress: bool = False,
             guidance_rescale: float = 0.0, guidance_interval: tuple[float, float] | None = None,
             guide: Guide | None = None, boxes: int = 0) -> dict:
    """Evaluate a pipeline on the fixed prompt sets; returns the JSON-ready report.

    seeds: images per prompt (seeds 0..n-1; default 4, quick 1). guidance_scales: the guidance curve
    (default 1 2 3 5, quick 1 3). guidance_scale: the scale of the per-set accuracy, heatmaps and edits
    (default: the pipeline's). steps: denoising steps (default: the pipeline's; quick at most 10).
    sizes: prompts per set (default 64/64/32, quick 4 each). edit_prompts: single-object prompts edited
    (default 8, quick 2). holdout: the held-out pairs (default `ShapesConfig().holdout`).
    guidance_rescale, guidance_interval: passed to the pipeline for the accuracy sets and the curve (interval
    default: the pipeline's). guide: attention-guided sampling (`control.guided`) for the sets, the curve and the
    heatmaps (not the edits). boxes: also score that many `box_prompts` with their boxes (and `guide`'s settings).

    >>> report = evaluate(pipe, quick=True)
    >>> report["sets"]["single"]["all"], report["guidance"]["3"]["two"]
    """
    t0 = time.perf_counter()
    unknown = set(sets) - set(SET_NAMES)
    if unknown:
        raise ValueError(f"unknown prompt sets {sorted(unknown)}; expected some of {SET_NAMES}")
    seeds = list(range(seeds if seeds is not None else 1 if quick else 4))
    scales = tuple(float(g) for g in (guidance_scales or (QUICK_GUIDANCE if quick else DEFAULT_GUIDANCE)))
    main = float(pipe.config.default_guidance_scale if guidance_scale is None else guidance_scale)
    default_steps = pipe.config.default_steps
    steps = steps or (min(default_steps, _QUICK_MAX_STEPS) if quick else default_steps)
    holdout = tuple(tuple(p) for p in (ShapesConfig().holdout if holdout is None else holdout))
    n_edit = edit_prompts if edit_prompts is not None else 2 if quick else 8
    if not seeds or not scales:
        raise ValueError(f"need >= 1 seed and >= 1 guidance scale; got {len(seeds)} seeds, scales {scales}")
    prompts = prompt_sets(tuple(sets), quick=quick, sizes=sizes, holdout=holdout)
    if guidance_interval is None:
        guidance_interval = pipe.config.get("default_guidance_interval", (0.0, 1.0))
    sampling = {"guidance_interval": tuple(float(g) for g in guidance_interval)}
    if guidance_rescale:
        sampling["guidance_rescale"] = float(guidance_rescale)

    heat = _HeatmapTally(thresholds) if heatmaps else None
    by_scale: dict[float, dict[str, float]] = {}
    report_sets = {}
    for scale in dict.fromkeys([main, *scales]):  # the main scale first: it also captures heatmaps
        by_scale[scale] = {}
        for name, texts in prompts.items():
            scores, failures = _score_set(pipe, texts, seeds, scale=scale, steps=steps, batch_size=batch_size,
                                heat=heat if scale == main else None, progress=progress,
                                desc=f"{name} g={scale:g}", sampling=sampling, guide=guide)
            summary = metrics.summarize(scores, failures)
            by_scale[scale][name] = summary["all"]
            if scale == main:
                report_sets[name] = summary

    report = {
        "pipeline": pipeline,
        "config": {"quick": quick, "seeds": len(seeds), "guidance_scale": main,
                   "guidance_scales": list(scales), "steps": steps, "scheduler": scheduler_name(pipe.scheduler),
                   "scheduler_config": {k: v for k, v in pipe.scheduler.config.items() if not k.startswith("_")},
                   "guidance_rescale": float(guidance_rescale), "guidance_interval": list(sampling["guidance_interval"]),
                   "sizes": {k: len(v) for k, v in prompts.items()},
                   "image_size": pipe.unet.config.sample_size, "holdout": [list(p) for p in holdout],
                   "thresholds": list(thresholds), "heatmaps": heatmaps, "edits": edits,
                   "edit_prompts": n_edit, "weights": list(weights),
                   "guide": _guide_config(guide) if guide or boxes else None, "boxes": boxes},
        "sets": report_sets,
        "guidance": {f"{s:g}": by_scale[s] for s in scales},
        "heatmap_iou": heat.summary() if heat else None,
        "edits": None,
        "boxes": _box_metrics(pipe, box_prompts(boxes, size=pipe.unet.config.sample_size, holdout=holdout), seeds,
                              scale=main, steps=steps, guide=guide, sampling=sampling, progress=progress)
        if boxes else None,
    }
    if edits:
        edit_texts = prompt_set("single", n_edit, holdout=holdout)
        report["edits"] = _edit_metrics(pipe, edit_texts, seeds, scale=main, steps=steps, weights=weights,
                                        holdout=holdout, progress=progress)
    report["seconds"] = round(time.perf_counter() - t0, 2)
    return report


def _guide_config(guide: Guide | None) -> dict | None:
    if guide is None:
        return None
    config = asdict(guide)
    config["steps"] = str(guide.steps)
    return config


def _fmt(x, width: int = 6) -> str:
    return f"{'-':>{width}}" if x is None else f"{x:>{width}.3f}" if isinstance(x, float) else f"{x:>{width}}"


def format_report(report: dict) -> str:
    """The report as a compact text table."""
    lines = []
    attrs = [a for a in metrics.ATTRIBUTES if any(a in s["accuracy"] for s in report["sets"].values())]
    lines.append(f"{'set':<9}{'n':>5}" + "".join(f"{a[:8]:>9}" for a in attrs) + f"{'all':>9}")
    for name, s in report["sets"].items():
        lines.append(f"{name:<9}{s['n']:>5}" + "".join(f"{_fmt(s['accuracy'].get(a), 9)}" for a in attrs)
                     + f"{_fmt(s['all'], 9)}")
    for name, s in report["sets"].items():
        if s.get("failures"):
            lines.append(f"  {name} failures: " + ", ".join(f"{k} {v:.3f}" for k, v in s["failures"].items()))
    scales = list(report["guidance"])
    lines.append("")
    lines.append(f"{'guidance':<9}" + "".join(f"{'g=' + g:>9}" for g in scales))
    for name in report["sets"]:
        lines.append(f"{name:<9}" + "".join(_fmt(report["guidance"][g][name], 9) for g in scales))
    if report["heatmap_iou"]:
        lines.append("")
        lines.append(f"{'heatmap':<13}{'n':>6}{'iou@0.4':>9}{'best tau':>9}{'iou@best':>9}")
        by_res = report["heatmap_iou"]["by_resolution"]
        rows = [("", report["heatmap_iou"])] + [(f" {r}x{r}", by_res[r]) for r in by_res]
        for label, kinds in rows:
            for kind in ("color", "shape"):
                h = kinds[kind]
                values = "".join(_fmt(h[k], 9) for k in ("iou@0.4", "best_tau", "iou@best"))
                lines.append(f"{kind + label:<13}{h['n']:>6}{values}")
    if report["edits"]:
        e = report["edits"]
        rw, lb = e["reweight"], e["local_blend"]
        lines.append("")
        for name in SWAPS:
            sw = e[name]
            label = name.replace("_", " ").replace(" features", f" + features {e['swap_feature_replace'][1]:g}")
            lines.append(f"{label} (n={sw['n']}): " + ", ".join(
                f"{k.replace('_', ' ')} {_fmt(v, 0)}" for k, v in sw.items() if k not in ("n", "mask_iou_n")))
        for mode, r in rw.items():
            curve = " ".join(f"{w}:{_fmt(v, 0)}" for w, v in r["strength"].items())
            lines.append(f"reweight {mode} (n={r['n']}): Spearman rho(weight, color strength) "
                         f"{_fmt(r['spearman'], 0)} (per image {_fmt(r['spearman_per_image'], 0)}); strength {curve}")
        lines.append(f"local blend (n={lb['n']}): change outside mask {_fmt(lb['outside'], 0)} "
                     f"(without blend {_fmt(lb['outside_no_blend'], 0)}), inside {_fmt(lb['inside'], 0)}")
    if report.get("boxes"):
        b = report["boxes"]
        lines.append(f"\nboxes (n={b['n']}): IoU mean {b['iou']:.3f}, median {b['iou_median']:.3f}, "
                     f">= 0.5 {b['iou>=0.5']:.3f}; color and shape right {b['color_shape']:.3f}")
    if report["config"].get("guide"):
        g = report["config"]["guide"]
        lines.append(f"attention-guided: excite {g['excite'] or '-'}, bind {g['bind'] or '-'}, steps {g['steps']}, "
                     f"step size {g['step_size']:g}, iterations {g['iterations']}; boxes by {g['box_method']}"
                     + (f" at {', '.join(f'{f:g}' for f in g['moves'])} of the steps"
                        if g["box_method"] == "move" else "")
                     + (f"; arrange {g['arrange']}: best of {g['candidates']} noises by the layout at "
                        f"{g['arrange_at']:g} of the steps" if g.get("arrange") else ""))
    lines.append(f"\n{report['seconds']:.1f} s")
    return "\n".join(lines)
