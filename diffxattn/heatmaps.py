"""Heatmap export: per-word overlays, a labelled grid, raw maps, and the interactive viewer.

    diffxattn heatmap "a red circle left of a blue square" --seed 0 -o maps/

writes image.png, prompt.txt, seed.txt, one overlay PNG per word, grid.png, maps.safetensors
(per-token maps, per step bin and per layer), maps.json (tokens, words, word -> token indices, layers,
steps, resolutions) and index.html.
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

from .conditioning import TokenizedPrompt
from .control.store import AttentionStore, word_keys
from .images import labelled_grid, overlay
from .viewer import write_viewer


def safe_filename(word: str, index: int) -> str:
    """A file name for the index-th word that cannot leave the output folder or hit reserved names."""
    text = unicodedata.normalize("NFKD", word).encode("ascii", "ignore").decode()
    text = re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_.-")[:40] or "word"
    return f"word-{index:02d}-{text}.png"


def export(out_dir: str | Path, store: AttentionStore, image: Image.Image, prompt: str, *, seed: int | None = None,
           index: int = 0, scale: int = 8) -> dict:
    """Write every heatmap artefact of image `index` into `out_dir`; returns the maps.json content."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    text = TokenizedPrompt.of(store.pipe.tokenizer, prompt)
    words = store.words(index, text)
    keys = word_keys([w for w, _ in words])
    tokens = store.token_maps(index)  # (S, H, W)
    word_maps = {k: tokens[pos].mean(0) for k, (_, pos) in zip(keys, words)}

    image.save(out / "image.png")
    (out / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    if seed is not None:
        (out / "seed.txt").write_text(f"{seed}\n")
    tiles, files = [], []
    for i, (key, m) in enumerate(word_maps.items()):
        tile = overlay(image, m.numpy(), scale=scale)
        name = safe_filename(key, i)
        tile.save(out / name)
        tiles.append((key, tile))
        files.append(name)
    labelled_grid([("image", image), *tiles], columns=5, cell=image.width * scale).save(out / "grid.png")

    tensors = {"tokens": tokens.contiguous()}
    steps = layers = None
    if store.step_bins:
        tensors["steps"] = store.step_token_maps(index).contiguous()  # (bins, S, H, W)
        steps = sorted({s * store.step_bins // max(store.num_steps, 1) for s in store.steps_seen})
    if store.per_layer:
        layers, tensors["layers"] = store.layer_token_maps(index)
    save_file(tensors, str(out / "maps.safetensors"))

    meta = {
        "prompt": prompt,
        "seed": seed,
        "tokens": store.pipe.tokenizer.convert_ids_to_tokens(text.ids),
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
    (out / "maps.json").write_text(json.dumps(meta, indent=2, ensure_ascii=False), encoding="utf-8")

    def per_word(maps: torch.Tensor) -> np.ndarray:  # (n, S, H, W) -> (n, words, h, w), at most 64 px
        m = torch.stack([maps[:, pos].mean(1) for _, pos in words], 1)
        if max(m.shape[-2:]) > 64:
            m = torch.nn.functional.interpolate(m, size=(64, 64), mode="bilinear", align_corners=False)
        return m.clamp_min(0).numpy()

    step_maps = per_word(tensors["steps"]) if "steps" in tensors else per_word(tokens[None])
    write_viewer(out / "index.html", prompt=prompt, image=image, words=[w for w, _ in words], maps=step_maps,
                 steps=steps, layers=layers, layer_maps=per_word(tensors["layers"]) if layers else None)
    return meta
