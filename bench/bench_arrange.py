"""Research bench: pick the starting noise by the layout the cross-attention maps show early in sampling.

    python bench/bench_arrange.py                # shipped pipeline, 64 two-object prompts x 2 seeds; ~8 min
    python bench/bench_arrange.py --prompts 32   # the first 32 (the half the settings were tuned on)
    python bench/bench_arrange.py --quick        # a tiny pipeline it builds, 2 prompts: the plumbing only

Not a sampling option yet: a measurement of whether the maps can tell, a few steps in, which of several starting
noises will give a right two-object image. For each prompt and seed s, `--candidates` noises are drawn (the first
is seed s's own, the one plain sampling uses; the others seeds s + 1000 k) and sampled together up to step
`--at` (a fraction of the steps), where one UNet call gives the nouns' maps. Each candidate is scored by the
layout they show: the relation word obeyed by the nouns' map centers (`control.guided.object_center`; the signed
offset along the relation's axis) plus half the distance between the centers up to 0.3 (two places, not one). The
best candidate is then sampled in full, as plain sampling would, and scored by the eval's detector and scorer. The
plain row samples seed s itself. Time: the two rows' wall clock for the same images.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import argument_parser, machine, machine_line, markdown_table, setup, write_results  # noqa: E402

NAME = "arrange"
AXIS = {"left of": (0, 1), "right of": (0, -1), "above": (1, 1), "below": (1, -1)}  # (x or y, sign of obj2 - obj1)


class _Stop(Exception):
    pass


def layout_score(centers, relation: str | None) -> float:
    """The candidate's score from its two nouns' map centers [(x, y), (x, y)]: the relation's signed offset plus
    half the centers' distance, capped at 0.3."""
    (x1, y1), (x2, y2) = centers
    score = 0.0
    if relation:
        axis, sign = AXIS[relation]
        score += sign * ((x2 - x1) if axis == 0 else (y2 - y1))
    return score + 0.5 * min(0.3, ((x2 - x1) ** 2 + (y2 - y1) ** 2) ** 0.5)


def early_maps(pipe, prompt: str, noises, at: float):
    """(N, S, h, w): the conditional prompt's maps of one UNet call at step round(at * steps) of sampling from each
    of `noises` (N, C, H, W), stopping there."""
    import torch

    from diffxattn.control.guided import AttentionGuide, Guide

    class Probe(AttentionGuide):
        def callback(self, pipe, i, timestep, tensors):
            n = len(pipe.scheduler.timesteps)
            if i + 1 != max(1, round(at * n)):
                return {}
            x = tensors["latents"]
            embeds, mask = self._text(tensors, x.shape[0])
            with torch.no_grad():
                self.found = self._probe(pipe, x, pipe.scheduler.timesteps[i + 1], embeds, mask)
            raise _Stop

    probe = Probe(pipe, Guide())
    with probe:
        try:
            pipe([prompt] * len(noises), latents=noises.clone(), **probe.kwargs())
        except _Stop:
            pass
    return probe.found


def noise(pipe, seed: int):
    """(1, C, H, W): the starting noise seed `seed` gives (as the pipeline draws it from a seeded generator)."""
    import torch

    c, size = pipe.unet.config.in_channels, pipe.unet.config.sample_size
    return torch.randn((1, c, size, size), generator=torch.Generator().manual_seed(seed))


def pick(pipe, prompt: str, seed: int, candidates: int, at: float):
    """(the chosen starting noise, its index among the candidates)."""
    import torch

    from diffxattn.control.guided import Guide, object_center, plan, text_maps
    from diffxattn.data.captions import parse_caption

    noises = torch.cat([noise(pipe, seed + 1000 * k) for k in range(candidates)])
    nouns = plan(pipe.tokenizer, prompt, Guide(excite="auto"))  # each object's shape word, in the prompt's order
    maps = early_maps(pipe, prompt, noises, at)
    scores = []
    for m in maps:
        text = text_maps(m, nouns.eos)
        centers = [object_center(text[p].mean(0)) or (0.5, 0.5) for p in nouns.excite]
        scores.append(layout_score(centers, parse_caption(prompt)["relation"]))
    best = max(range(candidates), key=lambda k: (scores[k], -k))
    return noises[best:best + 1], best


def run(args) -> dict:
    import numpy as np

    from diffxattn.cli import load_pipeline
    from diffxattn.eval import metrics
    from diffxattn.eval.detector import detect, failure_of
    from diffxattn.eval.prompts import prompt_set

    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    steps = {"num_inference_steps": 4} if args.quick else {}
    prompts = prompt_set("two", args.prompts)
    rows = {}
    for name in ("plain", "picked"):
        right, failures, chosen = [], {}, []
        t0 = time.perf_counter()
        for prompt in prompts:
            for seed in range(args.seeds):
                if name == "plain":
                    start = noise(pipe, seed)
                else:
                    start, k = pick(pipe, prompt, seed, args.candidates, args.at)
                    chosen.append(k)
                image = metrics.to_uint8(pipe(prompt, latents=start, output_type="np", **steps).images)[0]
                detections = detect(image)
                right.append(metrics.score_prompt(prompt, detections, image.shape[0])["all"])
                failure = failure_of(prompt, detections, image.shape[0])
                if failure:
                    failures[failure] = failures.get(failure, 0) + 1
        rows[name] = {"all": float(np.mean(right)), "n": len(right), "failures": failures,
                      "seconds": round(time.perf_counter() - t0, 1),
                      **({"chosen": [chosen.count(k) for k in range(args.candidates)]} if chosen else {})}
    return {"benchmark": NAME, "quick": args.quick, "machine": machine(), "pipeline": args.pipeline,
            "settings": {"prompts": len(prompts), "seeds": args.seeds, "candidates": args.candidates, "at": args.at},
            "rows": rows}


def markdown(data: dict) -> str:
    s, rows = data["settings"], data["rows"]
    table = [[name, f"{r['all']:.3f}", r["n"], ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items())),
              f"{r['seconds']:.0f} s", f"{r['seconds'] / rows['plain']['seconds']:.2f}x"] for name, r in rows.items()]
    return "\n".join([
        f"# Starting noise picked by the early maps' layout{' (quick mode)' if data['quick'] else ''}", "",
        machine_line(data["machine"], "the two rows run one after the other"), "",
        f"`{data['pipeline']}` at its defaults, the eval's first {s['prompts']} two-object prompts x {s['seeds']} "
        f"seeds; {s['candidates']} candidate noises, maps read at {s['at']:g} of the steps "
        f"(`python bench/bench_arrange.py`, see its docstring).", "",
        markdown_table(["sampling", "all-correct", "images", "failures (first failed clause)", "time", "ratio"],
                       table), "",
        f"Candidates chosen (index 0: the plain seed's own noise): {rows['picked']['chosen']}."])


def main(argv=None) -> dict:
    p = argument_parser(__doc__.split("\n")[0])
    p.add_argument("--pipeline", help="pipeline folder (default: the shipped one; --quick: a tiny one it builds)")
    p.add_argument("--prompts", type=int, help="two-object prompts (default 64; quick 2)")
    p.add_argument("--seeds", type=int, help="seeds per prompt (default 2; quick 1)")
    p.add_argument("--candidates", type=int, default=4, help="starting noises per image (default 4)")
    p.add_argument("--at", type=float, default=0.25, help="fraction of the steps where the maps are read")
    args = p.parse_args(argv)
    setup(args.threads)
    import tempfile

    from diffxattn.cli import default_pipeline

    args.prompts = args.prompts or (2 if args.quick else 64)
    args.seeds = args.seeds or (1 if args.quick else 2)
    with tempfile.TemporaryDirectory() as tmp:
        if args.quick and not args.pipeline:
            from bench_inversion import quick_pipeline

            args.pipeline = quick_pipeline(Path(tmp) / "tiny")
        args.pipeline = args.pipeline or default_pipeline()
        data = run(args)
    write_results(args.out, NAME, data, markdown(data))
    return data


if __name__ == "__main__":
    main()
