"""Research bench for `--arrange`: every candidate noise sampled in full, and the ways to pick one compared.

    python bench/bench_arrange.py          # shipped pipeline, 64 two-object prompts x 2 seeds, 8 candidates; ~13 min
    python bench/bench_arrange.py --quick  # a tiny pipeline it builds, 2 prompts: the plumbing only

For each prompt and seed, `AttentionGuide.arrange` (guidance scale 4, the eval's) reads the objects' maps of
`--candidates` starting noises at 25% of the steps; then each candidate is sampled in full and scored by the
eval's detector and scorer. With the outcome of every candidate known, any rule for picking one can be scored
without sampling again: the rows are the seed's own noise (plain sampling), the best candidate by the layout
without and with the spread term at several weights (`layout_score(..., spread_weight)`), for the first 4 and all
candidates, and the oracle (a right image among the candidates). The shipped rule is `spread_weight=4`, 4
candidates; this bench chose it (`--arrange` is measured as a product option by `diffxattn eval --guided arrange`).
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import argument_parser, machine, machine_line, markdown_table, setup, write_results  # noqa: E402

NAME = "arrange"
WEIGHTS = (0.0, 1.0, 2.0, 4.0, 8.0)  # spread weights compared


def candidates(pipe, prompt: str, seed: int, k: int, steps: dict):
    """(the candidates' noises (k, C, h, w), the objects' word maps of each at the read step, the plan's relations)."""
    import torch

    from diffxattn.control.guided import AttentionGuide, Guide, text_maps

    class Recorder(AttentionGuide):
        def _layout(self, maps, p):
            text = text_maps(maps, p.eos, self.guide.temperature)
            recorded.append([text[w].mean(0) for w in p.arrange])
            return super()._layout(maps, p)

    recorded = []
    with Recorder(pipe, Guide(arrange="auto", candidates=k)) as g:
        g.arrange({"prompt": prompt, "generator": [torch.Generator().manual_seed(seed)], "guidance_scale": 4.0,
                   **steps, **g.kwargs()})
    return g.noises[0], recorded, g.plans[0].relations


def run(args) -> dict:
    import numpy as np

    from diffxattn.cli import load_pipeline
    from diffxattn.control.guided import layout_score
    from diffxattn.eval import metrics
    from diffxattn.eval.detector import detect, failure_of
    from diffxattn.eval.prompts import prompt_set

    pipe = load_pipeline(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    steps = {"num_inference_steps": 4} if args.quick else {}
    records = []
    for prompt in prompt_set("two", args.prompts):
        for seed in range(args.seeds):
            noises, maps, relations = candidates(pipe, prompt, seed, args.candidates, steps)
            images = metrics.to_uint8(pipe([prompt] * len(noises), latents=noises, guidance_scale=4.0,
                                           output_type="np", **steps).images)
            outcomes = []
            for image in images:
                detections = detect(image)
                score = metrics.score_prompt(prompt, detections, image.shape[0])
                outcomes.append({"all": bool(score["all"]), "count": bool(score["count"]),
                                 "failure": failure_of(prompt, detections, image.shape[0])})
            records.append({"prompt": prompt, "seed": seed, "outcomes": outcomes,
                            "scores": {str(w): [layout_score(m, relations, w) for m in maps] for w in WEIGHTS}})

    def row(name: str, picks: list[int]) -> dict:
        chosen = [r["outcomes"][k] for r, k in zip(records, picks)]
        failures = {}
        for c in chosen:
            if c["failure"]:
                failures[c["failure"]] = failures.get(c["failure"], 0) + 1
        return {"rule": name, "all": float(np.mean([c["all"] for c in chosen])),
                "count": float(np.mean([c["count"] for c in chosen])), "failures": failures}

    rows = [row("plain (the seed's own noise)", [0] * len(records))]
    for k in sorted({min(4, args.candidates), args.candidates}):
        for w in WEIGHTS:
            rows.append(row(f"{k} candidates, spread weight {w:g}",
                            [int(np.argmax(r["scores"][str(w)][:k])) for r in records]))
        oracle = [next((j for j, o in enumerate(r["outcomes"][:k]) if o["all"]), 0) for r in records]
        rows.append(row(f"{k} candidates, oracle (a right one if any)", oracle))
    return {"benchmark": NAME, "quick": args.quick, "machine": machine(), "pipeline": args.pipeline,
            "settings": {"prompts": args.prompts, "seeds": args.seeds, "candidates": args.candidates},
            "rows": rows, "records": records}


def markdown(data: dict) -> str:
    s = data["settings"]
    table = [[r["rule"], f"{r['all']:.3f}", f"{r['count']:.3f}",
              ", ".join(f"{k} {v}" for k, v in sorted(r["failures"].items()))] for r in data["rows"]]
    return "\n".join([
        f"# Picking the starting noise by the early maps{' (quick mode)' if data['quick'] else ''}", "",
        machine_line(data["machine"], "no timing here"), "",
        f"`{data['pipeline']}`, guidance 4, the eval's first {s['prompts']} two-object prompts x {s['seeds']} seeds; "
        f"every one of {s['candidates']} candidate noises sampled in full and scored "
        "(`python bench/bench_arrange.py`, see its docstring).", "",
        markdown_table(["picked by", "two-object all-correct", "count right", "failures (first failed clause)"],
                       table)])


def main(argv=None) -> dict:
    p = argument_parser(__doc__.split("\n")[0])
    p.add_argument("--pipeline", help="pipeline folder (default: the shipped one; --quick: a tiny one it builds)")
    p.add_argument("--prompts", type=int, help="two-object prompts (default 64; quick 2)")
    p.add_argument("--seeds", type=int, help="seeds per prompt (default 2; quick 1)")
    p.add_argument("--candidates", type=int, help="starting noises per image (default 8; quick 2)")
    args = p.parse_args(argv)
    setup(args.threads)
    import tempfile

    from diffxattn.cli import default_pipeline

    args.prompts = args.prompts or (2 if args.quick else 64)
    args.seeds = args.seeds or (1 if args.quick else 2)
    args.candidates = args.candidates or (2 if args.quick else 8)
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
