"""Users' own images: a folder with `metadata.jsonl`, the convention of diffusers' training examples.

    root/metadata.jsonl   {"file_name": "cat.png", "text": "a cat"}
                          {"file_name": "sub/dog.jpg", "text": ["a dog", "a brown dog"]}

Every line is checked when the dataset is built (JSON, keys, file exists inside root), so a
typo fails in the first second of a run, not hours in; decoding is checked when an image is read.
16-bit images (PNG's I;16, Pillow's I) are scaled from 0-65535 and float images (F) from 0-1 to 8 bits;
values outside those ranges are an error naming the file.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

__all__ = ["ImageFolderDataset"]

METADATA = "metadata.jsonl"


class ImageFolderDataset(torch.utils.data.Dataset):
    """Images resized (shorter side to `size`, bicubic) and cropped to (3, size, size) in [-1, 1].

    Items: pixel_values float32 tensor, text str, index int (same keys as `ShapesDataset` without
    masks). With several captions per image, item i always gets the same one (rng keyed on
    (caption_seed, i)), so runs are reproducible. Random crop/flip draw from torch's RNG, which
    DataLoader seeds per worker. Flip is off by default: it turns "left" captions into lies.
    """

    def __init__(self, root: str | Path, size: int = 32, center_crop: bool = True,
                 random_flip: bool = False, caption_seed: int = 0):
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size={size!r} is invalid: expected a positive int")
        self.root = Path(root)
        self.size, self.center_crop, self.random_flip = size, center_crop, random_flip
        self.caption_seed = caption_seed
        self.entries = _read_metadata(self.root)  # [(image path, captions)]

    def __len__(self) -> int:
        return len(self.entries)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):
            raise IndexError(f"index {index} out of range for {len(self)} images")
        path, captions = self.entries[index]
        choice = np.random.default_rng([self.caption_seed, index]).integers(len(captions))
        image = self._crop(_resize_shorter(load_rgb(path), self.size))
        if self.random_flip and torch.rand(()) < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        pixels = np.asarray(image, np.float32).transpose(2, 0, 1) / 127.5 - 1  # (3, size, size)
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(pixels)), "text": captions[choice],
                "index": int(index)}

    def _crop(self, image: Image.Image) -> Image.Image:
        w, h = image.size
        if self.center_crop:
            left, top = (w - self.size) // 2, (h - self.size) // 2
        else:
            left = int(torch.randint(0, w - self.size + 1, ()))
            top = int(torch.randint(0, h - self.size + 1, ()))
        return image.crop((left, top, left + self.size, top + self.size))


def _read_metadata(root: Path) -> list[tuple[Path, tuple[str, ...]]]:
    meta = root / METADATA
    if not meta.is_file():
        raise ValueError(f"{meta}: missing; an image folder needs {METADATA} with lines like "
                         '{"file_name": "a.png", "text": "a caption"}')
    entries = []
    with open(meta, encoding="utf-8") as f:
        for number, line in enumerate(f, start=1):
            if line.strip():
                entries.append(_parse_line(root, meta, number, line))
    if not entries:
        raise ValueError(f"{meta}: no images listed")
    return entries


def _parse_line(root: Path, meta: Path, number: int, line: str) -> tuple[Path, tuple[str, ...]]:
    where = f"{meta} line {number}"
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise ValueError(f"{where}: not valid JSON ({err.msg})") from None
    if not isinstance(record, dict):
        raise ValueError(f"{where}: expected a JSON object, got {type(record).__name__}")
    for key in ("file_name", "text"):
        if key not in record:
            raise ValueError(f"{where}: missing key {key!r} (keys: {sorted(record)})")
    text = record["text"]
    captions = (text,) if isinstance(text, str) else tuple(text) if isinstance(text, list) else ()
    if not captions or not all(isinstance(c, str) for c in captions):
        raise ValueError(f"{where}: 'text' must be a string or a non-empty list of strings, got {text!r}")
    name = record["file_name"]
    if not isinstance(name, str):
        raise ValueError(f"{where}: 'file_name' must be a string, got {name!r}")
    path = (root / name).resolve()
    # metadata is user data: it must not point the loader at files outside the folder
    if not path.is_relative_to(root.resolve()):
        raise ValueError(f"{root / name}: outside the image folder {root} ({where})")
    if not path.is_file():
        raise ValueError(f"{root / name}: file does not exist ({where})")
    return path, captions


# Modes whose values convert("RGB") clips to 0-255 (a 16-bit PNG's mid-gray 32768 became white): full scale
HIGH_DEPTH = {"I;16": 65535, "I;16L": 65535, "I;16B": 65535, "I;16N": 65535, "I": 65535, "F": 1.0}


class ImageRangeError(ValueError):
    """A 16-bit or float image with values outside its mode's range."""


def load_rgb(path: Path) -> Image.Image:
    try:
        with Image.open(path) as image:
            return to_rgb(image, path)
    except ImageRangeError:
        raise
    except Exception as err:  # the file is user data: any failure of the decoder is the file's
        raise ValueError(f"{path}: cannot be decoded as an image ({type(err).__name__}: {err})") from None


def to_rgb(image: Image.Image, path: Path) -> Image.Image:
    """8-bit RGB; 16-bit and float grayscale scaled from their full range (not clipped)."""
    if image.mode not in HIGH_DEPTH:
        return image.convert("RGB")
    full = HIGH_DEPTH[image.mode]
    values = np.asarray(image, dtype=np.float64)  # (H, W)
    low, high = float(values.min()), float(values.max())
    if not (np.isfinite(values).all() and low >= 0 and high <= full):
        raise ImageRangeError(f"{path}: a mode {image.mode} image with values from {low:g} to {high:g}; expected "
                              f"0 to {full:g}")
    gray = np.round(values * (255 / full)).astype(np.uint8)
    return Image.fromarray(gray).convert("RGB")  # (H, W) uint8: mode L


def _resize_shorter(image: Image.Image, size: int) -> Image.Image:
    w, h = image.size
    scale = size / min(w, h)
    new = (max(size, round(w * scale)), max(size, round(h * scale)))
    return image if new == (w, h) else image.resize(new, Image.Resampling.BICUBIC)
