"""Heatmap export: per-word overlays, a labelled grid, raw maps, and the interactive viewer.

    diffxattn heatmap "a red circle left of a blue square" --seed 0 -o maps/

writes image.png, prompt.txt, seed.txt, one overlay PNG per word, grid.png, maps.safetensors
(per-token maps, per step bin and per layer), maps.json (tokens, words, word -> token indices, layers,
steps, resolutions) and index.html. Every file is written atomically. Exporting into a folder used before
removes the previous export's word PNGs that this one does not write (maps.json lists them), and nothing else.
"""

from __future__ import annotations

import json
import re
import unicodedata
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageDraw
from safetensors.torch import save_file

from . import atomic, limits
from .errors import short_repr
from .control.store import AttentionStore, word_keys
from .prompts import clean_text
from .viewer import write_viewer

_WORD_FILE = re.compile(r"word-\d{2,}-[A-Za-z0-9_-]+\.png")  # what safe_filename makes

# Google's "turbo" colormap, polynomial approximation (Mikhailov 2019): x in [0, 1] -> RGB in [0, 1].
_TURBO = np.array([
    [0.13572138, 4.61539260, -42.66032258, 132.13108234, -152.94239396, 59.28637943],
    [0.09140261, 2.19418839, 4.84296658, -14.18503333, 4.27729857, 2.82956604],
    [0.10667330, 12.64194608, -60.58204836, 110.36276771, -89.90310912, 27.34824973],
])


def colormap(x: np.ndarray) -> np.ndarray:
    """Values in [0, 1] (...,) -> turbo RGB uint8 (..., 3)."""
    x = np.clip(x, 0.0, 1.0)[..., None]
    powers = x ** np.arange(6)  # (..., 6)
    return (np.clip(powers @ _TURBO.T, 0, 1) * 255).round().astype(np.uint8)


def overlay(image: Image.Image, heat: np.ndarray, alpha: float = 0.55, scale: int = 8) -> Image.Image:
    """The image enlarged `scale`x (nearest) with a min-max-normalised heatmap blended over it."""
    size = (image.width * scale, image.height * scale)
    base = np.asarray(image.convert("RGB").resize(size, Image.NEAREST), dtype=np.float32)
    h = torch.as_tensor(heat, dtype=torch.float32)[None, None]
    h = torch.nn.functional.interpolate(h, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0].numpy()
    h = (h - h.min()) / max(float(h.max() - h.min()), 1e-12)
    mixed = (1 - alpha) * base + alpha * colormap(h).astype(np.float32)
    return Image.fromarray(mixed.round().astype(np.uint8))


def safe_filename(word: str, index: int) -> str:
    """A file name for the index-th word that cannot leave the output folder or hit reserved names."""
    text = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_.-")[:40] or "word"
    return f"word-{index:02d}-{text}.png"


_LABEL = 18  # pixels above each grid cell for its word


def grid_size(image_size: tuple[int, int], words: int, scale: int, columns: int = 5) -> tuple[int, int]:
    """(width, height) of the grid of the image and `words` overlays."""
    rows = (words + 1 + columns - 1) // columns
    return columns * image_size[0] * scale, rows * (image_size[1] * scale + _LABEL)


def grid(image: Image.Image, tiles: list[tuple[str, Image.Image]], scale: int = 8, columns: int = 5) -> Image.Image:
    """The image followed by one labelled overlay per word, in rows of `columns`."""
    cells = [("image", image.convert("RGB").resize((image.width * scale, image.height * scale), Image.NEAREST))]
    cells += tiles
    w, h = cells[0][1].size
    label = _LABEL
    canvas = Image.new("RGB", grid_size(image.size, len(tiles), scale, columns), "white")
    draw = ImageDraw.Draw(canvas)
    for i, (name, tile) in enumerate(cells):
        x, y = (i % columns) * w, (i // columns) * (h + label)
        canvas.paste(tile, (x, y + label))
        draw.text((x + 4, y + 3), name, fill="black")
    return canvas


def export(out_dir: str | Path, store: AttentionStore, image: Image.Image, prompt: str, *, seed: int | None = None,
           index: int = 0, scale: int = 8) -> dict:
    """Write every heatmap artefact of image `index` into `out_dir`; returns the maps.json content."""
    out = Path(out_dir)
    words = store.words(index, prompt)
    if not words:
        raise ValueError(f"the prompt {short_repr(prompt)} has no word inside the text encoder's window to map")
    limits.whole(scale, "scale")
    width, height = grid_size(image.size, len(words), scale)
    limits.check(limits.PIXELS, width * height, f"scale {scale}: a heatmap grid of {width}x{height} pixels")
    out.mkdir(parents=True, exist_ok=True)
    previous = previous_word_files(out)
    keys = word_keys([w for w, _ in words])
    tokens = store.token_maps(index)  # (S, H, W)
    word_maps = {k: tokens[pos].mean(0) for k, (_, pos) in zip(keys, words)}

    atomic.save_image(image, out / "image.png")
    atomic.write_text(out / "prompt.txt", prompt + "\n")
    if seed is not None:
        atomic.write_text(out / "seed.txt", f"{seed}\n")
    tiles, files = [], []
    for i, (key, m) in enumerate(word_maps.items()):
        tile = overlay(image, m.numpy(), scale=scale)
        name = safe_filename(key, i)
        atomic.save_image(tile, out / name)
        tiles.append((key, tile))
        files.append(name)
    atomic.save_image(grid(image, tiles, scale), out / "grid.png")

    tensors = {"tokens": tokens.contiguous()}
    steps = layers = None
    if store.step_bins:
        tensors["steps"] = store.step_token_maps(index).contiguous()  # (bins, S, H, W)
        steps = sorted({s * store.step_bins // max(store.num_steps, 1) for s in store.steps_seen})
    if store.per_layer:
        layers, tensors["layers"] = store.layer_token_maps(index)
    atomic.write_file(out / "maps.safetensors", lambda tmp: save_file(tensors, str(tmp)))

    ids = store.pipe.tokenizer(clean_text(prompt)).input_ids
    meta = {
        "prompt": prompt,
        "seed": seed,
        "tokens": store.pipe.tokenizer.convert_ids_to_tokens(ids),
        "words": [w for w, _ in words],
        "word_tokens": {k: pos for k, (_, pos) in zip(keys, words)},
        "word_files": dict(zip(keys, files)),
        "resolutions": store.captured_resolutions,
        "image_size": list(store.image_size),
        "num_steps": store.num_steps,
        "steps_captured": sorted(store.steps_seen),
        "step_bins": steps,
        "layers": layers,
        "maps": {"tokens": "(S, H, W) per token position, BOS at 0",
                 "steps": "(bins, S, H, W) per step bin" if steps else None,
                 "layers": "(L, S, H, W) per layer, summed over steps" if layers else None},
    }
    atomic.write_text(out / "maps.json", json.dumps(meta, indent=2, ensure_ascii=False))
    for name in previous - set(files):  # the previous prompt's words: stale once maps.json no longer lists them
        (out / name).unlink(missing_ok=True)

    def per_word(maps: torch.Tensor) -> np.ndarray:  # (n, S, H, W) -> (n, words, h, w), at most 64 px
        m = torch.stack([maps[:, pos].mean(1) for _, pos in words], 1)
        if max(m.shape[-2:]) > 64:
            m = torch.nn.functional.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)
        return m.clamp_min(0).numpy()

    step_maps = per_word(tensors["steps"]) if "steps" in tensors else per_word(tokens[None])
    write_viewer(out / "index.html", prompt=prompt, image=image, words=[w for w, _ in words], maps=step_maps,
                 steps=steps, layers=layers, layer_maps=per_word(tensors["layers"]) if layers else None)
    return meta


def previous_word_files(out: Path) -> set[str]:
    """Names of the word PNGs the previous export into `out` wrote (its maps.json lists them): only names
    safe_filename makes, directly inside `out`, so a hand-edited maps.json cannot point at other files."""
    try:
        listed = json.loads((out / "maps.json").read_text(encoding="utf-8"))["word_files"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {name for name in listed if isinstance(name, str) and _WORD_FILE.fullmatch(name)}
