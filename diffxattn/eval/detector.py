"""Rule-based detector for shapes scenes: finds the objects in an image and scores a caption.

    dets = detect(image)                       # (H, W, 3) uint8 -> [Detection(color, shape, ...)]
    score_prompt("a red circle left of a blue square", dets, size=32)
    # {"count": True, "color": True, "shape": True, "relation": True, "all": True}

The pipeline, and why each step is robust to what a diffusion model draws:
1. foreground = max channel above a low threshold (the background is black), then, per blob,
   above half of the blob's own brightness: where a blurred edge really is, for dim samples too;
2. each pixel's color = nearest palette color after dividing RGB by its max channel: blur and
   dimming scale all channels of an edge pixel together, so its hue survives them;
3. connected components per color (8-connected), specks below a fraction of the image dropped;
4. shape = best soft IoU between the object's coverage (brightness, so anti-aliased or blurred
   edges count partially) and each ideal shape with the same mass and centroid: fill,
   symmetry and up/down mass all enter at once; size = bounding-box extent.
"""

from __future__ import annotations

import itertools
from collections import Counter
from dataclasses import dataclass

import numpy as np

from ..data.captions import COLORS, parse_caption_words
from ..data.shapes import POSITION_ANCHORS, shape_sdf

__all__ = ["DetectorConfig", "Detection", "detect", "position_of", "relation_holds", "score_prompt", "FAILURES",
           "failure_of"]

_NAMES = tuple(COLORS)
_PALETTE = np.array([COLORS[c] for c in _NAMES], np.float32)
_PALETTE /= _PALETTE.max(1, keepdims=True)  # (C, 3) in the same max-normalised space as pixels
# Area of each shape of half-extent r, in units of r^2.
_AREA_FACTOR = {"circle": np.pi, "square": 4.0, "triangle": 2.0, "diamond": 2.0}
# Bounding-box extent separating small from large at 32x32 (extents 8 and 13), scaled with size.
_LARGE_FROM_AT_32 = 10.5


@dataclass
class DetectorConfig:
    background: float = 64.0  # max channel above this may belong to an object (objects peak at 255)
    edge: float = 0.5  # an object's pixels are those above this fraction of its own brightness
    color_tolerance: float = 0.45  # farther than this from every palette color: color None
    min_area: float = 0.006  # components under this fraction of the image are specks
    min_shape_iou: float = 0.5  # best soft IoU with an ideal shape below this: shape None


@dataclass
class Detection:
    color: str | None
    shape: str | None
    size: str  # "small" | "large"
    center: tuple[float, float]  # (x, y) of the bounding-box center, in pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), x1 and y1 exclusive
    mask: np.ndarray  # (H, W) bool
    area: int


def detect(image: np.ndarray, config: DetectorConfig | None = None) -> list[Detection]:
    """Objects in an (H, W, 3) uint8 image on a black background, largest first."""
    cfg = config or DetectorConfig()
    rgb = np.asarray(image, np.float32)
    peak = rgb.max(-1)  # (H, W)
    chroma = rgb / np.maximum(peak, 1)[..., None]  # (H, W, 3), brightness removed
    dist = np.linalg.norm(chroma[:, :, None, :] - _PALETTE, axis=-1)  # (H, W, C)
    hue = dist.argmin(-1)  # (H, W) palette index of every pixel, len(_NAMES) = no known color
    hue[dist.min(-1) > cfg.color_tolerance] = len(_NAMES)
    classes = np.where(peak >= cfg.background, hue, -1)
    floor = float(np.median(peak[classes < 0])) if (classes < 0).any() else 0.0  # background noise level
    # Half of each blob's own brightness is where a blurred (or anti-aliased) edge really is, and
    # it adapts to dim samples; a global cut would grow or shrink every object's outline.
    labels = _components(classes)
    for root in np.unique(labels[labels >= 0]):
        blob = labels == root
        classes[blob & (peak < floor + cfg.edge * (_brightness(peak, blob) - floor))] = -1
    labels = _components(classes)  # refining can split blobs that only touched through halos
    h, w = classes.shape
    detections = []
    for root in np.unique(labels[labels >= 0]):
        mask = labels == root
        if mask.sum() >= cfg.min_area * h * w:
            detections.append(_describe(mask, int(classes.flat[root]), hue, peak, floor, cfg))
    return sorted(detections, key=lambda d: -d.area)


def _brightness(peak: np.ndarray, blob: np.ndarray) -> float:
    return float(np.percentile(peak[blob], 90))  # a blob's "full" brightness, robust to hot pixels


def _components(classes: np.ndarray) -> np.ndarray:
    """8-connected components of equal class (>= 0); each pixel gets its component's smallest
    flat index, background -1. Min-label propagation with pointer jumping: ~log(diameter) rounds."""
    h, w = classes.shape
    sentinel = h * w
    fg = classes >= 0
    labels = np.where(fg, np.arange(h * w).reshape(h, w), sentinel)
    padded_cls = np.pad(classes, 1, constant_values=-2)
    while True:
        padded = np.pad(labels, 1, constant_values=sentinel)
        new = labels
        for dy, dx in itertools.product((0, 1, 2), repeat=2):
            same = fg & (padded_cls[dy:dy + h, dx:dx + w] == classes)
            new = np.where(same, np.minimum(new, padded[dy:dy + h, dx:dx + w]), new)
        # a label is the flat index of a pixel of the same component: follow it (pointer jumping)
        new = np.append(new.ravel(), sentinel)[new]
        if np.array_equal(new, labels):
            return np.where(fg, labels, -1)
        labels = new


def _describe(mask, cls: int, hue, peak, floor: float, cfg: DetectorConfig) -> Detection:
    ys, xs = np.nonzero(mask)
    x0, y0, x1, y1 = int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1
    extent = max(x1 - x0, y1 - y0)
    shape, score = _classify_shape(_coverage(mask, cls, hue, peak, floor))
    return Detection(
        color=_NAMES[cls] if cls < len(_NAMES) else None,
        shape=shape if score >= cfg.min_shape_iou else None,
        size="large" if extent >= _LARGE_FROM_AT_32 * max(mask.shape) / 32 else "small",
        center=((x0 + x1) / 2, (y0 + y1) / 2),
        bbox=(x0, y0, x1, y1),
        mask=mask,
        area=int(mask.sum()),
    )


def _coverage(mask, cls: int, hue, peak, floor: float) -> np.ndarray:
    """(H, W) fraction of each pixel the object covers, read from brightness: edge pixels keep
    the partial coverage that anti-aliasing or blur gave them, which the binary mask throws away."""
    near = np.zeros_like(mask)  # the mask grown by 2 px, where the object's soft edge lies
    ys, xs = np.nonzero(mask)
    h, w = mask.shape
    near[max(ys.min() - 2, 0):ys.max() + 3, max(xs.min() - 2, 0):xs.max() + 3] = True
    full = _brightness(peak, mask)
    cover = np.clip((peak - floor) / max(full - floor, 1.0), 0, 1)
    return np.where(near & (hue == cls), cover, 0.0)  # other colors belong to other objects


def _classify_shape(cover: np.ndarray) -> tuple[str, float]:
    """Shape whose ideal soft rendering, with the object's mass and centroid, overlaps the
    coverage best (soft IoU). Mass fixes the size per hypothesis (area = k r^2), so no bounding
    box, which one stray pixel can stretch, enters."""
    h, w = cover.shape
    xs, ys = np.arange(w) + 0.5, np.arange(h) + 0.5  # pixel centers
    mass = cover.sum()
    cx, cy = (cover.sum(0) @ xs) / mass, (cover.sum(1) @ ys) / mass
    scores = {}
    for shape, k in _AREA_FACTOR.items():
        r = np.sqrt(mass / k)
        oy = r / 3 if shape == "triangle" else 0.0  # a triangle's centroid sits r/3 below its box center
        ideal = np.clip(0.5 - shape_sdf(shape, xs[None, :] - cx, ys[:, None] - (cy - oy), r), 0, 1)
        scores[shape] = float(np.minimum(cover, ideal).sum() / np.maximum(cover, ideal).sum())
    best = max(scores, key=scores.get)
    return best, scores[best]


def position_of(det: Detection, size: int) -> str:
    """Position word of the region (anchor) nearest to the detection's center."""
    x, y = det.center[0] / size, det.center[1] / size
    return min(POSITION_ANCHORS, key=lambda p: np.hypot(*np.subtract(POSITION_ANCHORS[p], (x, y))))


def relation_holds(a: Detection, b: Detection, relation: str) -> bool:
    """Whether "a <relation> b": along the dominant axis of their offset, in the right direction."""
    dx, dy = b.center[0] - a.center[0], b.center[1] - a.center[1]
    horizontal = abs(dx) > abs(dy)
    checks = {"left of": horizontal and dx > 0, "right of": horizontal and dx < 0,
              "above": not horizontal and dy > 0, "below": not horizontal and dy < 0}
    if relation not in checks:
        raise ValueError(f"unknown relation {relation!r}; expected one of {tuple(checks)}")
    return checks[relation]


def score_prompt(caption: str, detections: list[Detection], size: int) -> dict[str, bool]:
    """Per-clause correctness of an image (its detections) for a caption.

    Keys: count (exactly as many objects), color, shape (every object's (color, shape) found on
    distinct detections), size (only if the caption names one), position (one object) or
    relation (several), all. Objects are matched to detections by the assignment that agrees on
    most attributes, so one wrong attribute does not make every clause fail.
    """
    spec, _ = parse_caption_words(caption)
    objects = spec["objects"]
    match = _match(objects, detections)
    scores = {
        "count": len(detections) == len(objects),
        "color": all(d is not None and d.color == o["color"] for o, d in zip(objects, match)),
        "shape": all(d is not None and d.shape == o["shape"] for o, d in zip(objects, match)),
    }
    if any(o["size"] for o in objects):
        scores["size"] = all(d is not None and (o["size"] is None or d.size == o["size"])
                             for o, d in zip(objects, match))
    if spec["position"] is not None:
        scores["position"] = match[0] is not None and position_of(match[0], size) == spec["position"]
    if spec["relations"]:
        scores["relation"] = all(
            match[i] is not None and match[i + 1] is not None and relation_holds(match[i], match[i + 1], rel)
            for i, rel in enumerate(spec["relations"]))
    scores["all"] = all(scores.values())
    return scores


# Why an image fails its prompt, first cause first (an image with a missing object also has a wrong shape).
FAILURES = ("missing object", "extra object", "color missing", "colors bound to swapped shapes", "wrong shape",
            "wrong size", "wrong position", "wrong relation")


def failure_of(caption: str, detections: list[Detection], size: int) -> str | None:
    """The first failed clause of `FAILURES` for an image, None if the image is correct. "colors bound to
    swapped shapes": every color and every shape of the prompt is there, but on the wrong object (a red square
    and a blue circle for "a red circle left of a blue square")."""
    scores = score_prompt(caption, detections, size)
    if scores["all"]:
        return None
    objects = parse_caption_words(caption)[0]["objects"]
    if not scores["count"]:
        return "missing object" if len(detections) < len(objects) else "extra object"
    if not scores["color"]:
        return "color missing"
    if not scores["shape"]:
        by_color = {d.color: d.shape for d in detections}  # a detection's shape may be None (unclassified)
        drawn = Counter(by_color[o["color"]] for o in objects)
        return "colors bound to swapped shapes" if drawn == Counter(o["shape"] for o in objects) else "wrong shape"
    for clause in ("size", "position", "relation"):
        if not scores.get(clause, True):
            return f"wrong {clause}"
    raise AssertionError(f"no failed clause in {scores}")  # pragma: no cover: "all" is the and of the clauses


def _match(objects: list[dict], detections: list[Detection]) -> list[Detection | None]:
    """Detection per caption object (None if too few): the assignment maximising agreement,
    color first (it names the object), then shape, then size. The 8 largest detections suffice."""
    pool: list[Detection | None] = list(detections[:8]) + [None] * len(objects)

    def agreement(assignment) -> int:
        return sum(4 * (d.color == o["color"]) + 2 * (d.shape == o["shape"]) + (d.size == o["size"])
                   for o, d in zip(objects, assignment) if d is not None)

    best = max(itertools.permutations(pool, len(objects)), key=agreement)
    return list(best)
