"""Equal-time quality and where cross-attention lives: UNet variants trained for the same wall time, then evaluated.

    python bench/bench_quality.py [--minutes 10] [--variants ours diffusers-all ...] [--quick] [--out bench/results]
    python bench/bench_quality.py --minutes 3 --batch 512 --set train.mixed_precision=bf16 optim.lr=1e-3 \
        data.num_workers=4 --prompts 64 64 32 --keep runs/quality     # on a GPU
    python bench/bench_quality.py --minutes 11 --batch 32 --set data.max_objects=1 optim.lr=8e-4 \
        --sets single heldout --prompts 48 0 24                         # single objects, 2 CPU cores

Every variant trains with the project's trainer (`diffxattn.train.train`) on the shapes data, with the same
frozen text encoder (`--text`, default the shipped pipeline's CLIP), batch, learning rate (warm-up: a tenth of
the run) and threads, for the same wall time: a short probe run measures each variant's images/s with that
trainer, and the real run gets max_steps = minutes * 60 * images/s / batch (so every cosine schedule runs to
its end). Then each pipeline is scored by `evaluate` (all-correct accuracy per prompt set; shape- and color-word
heatmap IoU at the best threshold, of the maps of every resolution together and of each resolution alone;
guidance 1) and its sampling time per image is measured (30 DDIM steps, one image per call).

Two tables come from the same runs:
- equal time (issue target: ours' all-correct accuracy >= each diffusers UNet's; also compared on the mean
  per-attribute accuracy, which still separates models whose all-correct accuracy is 0 after a short run):
  ours, diffusers-all, diffusers-low;
- where attention lives: cross-attention at {8}, {16, 8} (ours), {32, 16, 8}; self-attention at {8} (ours), all.
"""

from __future__ import annotations

import json
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

from diffxattn.eval.prompts import SET_NAMES  # noqa: E402

NAME = "quality"
LAYERS = "[" + ", ".join(map(str, common.diffusers_layers_per_block())) + "]"
VARIANTS = {  # name -> (description, config overrides)
    "ours": ("XAttnUNet: cross-attn at 16, 8; self-attn at 8 (the default)", []),
    "diffusers-all": (common.MODELS["diffusers-all"], ["model.kind=diffusers", f"model.layers_per_block={LAYERS}"]),
    "diffusers-low": (common.MODELS["diffusers-low"], ["model.kind=diffusers", f"model.layers_per_block={LAYERS}",
                                                       "model.diffusers_attention_levels=[1, 2]"]),
    "cross-8": ("XAttnUNet: cross-attn at 8 only; self-attn at 8", ["model.cross_attention_resolutions=[8]"]),
    "cross-all": ("XAttnUNet: cross-attn at 32, 16, 8; self-attn at 8",
                  ["model.cross_attention_resolutions=[32, 16, 8]"]),
    "self-all": ("XAttnUNet: cross-attn at 16, 8; self-attn at 32, 16, 8",
                 ["model.self_attention_resolutions=[32, 16, 8]"]),
}
EQUAL_TIME = ("ours", "diffusers-all", "diffusers-low")
ABLATION = ("cross-8", "ours", "cross-all", "self-all")


def settings(args) -> dict:
    """The run's settings (recorded in the results); --quick: tiny sizes, same code."""
    extra = dict(overrides=list(args.set or []))
    sets = [k for k in SET_NAMES if k in (args.sets or SET_NAMES)]  # in the report's order
    if args.quick:
        return dict(minutes=0.05, batch=4, probe_steps=3, min_steps=2, sizes={k: 1 for k in sets},
                    eval_steps=2, sample_steps=2, sample_repeats=1, **extra)
    return dict(minutes=args.minutes, batch=args.batch, probe_steps=8, min_steps=10,
                sizes={k: n for k, n in zip(SET_NAMES, args.prompts) if k in sets}, eval_steps=30,
                sample_steps=30, sample_repeats=3, **extra)


def train_variant(name: str, s: dict, text: str, workdir: Path) -> dict:
    """Probe the variant's speed, then train it for s['minutes']; returns the run's facts and pipeline folder."""
    from diffxattn.config import load_config
    from diffxattn.train import train

    base = [f"text.pretrained={text}", "text.train=false", f"train.batch_size={s['batch']}",
            "logging.validate_every=1000000", "train.checkpoint_every=1000000", "logging.log_every=1",
            "logging.tensorboard=false", f"train.cpu_threads={torch.get_num_threads()}",  # the bench's --threads
            *s["overrides"], *VARIANTS[name][1]]
    probe = workdir / f"{name}-probe"
    train(load_config(common.CONFIG, [*base, f"train.max_steps={s['probe_steps']}", f"train.output_dir={probe}"]))
    logged = _logged(probe)
    rate = common.median([r["images_per_s"] for r in logged[1:] or logged])  # the first step warms up
    # min_steps: a floor, so a very slow variant still gets a schedule; it then trains longer than the rest
    # (its train_s shows it), which favours it, not ours
    steps = max(s["min_steps"], int(s["minutes"] * 60 * rate / s["batch"]))
    out = workdir / name
    start = time.perf_counter()
    # the config's 200 warm-up steps are sized for its 6,000-step run: scale them to this run's length
    warmup = f"optim.warmup_steps={max(1, steps // 10)}"
    train(load_config(common.CONFIG, [*base, warmup, f"train.max_steps={steps}", f"train.output_dir={out}"]))
    train_s = time.perf_counter() - start
    losses = [r["loss"] for r in _logged(out) if "loss" in r]
    return {"images_per_s": rate, "steps": steps, "train_s": train_s,
            "final_loss": common.median(losses[-max(1, len(losses) // 10):]), "pipeline": out / "pipeline"}


def _logged(run_dir: Path) -> list[dict]:
    """The rows of a training run's metrics.jsonl."""
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def score(folder: Path, s: dict) -> dict:
    from diffxattn.cli import load_pipeline
    from diffxattn.eval.run import evaluate

    pipe = load_pipeline(str(folder))  # fp32 on a CPU, on the GPU when there is one
    report = evaluate(pipe, seeds=1, guidance_scales=(1.0,), guidance_scale=1.0, steps=s["eval_steps"],
                      sets=tuple(s["sizes"]), sizes=s["sizes"], edits=False)
    times = [common.timed(lambda: common.sample(pipe, s["sample_steps"])) for _ in range(s["sample_repeats"] + 1)]
    attributes = [a for v in report["sets"].values() for a in v["accuracy"].values() if a is not None]
    return {"all": {k: v["all"] for k, v in report["sets"].items()},
            "attributes": {k: v["accuracy"] for k, v in report["sets"].items()},
            "mean_attribute": sum(attributes) / len(attributes),
            **{f"{kind}_iou_best": report["heatmap_iou"][kind]["iou@best"] for kind in ("shape", "color")},
            "iou_by_resolution": {res: {kind: h[kind]["iou@best"] for kind in ("shape", "color")}
                                  for res, h in report["heatmap_iou"]["by_resolution"].items()},
            "params": common.num_params(pipe.unet), "sample_s_per_image": common.median(times[1:])}


def run(args) -> dict:
    common.setup(args.threads)
    s = settings(args)
    names = args.variants or list(VARIANTS)
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; choose from {list(VARIANTS)}")
    results = {}
    with tempfile.TemporaryDirectory(prefix="diffxattn-quality-") as tmp:
        workdir = Path(args.keep or tmp)
        for name in names:
            trained = train_variant(name, s, args.text, workdir)
            results[name] = {"description": VARIANTS[name][0], "overrides": VARIANTS[name][1],
                             **{k: v for k, v in trained.items() if k != "pipeline"},
                             **score(trained["pipeline"], s)}
            print(name, json.dumps(results[name]), flush=True)
    return {"benchmark": NAME, "quick": args.quick, "machine": common.machine(), "settings": s,
            "text_encoder": args.text, "variants": results, "checks": checks(results)}


def checks(results: dict) -> dict[str, bool]:
    """The equal-time target, ours >= each diffusers UNet, on mean all-correct and mean attribute accuracy."""
    out = {}
    for other in ("diffusers-all", "diffusers-low"):
        if "ours" in results and other in results:
            mean = {n: sum(results[n]["all"].values()) / len(results[n]["all"]) for n in ("ours", other)}
            out[f"ours >= {other}, mean all-correct accuracy"] = mean["ours"] >= mean[other]
            out[f"ours >= {other}, mean attribute accuracy"] = (
                results["ours"]["mean_attribute"] >= results[other]["mean_attribute"])
    return out


def markdown(data: dict) -> str:
    s, v = data["settings"], data["variants"]
    lines = [f"# Equal-time quality and where attention lives{' (quick mode)' if data['quick'] else ''}", "",
             common.machine_line(data["machine"], "the variants ran one after another"), "",
             f"Each variant: {s['minutes']:g} min of training (steps = minutes x its probed images/s / batch "
             f"{s['batch']}, at least {s['min_steps']}; train min: the wall time it took), text encoder "
             f"`{data['text_encoder']}` frozen; then all-correct accuracy on "
             f"{'/'.join(str(s['sizes'].get(k, 0)) for k in SET_NAMES)} prompts (single/two/held-out; 0: set "
             f"not scored), 1 seed, guidance 1, "
             f"{s['eval_steps']} DDIM steps; shape- and color-word heatmap IoU at the best threshold, of the maps "
             f"averaged over every cross-attention resolution and (32/16/8) of each resolution's maps alone "
             f"(-: no cross-attention there, or no object detected); sampling s/image at "
             f"{s['sample_steps']} steps. single/two/held-out: all-correct accuracy; attributes: the mean of the "
             f"per-attribute accuracies (count, color, shape, position or relation, size) over the scored sets; "
             f"final loss: median training loss over the last tenth of the logged steps."
             + (f" Trainer overrides for every variant: `{' '.join(s['overrides'])}`." if s.get("overrides") else ""),
             ""]
    header = ["variant", "parameters", "train img/s", "steps", "train min", "final loss", "single", "two",
              "held-out", "attributes", "shape IoU", "shape IoU 32/16/8", "color IoU", "color IoU 32/16/8",
              "s/image"]

    def iou(x):
        return "-" if x is None else f"{x:.2f}"

    def by_res(variant, kind):
        res = variant["iou_by_resolution"]
        return "/".join(iou(res[r][kind]) if r in res else "-" for r in ("32", "16", "8"))

    def rows(names):
        return [[n, f"{v[n]['params']:,}", f"{v[n]['images_per_s']:.1f}", str(v[n]["steps"]),
                 f"{v[n]['train_s'] / 60:.1f}", f"{v[n]['final_loss']:.4f}",
                 *(f"{v[n]['all'][k]:.2f}" if k in v[n]["all"] else "-" for k in SET_NAMES),
                 f"{v[n]['mean_attribute']:.2f}",
                 iou(v[n]["shape_iou_best"]), by_res(v[n], "shape"), iou(v[n]["color_iou_best"]),
                 by_res(v[n], "color"),
                 f"{v[n]['sample_s_per_image']:.2f}"] for n in names if n in v]

    for title, names in (("Equal training time: ours vs diffusers", EQUAL_TIME),
                         ("Where cross- and self-attention live (XAttnUNet)", ABLATION)):
        if any(n in v for n in names):
            lines += [f"## {title}", "", common.markdown_table(header, rows(names)), ""]
    for check, ok in data["checks"].items():
        lines.append(f"- {check}: {'met' if ok else 'missed'}")
    lines += ["", "| variant | what |", "|---|---|", *(f"| {n} | {v[n]['description']} |" for n in v)]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = common.argument_parser(__doc__.splitlines()[0])
    p.add_argument("--minutes", type=float, default=10.0, help="training wall time per variant")
    p.add_argument("--variants", nargs="+", help=f"some of {list(VARIANTS)} (default: all)")
    p.add_argument("--text", default=str(common.ROOT / "pipelines" / "shapes-32"),
                   help="frozen text encoder: a CLIP or pipeline folder")
    p.add_argument("--batch", type=int, default=64, help="training batch size")
    p.add_argument("--set", nargs="+", metavar="KEY=VALUE", help="trainer config overrides for every variant")
    p.add_argument("--prompts", type=int, nargs=3, default=(32, 32, 16), metavar=("SINGLE", "TWO", "HELDOUT"),
                   help="prompts per set in the evaluation")
    p.add_argument("--sets", nargs="+", choices=SET_NAMES,
                   help="prompt sets to score (default: all; e.g. `single heldout` for data.max_objects=1)")
    p.add_argument("--keep", help="folder for the runs (each variant's pipeline stays in KEEP/NAME/pipeline)")
    args = p.parse_args(argv)
    data = run(args)
    common.write_results(args.out, NAME, data, markdown(data))


if __name__ == "__main__":
    main()
