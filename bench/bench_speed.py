"""Training throughput and sampling latency: XAttnUNet (shapes-32) vs diffusers UNet2DConditionModel.

    python bench/bench_speed.py [--quick] [--out bench/results] [--threads 2]

Three models within +-10% parameters, same channels (see bench/common.py): ours, diffusers with CrossAttn
blocks at every level, diffusers with CrossAttn blocks only at 16x16 and 8x8. Train: forward + backward +
AdamW on a (32, 3, 32, 32) fp32 batch with (32, 24, 128) text embeddings. Sampling: a real DiffXAttnPipeline,
30 DDIM steps, guidance 3 (batch-2 UNet calls), one image. Also (no target) UNet forward time per image at a
few batch sizes, which shows why the sampling ratio differs from the training one. Sampling also with ours
compiled (`pipe.compile_unet()`; not in --quick). FLOP per image (torch's counter) and achieved GFLOP/s of
each loop next to the machine's matrix-multiply peak, measured in the same run.
ratio = other's seconds / ours (= our speed-up).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "speed"
TARGETS = {  # ratio = other's time / ours
    "train": {"diffusers-all": 5.0, "diffusers-low": 2.0},
    "sample": {"diffusers-all": 6.0, "diffusers-low": 2.5},
}
TRAIN_PEAK_TARGET = 0.60  # ours' training step, share of the machine's matrix-multiply speed


def settings(quick: bool) -> dict:
    """Full: the task's sizes. Quick (tests): 16x16, batch 1, 2 sampling steps, one profile; same code."""
    if quick:
        return dict(
            size=16,
            train_batch=1,
            train_warmup=1,
            train_repeats=2,
            sample_steps=2,
            warmup_steps=1,
            sample_warmup=1,
            sample_repeats=2,
            forward_batches=(2,),
            forward_warmup=1,
            forward_repeats=2,
            profile_batch=1,
            profile_steps=1,
            max_profiles=1,
            compiled=False,  # compiling takes minutes; tests/test_pipeline.py checks compile_unet itself
        )
    # sampling warm-up: 2 short runs (3 UNet calls each), enough to settle the allocator and oneDNN primitives
    return dict(
        size=32,
        train_batch=32,
        train_warmup=2,
        train_repeats=5,
        sample_steps=30,
        warmup_steps=3,
        sample_warmup=2,
        sample_repeats=5,
        forward_batches=(2, 8, 32),
        forward_warmup=1,
        forward_repeats=5,
        profile_batch=32,
        profile_steps=3,
        max_profiles=6,
        compiled=True,
    )


def run(args) -> dict:
    common.setup(args.threads)
    s = settings(args.quick)
    names = list(common.MODELS)
    models = {n: common.build_model(n) for n in names}
    params = {n: common.num_params(m) for n, m in models.items()}
    common.check_param_match(params)
    print(
        "parameters:",
        ", ".join(f"{n} {p:,} ({p / params['ours'] - 1:+.1%})" for n, p in params.items()),
        flush=True,
    )

    peak = [common.matmul_peak()]
    steps = {n: common.TrainStep(m, s["train_batch"], s["size"]) for n, m in models.items()}
    train = common.interleaved(steps, warmup=s["train_warmup"], repeats=s["train_repeats"])
    train_flops = {n: common.count_flops(step) / s["train_batch"] for n, step in steps.items()}
    del steps, models

    pipes = {n: common.build_pipe(common.build_model(n), steps=s["sample_steps"]) for n in names}
    sample_flops = {n: common.count_flops(lambda p=p: common.sample(p, s["sample_steps"], s["size"]))
                    for n, p in pipes.items()}
    sides = dict(pipes)
    if s["compiled"]:  # the same weights as `ours`, compiled during the warm-up runs
        sides["ours-compiled"] = common.build_pipe(common.build_model("ours"), steps=s["sample_steps"]).compile_unet()
    started = time.perf_counter()
    sampling = common.interleaved(
        {n: (lambda p=p: common.sample(p, s["sample_steps"], s["size"])) for n, p in sides.items()},
        warm={n: (lambda p=p: common.sample(p, s["warmup_steps"], s["size"])) for n, p in sides.items()},
        warmup=s["sample_warmup"],
        repeats=s["sample_repeats"],
    )
    print(f"sampling, warm-up (with compilation) included: {time.perf_counter() - started:.0f} s", flush=True)
    peak.append(common.matmul_peak())

    rows = []
    for other in TARGETS["train"]:
        rows.append(common.comparison("train", "ours", other, train["ours"], train[other], "s/image",
                                      (">=", TARGETS["train"][other]), per=s["train_batch"]))
    for ours in [n for n in ("ours", "ours-compiled") if n in sampling]:
        for other in TARGETS["sample"]:
            rows.append(common.comparison("sample", ours, other, sampling[ours], sampling[other], "s/image",
                                          (">=", TARGETS["sample"][other]), per=1))
    for batch in s["forward_batches"]:
        fwd = forward_times({n: p.unet for n, p in pipes.items()}, batch, s)
        for other in TARGETS["sample"]:
            rows.append(
                common.comparison(
                    "forward", "ours", other, fwd["ours"], fwd[other], "s/image", per=batch, batch=batch
                )
            )
    flops = efficiency(train, sampling, train_flops, sample_flops, max(peak), s)
    profiles = profile_misses(rows, s, pipes)
    return {
        "benchmark": NAME,
        "quick": args.quick,
        "machine": common.machine(),
        "config": common.config_name(),
        "settings": s,
        "models": {
            n: {
                "params": params[n],
                "description": common.MODELS[n],
                "layers_per_block": common.model_config(n).layers_per_block,
            }
            for n in names
        },
        "comparisons": rows,
        "matmul_peak_gflop_per_s": max(peak),
        "efficiency": flops,
        "profiles": profiles,
    }


def efficiency(train: dict, sampling: dict, train_flops: dict, sample_flops: dict, peak: float, s: dict) -> list:
    """FLOP per image and achieved GFLOP/s (FLOP / median time) of each side's training step and sampling run,
    as a share of the machine's matrix-multiply peak; ours' training step has a target."""
    rows = []
    for n, t in train.items():
        gflops = train_flops[n] * s["train_batch"] / common.median(t) / 1e9
        row = {"loop": "train", "model": n, "gflop_per_image": train_flops[n] / 1e9, "gflop_per_s": gflops,
               "share_of_peak": gflops / peak}
        if n == "ours":
            row.update(target=f">= {TRAIN_PEAK_TARGET:g}", met=gflops / peak >= TRAIN_PEAK_TARGET)
        rows.append(row)
    for n, t in sampling.items():
        f = sample_flops[n.removesuffix("-compiled")]
        gflops = f / common.median(t) / 1e9
        rows.append({"loop": "sample", "model": n, "gflop_per_image": f / 1e9, "gflop_per_s": gflops,
                     "share_of_peak": gflops / peak})
    return rows


@torch.no_grad()
def forward_times(unets: dict, batch: int, s: dict) -> dict[str, list[float]]:
    """Seconds per UNet forward call at `batch`, interleaved (the sampling loop minus the scheduler)."""
    x = torch.randn(batch, 3, s["size"], s["size"], generator=torch.Generator().manual_seed(0))
    emb, mask = common.text_batch(batch)
    t = torch.tensor(500)
    fns = {
        n: (lambda u=u: u(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask))
        for n, u in unets.items()
    }
    return common.interleaved(fns, warmup=s["forward_warmup"], repeats=s["forward_repeats"])


def profile_misses(rows: list[dict], s: dict, pipes: dict) -> list[dict]:
    """Top-10 ops by self CPU time of each model in a comparison that missed its target (each model and
    measure profiled once, at most `max_profiles`)."""
    out, done = [], set()
    for row in rows:
        for side in ("ours", row["other"]):
            if row.get("met", True) or (row["metric"], side) in done or len(done) >= s["max_profiles"]:
                continue
            done.add((row["metric"], side))
            if row["metric"] == "train":
                fn = common.TrainStep(common.build_model(side), s["profile_batch"], s["size"])
            else:
                fn = lambda p=pipes[side]: common.sample(p, s["profile_steps"], s["size"])  # noqa: E731
            md, top, kinds = common.profile_table(fn, iters=1)
            out.append(
                {
                    "metric": row["metric"],
                    "versus": row["other"],
                    "model": side,
                    "table": md,
                    "top": top,
                    "kinds": kinds,
                }
            )
    return out


def markdown(data: dict) -> str:
    s, models = data["settings"], data["models"]
    ours_params = models["ours"]["params"]
    lines = [
        f"# Speed: XAttnUNet vs diffusers UNet2DConditionModel{' (quick mode)' if data['quick'] else ''}",
        "",
        common.machine_line(data["machine"]),
        "",
        common.markdown_table(
            ["model", "parameters", "vs ours", "layers per block", "attention"],
            [
                [
                    n,
                    f"{d['params']:,}",
                    f"{d['params'] / ours_params - 1:+.1%}",
                    d["layers_per_block"],
                    d["description"],
                ]
                for n, d in models.items()
            ],
        ),
        "",
        (
            f"Train: batch {s['train_batch']}, {s['size']}x{s['size']} fp32, forward + backward + AdamW, "
            f"text (B, 24, 128); {s['train_warmup']} warm-up + {s['train_repeats']} timed steps per model, "
            f"interleaved. Sample: DiffXAttnPipeline, {s['sample_steps']} DDIM steps, guidance 3 "
            f"(batch-2 UNet calls), 1 image; {s['sample_warmup']} warm-up + {s['sample_repeats']} timed "
            "runs, interleaved; `compiled`: ours after `pipe.compile_unet()` (torch.compile, compiled in its "
            "warm-up runs). "
            f"Forward (no target): one UNet call at batch B, {s['forward_repeats']} timed calls. Medians; "
            "ratio = other's time / ours."
        ),
        "",
    ]
    table = []
    for r in data["comparisons"]:
        if r["metric"] == "train":
            measure, ours, theirs = (
                "train (images/s)",
                f"{1 / r['ours_value']:.1f}",
                f"{1 / r['other_value']:.1f}",
            )
        else:
            measure = (
                f"sample{', compiled' if r['ours'] == 'ours-compiled' else ''} (s/image)"
                if r["metric"] == "sample" else f"forward, batch {r['batch']} (ms/image)"
            )
            scale = 1 if r["metric"] == "sample" else 1000
            ours, theirs = f"{r['ours_value'] * scale:.3g}", f"{r['other_value'] * scale:.3g}"
        met = "" if "met" not in r else "yes" if r["met"] else "**no**"
        rounds = common.rounds_text(r)
        table.append(
            [measure, r["other"], ours, theirs, f"{r['ratio']:.2f}x", rounds, r.get("target", ""), met]
        )
    headers = ["measure", "other", "ours", "other's", "ratio", "per-round ratios", "target", "met"]
    lines.append(common.markdown_table(headers, table))
    lines += [
        "",
        f"## FLOP per image and achieved speed (machine's fp32 matrix-multiply peak: "
        f"{data['matmul_peak_gflop_per_s']:.0f} GFLOP/s, best 1024x1024 product at this thread count, "
        "measured in this run)",
        "",
        "FLOP: torch's FLOP counter (matrix multiplies, convolutions, attention). Train: one step (forward + "
        f"backward) per image at batch {s['train_batch']}; sample: one {s['sample_steps']}-step image with "
        "guidance (2 rows per step).",
        "",
        common.markdown_table(
            ["loop", "model", "GFLOP / image", "GFLOP/s", "share of peak", "target", "met"],
            [[e["loop"], e["model"], f"{e['gflop_per_image']:.2f}", f"{e['gflop_per_s']:.1f}",
              f"{e['share_of_peak']:.0%}", e.get("target", ""),
              "" if "met" not in e else "yes" if e["met"] else "**no**"] for e in data["efficiency"]],
        ),
    ]
    for p in data["profiles"]:
        what = (
            f"{s['profile_batch']}-image train step"
            if p["metric"] == "train"
            else f"{s['profile_steps']}-step sampling run"
        )
        lines += [
            "",
            (
                f"## Missed a {p['metric']} target (vs {p['versus']}): profile of {p['model']}, one {what}, "
                "top 10 ops by self CPU time"
            ),
            "",
            p["table"],
            "",
            f"Self CPU time by kind of op: {common.kinds_line(p['kinds'])}.",
        ]
    missed = {p["metric"] for p in data["profiles"]}
    for metric in ("train", "sample"):
        if metric in missed:
            lines += ["", why(metric, data)]
    return "\n".join(lines)


def why(metric: str, data: dict) -> str:
    """The reading of the profiles and the forward-by-batch rows when a target is missed."""
    fwd = ", ".join(
        f"{r['other']} at batch {r['batch']}: {r['ratio']:.2f}x"
        for r in data["comparisons"]
        if r["metric"] == "forward"
    )
    shipped = common.config_name(common.SHIPPED)
    if data.get("config", shipped) != shipped:  # the readings below are about the shipped layout's backbone
        return f"Forward-only ratios by batch in this run: {fwd}."
    if metric == "sample":
        return (
            "**Why the sampling ratios fall short:** one image with guidance is one batch-2 UNet forward per "
            "step. Both UNets run the same convolution backbone (same channels, 2 ResBlocks at 32x32 and "
            "16x16), which the attention layout does not change, and at batch 2 ours runs it less "
            "efficiently per image than at larger batches; diffusers' extra attention costs only its forward "
            "pass here, while in training its backward adds more. Forward-only ratios by batch in this run: "
            f"{fwd}. **What would fix it:** a cheaper full-resolution backbone for ours (e.g. 1 ResBlock at "
            "32x32, where 4x the pixels are), fused GroupNorm+SiLU+conv (torch.compile), or sampling several "
            "images per UNet call; channels_last was tried by hand and changed little (about -5%)."
        )
    return (
        "**Why the training ratio falls short:** both UNets run the same convolution backbone (same "
        "channels, ResBlocks at 32x32 and 16x16), so the ratio is bounded by the share of diffusers' time "
        "spent in attention (see the kinds of op above). **What would fix it:** a cheaper full-resolution "
        "backbone for ours (fewer ResBlocks at 32x32) or fused GroupNorm+SiLU+conv (torch.compile)."
    )


def main(argv=None) -> None:
    p = common.argument_parser(__doc__.splitlines()[0])
    p.add_argument("--config", default=str(common.CONFIG),
                   help="experiment config whose UNet is 'ours' (default: the shipped layout); the diffusers UNets "
                        "get its channels and matched layers per block")
    args = p.parse_args(argv)
    common.use_config(args.config)
    data = run(args)
    common.write_results(args.out, NAME, data, markdown(data))


if __name__ == "__main__":
    main()
