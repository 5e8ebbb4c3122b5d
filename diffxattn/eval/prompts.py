"""The fixed prompt sets of the evaluation, built from the shapes scenes' vocabulary.

    sets = prompt_sets()                       # {"single": 64 prompts, "two": 64, "heldout": 32}
    sets["single"][0]                          # e.g. "a small purple diamond at the bottom"
    prompt_sets(quick=True)["two"]             # the first 4 prompts of the full "two" set

Each set is every prompt its grammar allows, shuffled once with a fixed seed; a set of n prompts is
the first n of that order, so sets are the same on every machine and a quick set is a prefix of the
full one. `single` and `two` use only training (color, shape) pairs; `heldout` uses only the
dataset's held-out pairs, which training never shows (compositional generalisation).
"""

from __future__ import annotations

import functools
import itertools

import numpy as np

from ..data.captions import COLORS, POSITIONS, RELATIONS, SHAPES, SIZES, build_caption
from ..data.shapes import _EXTENT_AT_32, ShapesConfig

__all__ = ["SET_NAMES", "FULL_SIZES", "QUICK_SIZES", "prompt_set", "prompt_sets", "box_prompts", "color_swap", "shape_swap",
           "reweighted", "color_word_index", "first_object"]

SET_NAMES = ("single", "two", "heldout")
FULL_SIZES = {"single": 64, "two": 64, "heldout": 32}
QUICK_SIZES = {"single": 4, "two": 4, "heldout": 4}
_SIZE_WORDS = (None, "small", "large")
# Two objects: at most one "large", so every prompt fits even a 16x16 image (two large ones do not).
_PAIR_SIZES = ((None, None), ("small", None), (None, "small"), ("small", "large"), ("large", "small"))


def _caption(objects: list[dict], position: str | None = None, relation: str | None = None) -> str:
    words, _ = build_caption(objects, position, [relation] if relation else [])
    return " ".join(words)


@functools.lru_cache(maxsize=16)
def _all_prompts(name: str, holdout: tuple[tuple[str, str], ...]) -> tuple[str, ...]:
    """Every prompt of a set, in its fixed shuffled order."""
    train = ShapesConfig(holdout=holdout).train_pairs
    if name in ("single", "heldout"):
        pairs = train if name == "single" else holdout
        prompts = [_caption([{"color": c, "shape": s, "size": z}], position=p)
                   for (c, s), p, z in itertools.product(pairs, POSITIONS, _SIZE_WORDS)]
    elif name == "two":
        prompts = [_caption([{"color": a[0], "shape": a[1], "size": za},
                             {"color": b[0], "shape": b[1], "size": zb}], relation=r)
                   for a, b, r, (za, zb) in itertools.product(train, train, RELATIONS, _PAIR_SIZES)
                   if a[0] != b[0]]  # distinct colors: each color word names one object, as in training
    else:
        raise ValueError(f"unknown prompt set {name!r}; expected one of {SET_NAMES}")
    order = np.random.default_rng(SET_NAMES.index(name)).permutation(len(prompts))
    return tuple(prompts[i] for i in order)


def prompt_set(name: str, n: int | None = None, *, holdout=None) -> list[str]:
    """The first n prompts of set `name` (default: its full size); `holdout`: the held-out
    (color, shape) pairs, default `ShapesConfig().holdout`."""
    holdout = tuple(tuple(p) for p in (ShapesConfig().holdout if holdout is None else holdout))
    everything = _all_prompts(name, holdout)
    n = FULL_SIZES[name] if n is None else n
    if not 0 < n <= len(everything):
        raise ValueError(f"prompt set {name!r} has {len(everything)} prompts; asked for n={n}")
    return list(everything[:n])


def prompt_sets(names=SET_NAMES, *, quick: bool = False, sizes: dict[str, int] | None = None,
                holdout=None) -> dict[str, list[str]]:
    """{set name: prompts} for `names`; sizes override the full (or, with quick, the quick) sizes."""
    default = QUICK_SIZES if quick else FULL_SIZES
    sizes = {**default, **(sizes or {})}
    return {name: prompt_set(name, sizes[name], holdout=holdout) for name in names}


def box_prompts(n: int = 64, *, size: int = 32, holdout=None) -> list[tuple[str, str, tuple[float, float, float, float]]]:
    """n (prompt, shape word, box) for `--box`: "a small red circle" (size always said, no position) and a box
    (x0, y0, x1, y1 in fractions of the image) as wide as that object is drawn at its size, at a random place
    inside the image's border. Fixed order and boxes, as the other sets."""
    train = ShapesConfig(holdout=tuple(tuple(p) for p in (ShapesConfig().holdout if holdout is None else holdout))
                         ).train_pairs
    rng = np.random.default_rng(len(SET_NAMES))
    items = []
    for k in rng.permutation(len(train) * len(SIZES))[:n] if n <= len(train) * len(SIZES) else \
            rng.integers(0, len(train) * len(SIZES), n):
        (color, shape), word = train[k // len(SIZES)], SIZES[k % len(SIZES)]
        side = 2 * _EXTENT_AT_32[word] * size / 64 / size  # the object's diameter, as a fraction of the image
        pad = max(1.0, size / 32) / size
        x0, y0 = rng.uniform(pad, 1 - pad - side, 2)
        items.append((_caption([{"color": color, "shape": shape, "size": word}]), shape,
                      (float(x0), float(y0), float(x0 + side), float(y0 + side))))
    return items


def color_word_index(prompt: str) -> int:
    """Index in `prompt.split()` of the first color word."""
    return next(i for i, w in enumerate(prompt.split()) if w in COLORS)


def first_object(prompt: str) -> tuple[int, str, str]:
    """(index in `prompt.split()` of the first color word, that color, the shape word it describes)."""
    words = prompt.split()
    i = color_word_index(prompt)
    return i, words[i], next(w for w in words[i:] if w in SHAPES)


def color_swap(prompt: str, *, holdout=None) -> str:
    """The prompt with its (first) object's color replaced by the next color, in palette order,
    that makes a training pair with its shape and is not another object's color: "a red circle at the left"
    -> "an orange circle ..."."""
    return _swap(prompt, "color", holdout)


def shape_swap(prompt: str, *, holdout=None) -> str:
    """The prompt with its (first) object's shape replaced by the next shape, in `SHAPES` order,
    that makes a training pair with its color: "a red circle at the left" -> "a red square ..."."""
    return _swap(prompt, "shape", holdout)


def _swap(prompt: str, attribute: str, holdout) -> str:
    holdout = ShapesConfig().holdout if holdout is None else tuple(tuple(p) for p in holdout)
    words = prompt.split()
    i, color, shape = first_object(prompt)
    if attribute == "color":
        used = set(words) & set(COLORS)  # another object's color would make the prompt name two of it
        index, names, pair = i, [c for c in COLORS if c == color or c not in used], lambda c: (c, shape)
    else:
        index, names, pair = words.index(shape, i), list(SHAPES), lambda s: (color, s)
    start = names.index(words[index])
    for k in range(1, len(names)):
        new = names[(start + k) % len(names)]
        if pair(new) not in holdout:
            words[index] = new
            break
    if i > 0 and words[i - 1] in ("a", "an"):  # "an orange", "a red"
        words[i - 1] = "an" if words[i][0] in "aeiou" else "a"
    return " ".join(words)


def reweighted(prompt: str, weight: float) -> str:
    """The prompt with weight syntax on its color word: "a (red:1.5) circle at the left"."""
    words = prompt.split()
    i = color_word_index(prompt)
    words[i] = f"({words[i]}:{weight:g})"
    return " ".join(words)
