"""Scores of generated images: prompt accuracy, heatmap IoU, and edit metrics (numpy only).

    scores = score_images(prompts, images)     # per image {"count", "color", "shape", ..., "all"}
    summarize(scores)                          # {"n", "accuracy": {attr: fraction}, "all": fraction}
    threshold_ious(word_map, mask)             # IoU of the map thresholded at tau = 0.1 .. 0.9
    spearman([0.5, 1, 2], strengths)           # rank correlation, ties get their mean rank

Accuracy follows GenEval: an image counts as correct only if every clause of its prompt holds.
Heatmap IoU follows DAAM: a word's min-max-normalised attention map, thresholded at tau, against the
mask of the object the word names.
"""

from __future__ import annotations

import numpy as np

from ..data.captions import COLORS, SHAPES, parse_caption_words
from .detector import FAILURES, Detection, detect, position_of, score_prompt

__all__ = ["ATTRIBUTES", "THRESHOLDS", "to_uint8", "score_images", "summarize", "iou", "threshold_ious",
           "word_masks", "summarize_ious", "box_iou", "rank", "spearman", "color_strength", "swap_scores",
           "mean_or_none"]

# Clause names of `score_prompt`, in table order; position applies to one object, relation to several.
ATTRIBUTES = ("count", "color", "shape", "position", "relation", "size")
THRESHOLDS = tuple(np.round(np.arange(0.1, 0.91, 0.1), 2).tolist())
_PALETTE = {name: np.array(rgb, np.float64) / np.linalg.norm(rgb) for name, rgb in COLORS.items()}


def mean_or_none(values) -> float | None:
    """Mean of a sequence, None when it is empty (JSON null: "nothing was measured")."""
    values = [float(v) for v in values if v is not None and not np.isnan(v)]
    return float(np.mean(values)) if values else None


def to_uint8(images) -> np.ndarray:
    """(B, H, W, 3) floats in [0, 1] (the pipeline's "np" output) -> uint8, rounded like its PIL output."""
    return np.round(np.clip(np.asarray(images), 0, 1) * 255).astype(np.uint8)


# -- accuracy --
def score_images(prompts: list[str], images) -> list[dict[str, bool]]:
    """Per image (H, W, 3) uint8, the clauses of its prompt that hold (see `score_prompt`)."""
    if len(prompts) != len(images):
        raise ValueError(f"{len(prompts)} prompts but {len(images)} images; give one prompt per image")
    return [score_prompt(p, detect(img), img.shape[0]) for p, img in zip(prompts, images)]


def summarize(scores: list[dict[str, bool]], failures: list[str | None] | None = None) -> dict:
    """{"n", "accuracy": {attribute: fraction of the images whose prompt names it}, "all"}, and with `failures`
    (`detector.failure_of` per image) "failures": {cause: fraction of the images}, causes in `FAILURES` order."""
    accuracy = {a: float(np.mean([s[a] for s in scores if a in s])) for a in ATTRIBUTES
                if any(a in s for s in scores)}
    correct = float(np.mean([s["all"] for s in scores])) if scores else 0.0
    summary = {"n": len(scores), "accuracy": accuracy, "all": correct}
    if failures is not None:
        summary["failures"] = {f: failures.count(f) / len(failures) for f in FAILURES if f in failures}
    return summary


# -- heatmap IoU --
def iou(a: np.ndarray, b: np.ndarray) -> float:
    """Intersection over union of two boolean masks; two empty masks agree (1.0)."""
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 1.0


def box_iou(a, b) -> float:
    """IoU of two boxes (x0, y0, x1, y1), x1 and y1 exclusive (as `Detection.bbox`)."""
    w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - w * h
    return float(w * h / union) if union > 0 else 0.0


def object_box_iou(prompt: str, detections: list[Detection], box, size: int, index: int = 0) -> float:
    """IoU of the prompt's object `index`'s detected box (the detection of its color and shape, else the first one)
    with `box` (x0, y0, x1, y1 as fractions of a size x size image); 0 when nothing was detected."""
    spec = parse_caption_words(prompt)[0]["objects"][index]
    mine = [d for d in detections if (d.color, d.shape) == (spec["color"], spec["shape"])] or detections
    return box_iou(mine[0].bbox, [v * size for v in box]) if mine else 0.0


def threshold_ious(heat: np.ndarray, mask: np.ndarray, thresholds=THRESHOLDS) -> np.ndarray:
    """(T,) IoU between `heat > tau` (heat in [0, 1], e.g. min-max normalised) and `mask`, per tau."""
    heat = np.asarray(heat, np.float32)
    if heat.shape != mask.shape:
        raise ValueError(f"heatmap {heat.shape} and mask {mask.shape} differ in size")
    return np.array([iou(heat > t, mask) for t in thresholds])


def word_masks(caption: str, detections: list[Detection]) -> list[tuple[int, str, np.ndarray]]:
    """(word index in caption.split(), "color" | "shape", ground-truth mask) for each color and shape
    word whose object was detected: the largest detection with that object's color and shape.
    Words of undetected objects are left out (no ground truth to compare with)."""
    spec, owners = parse_caption_words(caption)
    out = []
    for i, (word, owner) in enumerate(zip(caption.split(), owners)):
        kind = "color" if word in COLORS else "shape" if word in SHAPES else None
        if kind is None or owner < 0:
            continue
        obj = spec["objects"][owner]
        found = [d for d in detections if d.color == obj["color"] and d.shape == obj["shape"]]
        if found:
            out.append((i, kind, max(found, key=lambda d: d.area).mask))
    return out


def summarize_ious(ious: list[np.ndarray], thresholds=THRESHOLDS, at: float = 0.4) -> dict:
    """{"n", "iou@0.4", "best_tau", "iou@best"} over maps whose IoU curves (T,) are `ious`."""
    if not ious:
        return {"n": 0, f"iou@{at:g}": None, "best_tau": None, "iou@best": None}
    curve = np.mean(ious, axis=0)  # (T,) mean IoU per threshold
    best = int(curve.argmax())
    return {"n": len(ious), f"iou@{at:g}": float(curve[list(thresholds).index(at)]),
            "best_tau": float(thresholds[best]), "iou@best": float(curve[best])}


# -- rank correlation (no scipy at runtime) --
def rank(x) -> np.ndarray:
    """Ranks 1..n of x, tied values sharing their mean rank (as scipy.stats.rankdata)."""
    x = np.asarray(x, np.float64)
    order = np.argsort(x, kind="stable")
    ranks = np.empty(len(x))
    ranks[order] = np.arange(1, len(x) + 1)
    for value in np.unique(x):
        tied = x == value
        ranks[tied] = ranks[tied].mean()
    return ranks


def spearman(x, y) -> float:
    """Spearman's rho: Pearson correlation of the ranks; nan when either side is constant."""
    rx, ry = rank(x), rank(y)
    rx, ry = rx - rx.mean(), ry - ry.mean()
    denom = np.sqrt((rx * rx).sum() * (ry * ry).sum())
    return float((rx * ry).sum() / denom) if denom > 0 else float("nan")


# -- edits --
def color_strength(image: np.ndarray, color: str) -> float | None:
    """How strongly the image's object shows `color`: the mean, over the pixels of the largest
    detected object, of the cosine similarity between the pixel's RGB and the palette RGB of
    `color` (1 = exactly that hue; lower when the hue drifts or the color washes out towards white
    or grey). None when no object is detected."""
    detections = detect(image)
    if not detections:
        return None
    pixels = np.asarray(image, np.float64)[detections[0].mask]  # (P, 3)
    norms = np.linalg.norm(pixels, axis=1).clip(1e-9)
    return float(np.mean(pixels @ _PALETTE[color] / norms))


def swap_scores(source: np.ndarray, edited: np.ndarray, target: str, attribute: str = "color") -> dict:
    """A word-swap edit of the object's color (or shape) to `target`, read from the largest detection of
    each image: whether the edit shows the target, keeps the source's other attribute and position, and
    the IoU of the two objects' masks (None when either image has no object).
    Keys: target_color, shape_kept (color swap) or target_shape, color_kept; position_kept, mask_iou."""
    other = "shape" if attribute == "color" else "color"
    src, tgt = detect(source), detect(edited)
    if not src or not tgt:
        return {f"target_{attribute}": bool(tgt) and getattr(tgt[0], attribute) == target, f"{other}_kept": False,
                "position_kept": False, "mask_iou": None}
    size = source.shape[0]
    return {f"target_{attribute}": getattr(tgt[0], attribute) == target,
            f"{other}_kept": getattr(src[0], other) is not None and getattr(tgt[0], other) == getattr(src[0], other),
            "position_kept": position_of(tgt[0], size) == position_of(src[0], size),
            "mask_iou": iou(src[0].mask, tgt[0].mask)}
