"""Image utilities: one labelled grid for every picture the project writes; a leaf the trainer can import."""

import subprocess
import sys

import numpy as np
from PIL import Image

from diffxattn.images import colormap, labelled_grid, overlay


def test_labelled_grid_places_each_image_in_its_cell_with_its_label_below():
    red, blue = Image.new("RGB", (4, 4), (255, 0, 0)), Image.new("RGB", (4, 4), (0, 0, 255))
    grid = np.asarray(labelled_grid([("red", red), ("blue", blue), ("red again", red)], columns=2, cell=64))
    assert grid.shape == (2 * (64 + 16), 128, 3)  # 2 rows of a 64 px image + one 16 px label line
    assert (grid[:64, :64] == (255, 0, 0)).all() and (grid[:64, 64:] == (0, 0, 255)).all()
    assert (grid[80:144, :64] == (255, 0, 0)).all() and (grid[80:, 64:] == 255).all()  # empty cell: white
    label = grid[64:80, :64]
    assert (label < 128).any() and (label == 255).any()  # dark text on white
    bare = np.asarray(labelled_grid([("", red), ("", blue)], columns=2, cell=4))
    assert bare.shape == (4, 8, 3) and np.array_equal(bare[:, 4:], np.asarray(blue))  # no labels: no label row


def test_overlay_is_hot_where_the_map_is_high():
    image = Image.new("RGB", (4, 4), (128, 128, 128))
    heat = np.zeros((4, 4))
    heat[:, 2:] = 1.0
    out = np.asarray(overlay(image, heat, scale=2)).astype(int)
    assert out.shape == (8, 8, 3)
    cold, hot = colormap(np.array([0.0, 1.0])).astype(int)
    assert hot[0] > 3 * hot[2] and hot.sum() > cold.sum()  # turbo: dark at 0, red at 1
    assert out[4, 7, 0] > out[4, 7, 2] and out[4, 7, 0] > out[4, 0, 0] + 40  # red where the map is high
    assert np.array_equal(out[:, :2], out[:, :1].repeat(2, 1))  # uniform where it is uniformly low


def test_the_trainer_imports_no_sampling_tools():
    code = "import sys, diffxattn.train; print(' '.join(m for m in sys.modules if m.startswith('diffxattn.')))"
    loaded = set(subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split())
    assert "diffxattn.images" in loaded
    assert not loaded & {"diffxattn.samples", "diffxattn.heatmaps", "diffxattn.viewer", "diffxattn.control",
                         "diffxattn.generation"}
