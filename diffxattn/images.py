"""Image utilities: labelled grids, heatmap overlays and the turbo color map (PIL and numpy only).

A leaf module: the trainer's validation grids, the heatmap export, the samples and the CLI's edit pair
use it without importing anything else of the package.
"""

from __future__ import annotations

import textwrap

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageDraw

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
    h = F.interpolate(h, size=(size[1], size[0]), mode="bilinear", align_corners=False)[0, 0].numpy()
    h = (h - h.min()) / max(float(h.max() - h.min()), 1e-12)
    mixed = (1 - alpha) * base + alpha * colormap(h).astype(np.float32)
    return Image.fromarray(mixed.round().astype(np.uint8))


def labelled_grid(cells: list[tuple[str, Image.Image]], columns: int, cell: int = 128) -> Image.Image:
    """Images enlarged (nearest) to `cell` pixels wide in rows of `columns`, each with its wrapped label below
    (no label row when every label is empty)."""
    labels = [textwrap.wrap(label, max(1, cell // 6)) for label, _ in cells]
    label_h = 12 * max(map(len, labels)) + 4 if any(labels) else 0
    cell_h = max(cell * image.height // image.width for _, image in cells)
    rows = (len(cells) + columns - 1) // columns
    canvas = Image.new("RGB", (columns * cell, rows * (cell_h + label_h)), "white")
    draw = ImageDraw.Draw(canvas)
    for k, ((_, image), label) in enumerate(zip(cells, labels)):
        x, y = (k % columns) * cell, (k // columns) * (cell_h + label_h)
        canvas.paste(image.convert("RGB").resize((cell, cell * image.height // image.width), Image.NEAREST), (x, y))
        draw.multiline_text((x + 2, y + cell_h + 2), "\n".join(label), fill="black", spacing=1)
    return canvas
