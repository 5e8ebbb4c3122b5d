"""Procedural scenes of colored shapes, each with a caption and an exact mask per object.

Every image carries the ground truth of what its caption says (which object, where, which
pixels), so prompt accuracy and attention-map IoU are measured, not eyeballed.

    config = ShapesConfig(size=32, max_objects=2)
    scene = sample_scene(config, 7)          # same (seed, split, index) -> same scene, always
    image, masks = render(scene)             # (32, 32, 3) uint8, (K, 32, 32) bool
    scene.caption, scene.word_objects        # "a red circle left of a blue square", [-1, 0, 0, -1, ...]

Geometry is continuous: pixel (row i, column j) covers [j, j+1] x [i, i+1]; centers and extents
are in pixels of `scene.image_size`, so a scene can be rendered at any size (e.g. masks at the
attention resolution).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass

import numpy as np
import torch

from .captions import (COLORS, POSITIONS, RELATION_DIRECTIONS, RELATIONS, SHAPES, SIZES, build_caption,
                       parse_caption_words)

__all__ = [
    "COLORS", "SHAPES", "SIZES", "POSITIONS", "RELATIONS", "POSITION_ANCHORS",
    "ShapesConfig", "SceneObject", "Scene", "sample_scene", "render", "shape_sdf", "scene_from_spec",
    "scene_from_caption", "ShapesDataset", "collate_shapes",
]

# Where a single object's center sits, as fractions of the image (x, y). The detector reads a
# position back as the nearest anchor, so jitter stays well inside half the anchor spacing.
POSITION_ANCHORS: dict[str, tuple[float, float]] = {
    "left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25), "bottom": (0.5, 0.75),
    "center": (0.5, 0.5),
}
# Bounding-box extent at 32x32, scaled with the image: large enough to tell shapes apart, small
# enough that two large objects fit side by side with a gap.
_EXTENT_AT_32 = {"small": 8.0, "large": 13.0}
_OPPOSITE = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
_JITTER = 0.06  # of the image size: single-object centers move this far from their anchor
_CLEAR_RATIO = 2.5  # a relation's primary offset is >= this times its perpendicular offset
_SPLITS = ("train", "test")
_ALL_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES)
_RGB = {name: np.array(rgb, np.float32) for name, rgb in COLORS.items()}


@dataclass
class ShapesConfig:
    size: int = 32
    min_objects: int = 1
    max_objects: int = 2
    two_object_prob: float = 0.5  # probability of a multi-object scene when min_objects == 1
    holdout: tuple[tuple[str, str], ...] = (
        ("red", "triangle"), ("blue", "circle"), ("green", "diamond"), ("yellow", "square"))
    seed: int = 0
    length: int = 100_000  # virtual: sample i is generated on demand
    split: str = "train"  # "train": no holdout pair anywhere; "test": >= 1 holdout pair per scene

    def __post_init__(self):
        self.holdout = tuple(tuple(pair) for pair in self.holdout)  # YAML gives lists
        _require("size", self.size, "an int in [16, 512]", _is_int(self.size) and 16 <= self.size <= 512)
        _require("max_objects", self.max_objects, "an int in [1, 3]",
                 _is_int(self.max_objects) and 1 <= self.max_objects <= 3)
        _require("min_objects", self.min_objects, f"an int in [1, max_objects={self.max_objects}]",
                 _is_int(self.min_objects) and 1 <= self.min_objects <= self.max_objects)
        _require("two_object_prob", self.two_object_prob, "a number in [0, 1]",
                 isinstance(self.two_object_prob, (int, float)) and 0 <= self.two_object_prob <= 1)
        _require("seed", self.seed, "an int >= 0", _is_int(self.seed) and self.seed >= 0)
        _require("length", self.length, "an int >= 1", _is_int(self.length) and self.length >= 1)
        _require("split", self.split, f"one of {_SPLITS}", self.split in _SPLITS)
        for pair in self.holdout:
            _require("holdout", pair, f"(color, shape) pairs with colors {tuple(COLORS)} and shapes {SHAPES}",
                     len(pair) == 2 and pair[0] in COLORS and pair[1] in SHAPES)
        if self.split == "test":
            _require("holdout", self.holdout, "at least one pair when split='test'", len(self.holdout) > 0)
        free_colors = {c for c, _ in self.train_pairs}
        _require("holdout", self.holdout, f"pairs leaving >= max_objects={self.max_objects} colors for train",
                 len(free_colors) >= self.max_objects)

    @property
    def train_pairs(self) -> tuple[tuple[str, str], ...]:
        return _train_pairs(self.holdout)


@functools.lru_cache(maxsize=64)
def _train_pairs(holdout: tuple[tuple[str, str], ...]) -> tuple[tuple[str, str], ...]:
    return tuple(p for p in _ALL_PAIRS if p not in holdout)


def _is_int(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _require(field: str, value, allowed: str, ok: bool) -> None:
    if not ok:
        raise ValueError(f"ShapesConfig.{field}={value!r} is invalid: expected {allowed}")


@dataclass(frozen=True)
class SceneObject:
    color: str
    shape: str
    size: str  # "small" | "large"
    center: tuple[float, float]  # (x, y) in pixels
    extent: float  # bounding-box width = height, in pixels

    @property
    def radius(self) -> float:
        return self.extent / 2


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    caption: str
    word_objects: tuple[int, ...]  # per word of caption.split(): index into objects, -1 for none
    image_size: int
    position: str | None = None  # single-object scenes: region of its center (None: not in caption)
    relations: tuple[str, ...] = ()  # relations[i]: where objects[i] is relative to objects[i + 1]


def sample_scene(config: ShapesConfig, index: int) -> Scene:
    """Scene `index` of (config.seed, config.split): a pure function of those three numbers."""
    if index < 0:
        raise ValueError(f"index must be >= 0, got {index}")
    # A fresh generator per sample: no global state, any worker can draw any index.
    rng = np.random.default_rng([config.seed, _SPLITS.index(config.split), int(index)])
    n = _sample_count(config, rng)
    pairs = _sample_pairs(config, n, rng)
    sizes, radii, centers, position, relations = _sample_layout(config.size, n, rng)
    objects = tuple(SceneObject(c, sh, z, (float(x), float(y)), 2 * float(r))
                    for (c, sh), z, (x, y), r in zip(pairs, sizes, centers, radii))
    if n == 1 and rng.random() < 0.15:
        position = None  # some captions say nothing about where
    said = [{"color": o.color, "shape": o.shape, "size": o.size if rng.random() < 0.5 else None}
            for o in objects]  # the size word is optional
    words, owners = build_caption(said, position, relations, rng.integers)
    return Scene(objects, " ".join(words), tuple(owners), config.size, position, tuple(relations))


def _sample_layout(size: int, n: int, rng: np.random.Generator):
    """(sizes, radii, centers [(x, y)], position or None, relations) for n objects."""
    for attempt in range(50):
        # Big objects or long chains may not fit: shrink first, then redraw the relations.
        sizes = ["small" if attempt > 0 or rng.random() < 0.5 else "large" for _ in range(n)]
        if attempt != 1:
            relations = _sample_relations(n - 1, rng)
        radii = [_EXTENT_AT_32[z] * size / 64 for z in sizes]
        if n == 1:
            position, center = _single_center(radii[0], rng, size)
            return sizes, radii, [center], position, []
        centers = _place_chain(radii, relations, size, rng)
        if centers is not None:
            return sizes, radii, centers, None, relations
    raise RuntimeError(f"could not lay out {n} objects in {size}x{size}")  # pragma: no cover


def _sample_relations(n: int, rng: np.random.Generator) -> list[str]:
    """A chain that never folds back ("A left of B right of C" would stack A and C on one side
    of B, where they rarely fit and the caption says nothing about A vs C)."""
    relations: list[str] = []
    for _ in range(n):
        options = [r for r in RELATIONS if not relations or r != _OPPOSITE[relations[-1]]]
        relations.append(options[rng.integers(len(options))])
    return relations


def _sample_count(config: ShapesConfig, rng: np.random.Generator) -> int:
    lo, hi = config.min_objects, config.max_objects
    if lo == 1 and hi > 1:
        if rng.random() >= config.two_object_prob:
            return 1
        lo = 2
    return int(rng.integers(lo, hi + 1))


def _sample_pairs(config: ShapesConfig, n: int, rng: np.random.Generator) -> list[tuple[str, str]]:
    """(color, shape) per object, colors distinct so every caption names each object unambiguously."""
    pairs: list = [None] * n
    if config.split == "test":  # one object (any of them) carries a holdout pair, the rest anything
        pairs[rng.integers(n)] = config.holdout[rng.integers(len(config.holdout))]
        pool = _ALL_PAIRS
    else:
        pool = config.train_pairs
    for k in range(n):
        if pairs[k] is None:
            used = {p[0] for p in pairs if p is not None}
            options = [p for p in pool if p[0] not in used]
            pairs[k] = options[rng.integers(len(options))]
    return pairs


def _pad(size: int) -> float:
    return max(1.0, size / 32)  # objects keep this far from the image border


def _margin(size: int) -> float:
    return max(2.0, 2.5 * size / 32)  # gap between bounding boxes: keeps components apart


def _single_center(radius: float, rng: np.random.Generator, size: int):
    position = POSITIONS[rng.integers(len(POSITIONS))]
    jitter = rng.uniform(-_JITTER, _JITTER, 2) * size
    lo, hi = radius + _pad(size), size - radius - _pad(size)
    center = [min(max(a * size + j, lo), hi) for a, j in zip(POSITION_ANCHORS[position], jitter)]
    return position, center


# Layouts use plain floats: with 2-3 objects, numpy's per-call overhead would dominate sampling.
def _chain(radii: list[float], relations: list[str], gaps, offsets) -> list[tuple[float, float]]:
    """Centers relative to object 0: gaps[i] between boxes i and i+1 along the relation's axis,
    offsets[i] across it as a fraction of the center distance."""
    centers = [(0.0, 0.0)]
    for i, rel in enumerate(relations):
        d = radii[i] + radii[i + 1] + gaps[i]
        dx, dy = RELATION_DIRECTIONS[rel]
        x, y = centers[-1]
        centers.append((x + (dx + abs(dy) * offsets[i]) * d, y + (dy + abs(dx) * offsets[i]) * d))
    return centers


def _bounds(centers, radii) -> tuple[float, float, float, float]:
    """(x0, y0, x1, y1) of the union of the objects' boxes."""
    return (min(x - r for (x, _), r in zip(centers, radii)), min(y - r for (_, y), r in zip(centers, radii)),
            max(x + r for (x, _), r in zip(centers, radii)), max(y + r for (_, y), r in zip(centers, radii)))


def _fits(centers, radii, size: int) -> bool:
    x0, y0, x1, y1 = _bounds(centers, radii)
    if max(x1 - x0, y1 - y0) > size - 2 * _pad(size):
        return False
    for i in range(len(radii)):  # chains can fold back: check every pair, not only neighbours
        for j in range(i + 1, len(radii)):
            far = max(abs(centers[i][0] - centers[j][0]), abs(centers[i][1] - centers[j][1]))
            if far - radii[i] - radii[j] < _margin(size) - 1e-6:
                return False
    return True


def _place_chain(radii, relations, size, rng):
    """Absolute centers for a relation chain, or None if it cannot fit."""
    n_rel = len(relations)
    tight = _bounds(_chain(radii, relations, [_margin(size)] * n_rel, [0.0] * n_rel), radii)
    room = [size - 2 * _pad(size) - (tight[2] - tight[0]), size - 2 * _pad(size) - (tight[3] - tight[1])]
    if min(room) < 0:
        return None
    axes = [0 if RELATION_DIRECTIONS[r][1] == 0 else 1 for r in relations]
    slack = [room[a] / axes.count(a) for a in axes]  # share each axis' spare room among its relations
    for attempt in range(20):
        gaps = [_margin(size) + u * r for u, r in zip(rng.random(n_rel), slack)]
        offsets = rng.uniform(-1, 1, n_rel) / _CLEAR_RATIO * (1 - attempt / 20)
        centers = _chain(radii, relations, gaps, offsets)
        if _fits(centers, radii, size):
            x0, y0, x1, y1 = _bounds(centers, radii)
            pad = _pad(size)
            sx, sy = rng.uniform((pad - x0, pad - y0), (size - pad - x1, size - pad - y1))
            return [(x + sx, y + sy) for x, y in centers]
    return None


def shape_sdf(shape: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Signed distance in pixels (negative inside) to a shape of half-extent r centered at 0.
    Polygons use the max over their edges' half-planes: exact at the edges, where it matters."""
    if shape == "circle":
        return np.sqrt(dx * dx + dy * dy) - r
    if shape == "square":
        return np.maximum(np.abs(dx), np.abs(dy)) - r
    if shape == "diamond":
        return (np.abs(dx) + np.abs(dy) - r) / np.sqrt(2)
    if shape == "triangle":  # apex (0, -r) at the top, base y = r from x = -r to r
        return np.maximum(dy - r, (2 * np.abs(dx) - dy - r) / np.sqrt(5))
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def render(scene: Scene, size: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image (H, W, 3) uint8 on black, masks (K, H, W) bool) at `size` (default: the scene's).

    Edges are anti-aliased with coverage = clip(0.5 - sdf): a mask pixel (sdf <= 0) is exactly a
    pixel covered >= 50%, so masks are crisp and agree with the image.
    """
    size = scene.image_size if size is None else size
    scale = size / scene.image_size
    grid = np.arange(size, dtype=np.float32) + 0.5  # pixel centers
    image = np.zeros((size, size, 3), np.float32)
    masks = np.zeros((len(scene.objects), size, size), bool)
    for k, obj in enumerate(scene.objects):
        dx = grid[None, :] - obj.center[0] * scale  # (1, W)
        dy = grid[:, None] - obj.center[1] * scale  # (H, 1)
        sdf = shape_sdf(obj.shape, dx, dy, obj.radius * scale)  # (H, W)
        masks[k] = sdf <= 0
        image += np.clip(0.5 - sdf, 0, 1)[..., None] * _RGB[obj.color]  # objects never overlap
    return np.rint(np.clip(image, 0, 255)).astype(np.uint8), masks


def scene_from_spec(objects: list[dict], relation: str | list[str] | None = None, size: int = 32,
                    position: str | None = None) -> Scene:
    """A canonical ground-truth scene for a prompt's clauses (e.g. from `parse_caption`).

    objects: dicts with color, shape and optionally size (None/absent: large if it fits).
    relation: one relation (two objects) or the chain relations[i] between objects i and i+1.
    A single object sits exactly on its position's anchor (center if None); a chain is laid
    out with a fixed gap and centered. The caption is the canonical phrasing of the spec.
    """
    relations = [relation] if isinstance(relation, str) else list(relation or [])
    if len(relations) != len(objects) - 1 or (position is not None and len(objects) != 1):
        raise ValueError(f"{len(objects)} objects need {len(objects) - 1} relations and a position only "
                         f"when alone; got relations={relations}, position={position!r}")
    for o in objects:
        if o["color"] not in COLORS or o["shape"] not in SHAPES or o.get("size") not in (None, *SIZES):
            raise ValueError(f"bad object {o}: colors {tuple(COLORS)}, shapes {SHAPES}, sizes {SIZES}")
    for shrink in (False, True):  # unspecified sizes: large, else small when large does not fit
        sizes = [o.get("size") or ("small" if shrink else "large") for o in objects]
        radii = [_EXTENT_AT_32[z] * size / 64 for z in sizes]
        centers = _spec_centers(radii, relations, size, position)
        if centers is not None:
            break
    else:
        raise ValueError(f"objects {objects} with relations {relations} do not fit in {size}x{size}")
    scene_objects = tuple(SceneObject(o["color"], o["shape"], z, (float(x), float(y)), 2 * float(r))
                          for o, z, (x, y), r in zip(objects, sizes, centers, radii))
    words, owners = build_caption(objects, position, relations)
    return Scene(scene_objects, " ".join(words), tuple(owners), size, position, tuple(relations))


def _spec_centers(radii, relations, size, position):
    if not relations:
        lo, hi = radii[0] + _pad(size), size - radii[0] - _pad(size)
        anchor = POSITION_ANCHORS[position or "center"]
        return [tuple(min(max(a * size, lo), hi) for a in anchor)] if lo <= hi else None
    for gap in (_margin(size) + 0.1 * size, _margin(size)):
        centers = _chain(radii, relations, [gap] * len(relations), [0.0] * len(relations))
        if _fits(centers, radii, size):
            x0, y0, x1, y1 = _bounds(centers, radii)
            return [(x + (size - x0 - x1) / 2, y + (size - y0 - y1) / 2) for x, y in centers]
    return None


def scene_from_caption(caption: str, size: int = 32) -> Scene:
    """Ground-truth scene for any caption in the scenes' grammar, keeping its exact words."""
    spec, owners = parse_caption_words(caption)
    scene = scene_from_spec(spec["objects"], spec["relations"], size, spec["position"])
    return dataclasses.replace(scene, caption=" ".join(caption.split()), word_objects=tuple(owners))


class ShapesDataset(torch.utils.data.Dataset):
    """Virtual dataset of `config.length` scenes; item i is always scene i of (seed, split).

    Items: pixel_values (3, H, W) float32 in [-1, 1], text str, masks (K, H, W) bool,
    word_objects list[int], index int. Batch with `collate_shapes`.
    """

    def __init__(self, config: ShapesConfig | None = None):
        self.config = config or ShapesConfig()

    def __len__(self) -> int:
        return self.config.length

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} scenes")
        scene = sample_scene(self.config, index)
        image, masks = render(scene)
        pixels = image.transpose(2, 0, 1).astype(np.float32) / np.float32(127.5) - np.float32(1)  # (3, H, W)
        return {"pixel_values": torch.from_numpy(pixels), "text": scene.caption,
                "masks": torch.from_numpy(masks),
                "word_objects": list(scene.word_objects), "index": int(index)}

    def captions(self, n: int) -> list[str]:
        """The first n captions (no rendering): e.g. to build a tokenizer vocabulary."""
        return [sample_scene(self.config, i).caption for i in range(n)]


def collate_shapes(batch: list[dict]) -> dict:
    """Stack pixel_values to (B, 3, H, W); masks differ in K, so they and the rest stay lists."""
    out = {key: [item[key] for item in batch] for key in batch[0]}
    out["pixel_values"] = torch.stack(out["pixel_values"])
    return out
