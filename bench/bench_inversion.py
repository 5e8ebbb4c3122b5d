"""Real-image inversion on renders of the shapes data: reconstruction PSNR and time per method, and color-swap
edits of the inverted renders scored with the renders' exact masks.

    python bench/bench_inversion.py              # 64 renders, every method at guidance 1 and the pipeline's; ~20 min
    python bench/bench_inversion.py --quick      # a tiny pipeline it builds, 2 renders: the plumbing only

Renders: scenes 0..n-1 of the shapes generator with seed 90210 (training used seed 0: never-seen scenes), drawn
by the data generator itself (`data.shapes.render`), inverted with their captions.
Reconstruction: each method inverts each render at guidance 1 and at the pipeline's default guidance (and
guidance interval), then the pipeline samples from the inversion; PSNR of that image against the render.
Edit (default method, default guidance): the first object's color word swapped for another color,
`edit(..., inversion=inv, local_blend=[its shape word], feature_replace=0.8)`. Scored against the render's mask of
that object (grown by 1 pixel, so anti-aliased edges count as the object):
* target color: the detected object at the mask (largest overlap) has the new color;
* outside change: mean |edited - render| outside the grown mask, in 0..1 of the 255 levels;
* shape and position kept: that object keeps its shape and its mask IoU with the render's is >= 0.5.
"""

from __future__ import annotations

import statistics
import sys
from pathlib import Path

import numpy as np
from PIL import Image
from scipy.ndimage import binary_dilation

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import argument_parser, machine, markdown_table, setup, write_results  # noqa: E402

NAME = "inversion"
SEED = 90210  # scenes never seen in training (configs use data seed 0)


def quick_pipeline(folder: Path) -> str:
    """A tiny untrained pipeline (DDIM, 16x16), built and saved locally."""
    from diffxattn.cli import main as cli

    assert cli(["build", "configs/tiny.yaml", "-o", str(folder)]) == 0
    return str(folder)


def render_scenes(n: int, size: int):
    from diffxattn.data.shapes import ShapesConfig, render, sample_scene

    config = ShapesConfig(seed=SEED, size=size)
    for k in range(n):
        scene = sample_scene(config, k)
        image, masks = render(scene)
        yield scene, image, masks


def to_uint8(images) -> np.ndarray:
    return np.round(np.asarray(images) * 255).astype(np.uint8)


def color_swap_target(scene) -> tuple[str, str, int]:
    """(target prompt, new color, index of the edited object): the first object's color swapped for the next
    color that makes a training pair with its shape (`eval.prompts.color_swap`)."""
    from diffxattn.eval.prompts import color_swap, first_object

    target = color_swap(scene.caption)
    i, _, _ = first_object(scene.caption)
    return target, target.split()[i], scene.word_objects[i]


def edit_scores(edited: np.ndarray, render: np.ndarray, mask: np.ndarray, new_color: str, shape: str) -> dict:
    from diffxattn.eval.detector import detect
    from diffxattn.eval.metrics import iou

    grown = binary_dilation(mask, iterations=1)
    outside = float(np.abs(edited.astype(np.float32) - render)[~grown].mean() / 255)
    detections = detect(edited)
    best = max(detections, key=lambda d: (d.mask & mask).sum(), default=None)
    if best is None or not (best.mask & mask).any():
        return {"target_color": False, "shape_position_kept": False, "outside_change": outside}
    return {"target_color": best.color == new_color,
            "shape_position_kept": best.shape == shape and iou(best.mask, mask) >= 0.5,
            "outside_change": outside}


def summary(values: list[float]) -> dict:
    finite = [v for v in values if np.isfinite(v)]
    return {"n": len(values), "mean": statistics.fmean(finite) if finite else None,
            "median": statistics.median(values), "min": min(values), "exact": len(values) - len(finite)}


def main(argv=None) -> dict:
    p = argument_parser(__doc__.split("\n")[0])
    p.add_argument("--pipeline", help="pipeline folder (default: the shipped one; --quick: a tiny one it builds)")
    p.add_argument("--n", type=int, help="renders (default 64; quick 2)")
    p.add_argument("--methods", nargs="+", help="inversion methods (default: all)")
    args = p.parse_args(argv)
    setup(args.threads)
    import tempfile

    import torch

    from diffxattn.cli import load_pipeline
    from diffxattn.control import StepRange
    from diffxattn.generation import edit
    from diffxattn.inversion import METHODS, invert, psnr, reconstruct

    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        folder = args.pipeline or (quick_pipeline(Path(tmp) / "pipe") if args.quick else None)
        pipe = load_pipeline(folder)
    n = args.n or (2 if args.quick else 64)
    methods = args.methods or list(METHODS)
    default_guidance = float(pipe.config.default_guidance_scale)
    guidances = sorted({1.0, default_guidance})
    size = pipe.unet.config.sample_size
    scenes = list(render_scenes(n, size))

    results = {}
    for guidance in guidances:
        for method in methods:
            values, seconds = [], []
            for scene, image, masks in scenes:
                inv = invert(pipe, Image.fromarray(image), scene.caption, method=method, guidance=guidance)
                seconds.append(inv.seconds)
                values.append(psnr(to_uint8(reconstruct(pipe, inv, output_type="np").images[0]), image))
            results[f"{method}@{guidance:g}"] = {"method": method, "guidance": guidance, "psnr": summary(values),
                                                 "seconds": statistics.median(seconds), "psnr_values": values}
            print(f"{method} guidance {guidance:g}: PSNR median {statistics.median(values):.2f} dB, "
                  f"min {min(values):.2f}; {statistics.median(seconds):.2f} s", flush=True)

    rows = []
    for scene, image, masks in scenes:
        inv = invert(pipe, Image.fromarray(image), scene.caption, guidance=default_guidance)
        target, new_color, obj = color_swap_target(scene)
        shape = scene.objects[obj].shape
        result = edit(pipe, scene.caption, target, inversion=inv, local_blend=[shape],
                      feature_replace=StepRange.fraction(0, 0.8), output_type="np")
        rows.append(edit_scores(to_uint8(result.edited), image, masks[obj], new_color, shape))
    edits = {"n": len(rows), "method": METHODS[0], "guidance": default_guidance,
             **{k: statistics.fmean(float(r[k]) for r in rows)
                for k in ("target_color", "shape_position_kept", "outside_change")},
             "max_outside_change": max(r["outside_change"] for r in rows)}

    data = {"benchmark": NAME, "quick": args.quick, "machine": machine(), "pipeline": folder or "pipelines/shapes-32",
            "renders": n, "seed": SEED, "steps": int(pipe.config.default_steps), "reconstruction": results,
            "edits": edits}
    table = markdown_table(
        ["method", "guidance", "PSNR median (dB)", "PSNR mean", "PSNR min", "exact", "s / inversion"],
        [[r["method"], f"{r['guidance']:g}", f"{r['psnr']['median']:.2f}",
          "-" if r["psnr"]["mean"] is None else f"{r['psnr']['mean']:.2f}", f"{r['psnr']['min']:.2f}",
          r["psnr"]["exact"], f"{r['seconds']:.2f}"] for r in results.values()])
    m = data["machine"]
    md = (f"# Inversion: {n} renders of the shapes data (seed {SEED}), {data['pipeline']}, "
          f"{data['steps']} DDIM steps\n\n"
          f"Machine: {m['nproc']} CPU cores ({m['cpu']}), torch {m['torch']}, {m['threads']} threads; "
          f"load average {m['loadavg_1m_at_start']} at start.\n\n"
          f"Reconstruction (PSNR of the pipeline's image from the inversion against the render; 'exact': "
          f"identical images, counted as inf in the median and min, left out of the mean):\n\n{table}\n\n"
          f"Color swap of the first object on the inverted renders ({edits['method']}, guidance {edits['guidance']:g}, "
          f"local blend on its shape word, feature_replace 0.8), n = {edits['n']}:\n\n"
          + markdown_table(["target color", "shape and position kept", "outside change (mean, 0..1)",
                            "outside change (max)"],
                           [[f"{edits['target_color']:.3f}", f"{edits['shape_position_kept']:.3f}",
                             f"{edits['outside_change']:.5f} ({edits['outside_change'] * 255:.2f}/255)",
                             f"{edits['max_outside_change'] * 255:.2f}/255"]]))
    write_results(args.out, NAME, data, md)
    return data


if __name__ == "__main__":
    main()
