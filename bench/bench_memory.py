"""Peak memory (RSS) of training and sampling: XAttnUNet (shapes-32) vs diffusers UNet2DConditionModel.

    python bench/bench_memory.py [--quick] [--out bench/results]

Each measurement runs in its own fresh process, so peaks never mix: a multiprocessing fork server imports
torch/diffusers/diffxattn once (and runs no tensor op), and every measurement is a process forked from it.
A forked process starts with its peak (VmHWM) at its current RSS, i.e. "interpreter + libraries"
(reported as `base`); the measurement builds the model and runs the loop, then reads VmHWM.
- train: build the UNet + AdamW, `train_steps` forward + backward + AdamW steps at batch 32, 32x32.
- sample: a DiffXAttnPipeline around the UNet, `sample_runs` generations (30 DDIM steps, guidance 3, 1 image).
ratio = other's peak / ours.
"""

from __future__ import annotations

import multiprocessing as mp
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "memory"


def settings(quick: bool) -> dict:
    if quick:
        return dict(size=16, train_batch=2, train_steps=2, sample_steps=2, sample_runs=1, repeats=1)
    # the peak comes within the first step / run (AdamW allocates its state on the first step)
    return dict(size=32, train_batch=32, train_steps=2, sample_steps=30, sample_runs=1, repeats=2)


def measure(mode: str, model: str, s: dict, threads: int) -> dict:
    """In a fresh (forked) process: RSS before anything is built, and the peak after building and running."""
    common.reset_peak_rss()
    common.setup(threads)
    base = common.rss_mb("VmRSS")
    unet = common.build_model(model)
    if mode == "train":
        step = common.TrainStep(unet, s["train_batch"], s["size"])
        for _ in range(s["train_steps"]):
            step()
    else:
        pipe = common.build_pipe(unet, steps=s["sample_steps"])
        for _ in range(s["sample_runs"]):
            common.sample(pipe, s["sample_steps"], s["size"])
    return {
        "mode": mode,
        "model": model,
        "base_mb": base,
        "peak_mb": common.rss_mb("VmHWM"),
        "params": common.num_params(unet),
    }


def run(args) -> dict:
    common.setup(args.threads)
    s = settings(args.quick)
    ctx = mp.get_context("forkserver")
    # the server imports the heavy libraries once; each measurement is a fresh process forked from it
    ctx.set_forkserver_preload(["common", "diffxattn.build", "diffxattn.control.store"])
    results: dict[tuple[str, str], list[dict]] = {}
    with ctx.Pool(1, maxtasksperchild=1) as pool:  # one process per measurement
        for _ in range(s["repeats"]):
            for mode in ("train", "sample"):
                for model in common.MODELS:
                    r = pool.apply(measure, (mode, model, s, args.threads))
                    print(
                        f"{mode:6s} {model:14s} base {r['base_mb']:.0f} MiB, peak {r['peak_mb']:.0f} MiB",
                        flush=True,
                    )
                    results.setdefault((mode, model), []).append(r)
    rows = []
    for mode in ("train", "sample"):
        ours = results[(mode, "ours")]
        for other in ("diffusers-all", "diffusers-low"):
            theirs = results[(mode, other)]
            rows.append(
                common.comparison(
                    mode,
                    "ours",
                    other,
                    [r["peak_mb"] for r in ours],
                    [r["peak_mb"] for r in theirs],
                    "MiB",
                    base={
                        "ours": common.median([r["base_mb"] for r in ours]),
                        "other": common.median([r["base_mb"] for r in theirs]),
                    },
                )
            )
    params = {m: results[("train", m)][0]["params"] for m in common.MODELS}
    machine = common.machine()
    machine.pop("cpu_per_wall", None)  # this process only waits for its children
    return {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": machine,
        "settings": s,
        "models": {m: {"params": params[m], "description": common.MODELS[m]} for m in common.MODELS},
        "comparisons": rows,
    }


def markdown(data: dict) -> str:
    s = data["settings"]
    lines = [
        f"# Peak memory (RSS){' (quick mode)' if data['quick'] else ''}",
        "",
        common.machine_line(data["machine"], "peak RSS does not depend on load"),
        "",
        (
            f"Each cell: one fresh process (median of {s['repeats']}). train: batch {s['train_batch']}, "
            f"{s['size']}x{s['size']} fp32, {s['train_steps']} forward + backward + AdamW steps. sample: "
            f"DiffXAttnPipeline, {s['sample_runs']} x {s['sample_steps']} DDIM steps, guidance 3, 1 image. "
            "base = the process before building anything (Python + torch + diffusers + transformers); "
            "added = peak - base."
        ),
        "",
    ]
    table, seen = [], set()
    for r in data["comparisons"]:
        for side, name, value in (("ours", "ours", r["ours_value"]), ("other", r["other"], r["other_value"])):
            if (r["metric"], name) in seen:
                continue
            seen.add((r["metric"], name))
            base = r["base"][side]
            table.append(
                [
                    r["metric"],
                    name,
                    f"{data['models'][name]['params']:,}",
                    f"{value:.0f}",
                    f"{base:.0f}",
                    f"{value - base:.0f}",
                    "" if side == "ours" else f"{r['ratio']:.2f}x",
                ]
            )
    lines.append(
        common.markdown_table(
            ["loop", "model", "parameters", "peak MiB", "base MiB", "added MiB", "peak ratio (other/ours)"],
            table,
        )
    )
    return "\n".join(lines)


def main(argv=None) -> None:
    args = common.parse_args(__doc__.splitlines()[0], argv)
    data = run(args)
    common.write_results(args.out, NAME, data, markdown(data))


if __name__ == "__main__":
    main()
