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
from PIL import Image
from safetensors.torch import save_file

from . import atomic, limits
from .conditioning import TokenizedPrompt, prompt_tokens, tokenizers
from .control.store import AttentionStore, word_keys
from .errors import short_repr
from .images import labelled_grid, overlay
from .viewer import write_viewer

_WORD_FILE = re.compile(r"word-\d{2,}-[A-Za-z0-9_-]+\.png")  # what safe_filename makes


def safe_filename(word: str, index: int) -> str:
    """A file name for the index-th word that cannot leave the output folder or hit reserved names."""
    text = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_.-")[:40] or "word"
    return f"word-{index:02d}-{text}.png"


def export(out_dir: str | Path, store: AttentionStore, image: Image.Image, prompt: str, *, seed: int | None = None,
           index: int = 0, scale: int = 8) -> dict:
    """Write every heatmap artefact of image `index` into `out_dir`; returns the maps.json content."""
    out = Path(out_dir)
    text = prompt_tokens(store.pipe, prompt)
    words = store.words(index, text)
    if not words:
        raise ValueError(f"the prompt {short_repr(prompt)} has no word inside the text encoder's window to map")
    limits.whole(scale, "scale")
    cells, w, h = -(-(len(words) + 1) // 5) * 5, image.width * scale, image.height * scale  # the grid's 5 columns
    limits.check(limits.PIXELS, cells * w * h, f"scale {scale}: a heatmap grid of {cells} tiles of {w}x{h} pixels")
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
    atomic.save_image(labelled_grid([("image", image), *tiles], columns=5, cell=image.width * scale), out / "grid.png")

    tensors, steps, layers = map_tensors(store, index)
    atomic.write_file(out / "maps.safetensors", lambda tmp: save_file(tensors, str(tmp)))
    meta = maps_meta(store, text, words, prompt, seed, steps, layers)
    meta["word_files"] = dict(zip(keys, files))
    atomic.write_text(out / "maps.json", json.dumps(meta, indent=2, ensure_ascii=False))
    for name in previous - set(files):  # the previous prompt's words: stale once maps.json no longer lists them
        (out / name).unlink(missing_ok=True)
    write_viewer(out / "index.html", image=image, **viewer_data(prompt, words, tensors, steps, layers))
    return meta


def map_tensors(store: AttentionStore, index: int = 0) -> tuple[dict[str, torch.Tensor], list[int] | None,
                                                                  list[str] | None]:
    """What maps.safetensors holds for image `index`: {"tokens": (S, H, W), "steps": (bins, S, H, W) if the
    store kept step bins, "layers": (L, S, H, W) if it kept layers}, with the bins' first steps and the layers."""
    tensors = {"tokens": store.token_maps(index).contiguous()}
    steps = layers = None
    if store.step_bins:
        tensors["steps"] = store.step_token_maps(index).contiguous()  # (bins, S, H, W)
        steps = sorted({s * store.step_bins // max(store.num_steps, 1) for s in store.steps_seen})
    if store.per_layer:
        layers, tensors["layers"] = store.layer_token_maps(index)
    return tensors, steps, layers


def maps_meta(store: AttentionStore, text: TokenizedPrompt, words: list[tuple[str, list[int]]], prompt: str,
              seed: int | None, steps: list[int] | None, layers: list[str] | None) -> dict:
    """maps.json: what the tensors of `map_tensors` are (tokens, words and their positions, steps, layers)."""
    keys = word_keys([w for w, _ in words])
    return {
        "prompt": prompt,
        "seed": seed,
        "tokens": tokenizers(store.pipe)[0].convert_ids_to_tokens(text.ids),
        "words": [w for w, _ in words],
        "word_tokens": {k: pos for k, (_, pos) in zip(keys, words)},
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


def viewer_data(prompt: str, words: list[tuple[str, list[int]]], tensors: dict[str, torch.Tensor],
                steps: list[int] | None, layers: list[str] | None) -> dict:
    """The viewer's per-word maps (`write_viewer`'s keyword arguments but the image) from `map_tensors`."""
    def per_word(maps: torch.Tensor) -> np.ndarray:  # (n, S, H, W) -> (n, words, h, w), at most 64 px
        m = torch.stack([maps[:, pos].mean(1) for _, pos in words], 1)
        if max(m.shape[-2:]) > 64:
            m = torch.nn.functional.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)
        return m.clamp_min(0).numpy()

    step_maps = per_word(tensors["steps"]) if "steps" in tensors else per_word(tensors["tokens"][None])
    return {"prompt": prompt, "words": [w for w, _ in words], "maps": step_maps, "steps": steps, "layers": layers,
            "layer_maps": per_word(tensors["layers"]) if layers else None}


def previous_word_files(out: Path) -> set[str]:
    """Names of the word PNGs the previous export into `out` wrote (its maps.json lists them): only names
    safe_filename makes, directly inside `out`, so a hand-edited maps.json cannot point at other files."""
    try:
        listed = json.loads((out / "maps.json").read_text(encoding="utf-8"))["word_files"].values()
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return set()
    return {name for name in listed if isinstance(name, str) and _WORD_FILE.fullmatch(name)}
