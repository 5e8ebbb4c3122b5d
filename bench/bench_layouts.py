"""UNet layouts for CPU training: images/s of a training step and FLOP per image, each config's UNet.

    python bench/bench_layouts.py [--quick] [--out bench/results] [--threads 2] [--configs A.yaml B.yaml ...]

Default: the shipped layout (`configs/shapes-32.yaml`: channels 32/64/96 at 32x32) against the CPU recipe's
(`configs/shapes-32-cpu.yaml`: a 2x2 patch stem, channels 64/96/128, the first level at 16x16). Each UNet runs
`common.TrainStep` (forward + backward + AdamW, batch 64, 32x32, random text embeddings) interleaved with the
others after a warm-up; FLOP per image of the training step is torch's FLOP counter (forward + backward).
The first config is the reference: speedup = its seconds per image / the other's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "layouts"
DEFAULT_CONFIGS = [common.ROOT / "configs" / "shapes-32.yaml", common.ROOT / "configs" / "shapes-32-cpu.yaml"]


def settings(quick: bool) -> dict:
    return dict(warmup=1, repeats=2, batch=2) if quick else dict(warmup=2, repeats=10, batch=64)


def unet(config: Path) -> torch.nn.Module:
    from diffxattn.build import build_unet
    from diffxattn.config import load_config

    torch.manual_seed(0)
    return build_unet(load_config(config).model, common.TEXT_DIM)


def main(argv=None) -> dict:
    p = common.argument_parser(__doc__.split("\n")[0])
    p.add_argument("--configs", nargs="+", type=Path, default=DEFAULT_CONFIGS, help="experiment configs (first: reference)")
    args = p.parse_args(argv)
    common.setup(args.threads)
    s = settings(args.quick)
    names = [c.stem for c in args.configs]
    models = {n: unet(c) for n, c in zip(names, args.configs, strict=True)}
    steps = {n: common.TrainStep(m, s["batch"]) for n, m in models.items()}
    flops = {n: common.count_flops(step) / s["batch"] for n, step in steps.items()}
    times = common.interleaved(steps, warmup=s["warmup"], repeats=s["repeats"])
    ref = names[0]
    rows = [common.comparison("train step", n, ref, times[n], times[ref], "s/image", per=s["batch"]) for n in names[1:]]
    layouts = {n: {"config": str(c.relative_to(common.ROOT)) if c.is_relative_to(common.ROOT) else str(c),
                   "parameters": common.num_params(models[n]), "gflop_per_image": flops[n] / 1e9,
                   "images_per_s": s["batch"] / common.median(times[n]),
                   "gflop_per_s": flops[n] * s["batch"] / common.median(times[n]) / 1e9}
               for n, c in zip(names, args.configs, strict=True)}
    data = {"benchmark": NAME, "quick": args.quick, "machine": common.machine(), "settings": s, "reference": ref,
            "layouts": layouts, "rows": rows}
    table = common.markdown_table(
        ["config", "parameters", "GFLOP / image (train step)", "images/s (median)", "GFLOP/s", "ratio (speed vs the first)"],
        [[f"`{v['config']}`", f"{v['parameters']:,}", f"{v['gflop_per_image']:.2f}", common.fmt(v["images_per_s"]),
          common.fmt(v["gflop_per_s"]), f"{v['images_per_s'] / layouts[ref]['images_per_s']:.2f}x"]
         for v in layouts.values()])
    md = "\n\n".join([f"# UNet layouts, training step ({'quick' if args.quick else 'full'})", table,
                      f"Batch {s['batch']}, 32x32, {s['repeats']} interleaved steps each after {s['warmup']} warm-up.",
                      common.machine_line(data["machine"])])
    common.write_results(args.out, NAME, data, md)
    print(md)
    return data


if __name__ == "__main__":
    main()
