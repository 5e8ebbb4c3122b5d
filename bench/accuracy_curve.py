"""All-correct accuracy of a run's checkpoints against training time (the data behind samples/accuracy.png).

    python bench/accuracy_curve.py --metrics RUN/metrics.jsonl --batch 512 \
        STEP:PIPELINE_DIR [STEP:PIPELINE_DIR ...] -o pipelines/shapes-32/curve.json

Each checkpoint (exported as a pipeline with `python -m diffxattn.train export`) is scored with `evaluate`
on 16 prompts per set, one seed, at the pipeline's default sampler and guidance (or `--guidance`); with
`--arrange` the starting noise is picked by the objects' layout (`Guide(arrange="auto")`, as `diffxattn eval
--guided arrange`). Training time at a step is the run's logged wall clock (`wall_s`), or for older runs the
sum of its steps' time from the logged images/s.
"""

import argparse
import json
from pathlib import Path

import torch

from diffxattn import DiffXAttnPipeline
from diffxattn.control.guided import Guide
from diffxattn.eval.run import evaluate


def seconds_at(metrics: Path, batch: int) -> dict[int, float]:
    """Training seconds at each logged step: the logged wall clock, else images between logs / logged images/s."""
    out, total, last = {0: 0.0}, 0.0, 0
    for line in metrics.read_text().splitlines():
        rec = json.loads(line)
        if "wall_s" in rec:
            out[rec["step"]] = rec["wall_s"]
        elif "images_per_s" in rec:
            total += (rec["step"] - last) * batch / rec["images_per_s"]
            last = rec["step"]
            out[last] = total
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("checkpoints", nargs="+", help="STEP:PIPELINE_DIR")
    p.add_argument("--metrics", type=Path, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--prompts", type=int, default=16)
    p.add_argument("--seeds", type=int, default=1)
    p.add_argument("--guidance", type=float, help="guidance scale (default: each pipeline's)")
    p.add_argument("--arrange", action="store_true", help="pick the starting noise by the objects' layout")
    p.add_argument("-o", "--out", type=Path, required=True)
    args = p.parse_args()
    times = seconds_at(args.metrics, args.batch)
    points = []
    for item in args.checkpoints:
        step, folder = item.split(":", 1)
        step = int(step)
        pipe = DiffXAttnPipeline.from_pretrained(folder, dtype=torch.float32)
        pipe.set_progress_bar_config(disable=True)
        guidance = pipe.config.default_guidance_scale if args.guidance is None else args.guidance
        report = evaluate(pipe, seeds=args.seeds, guidance_scales=(guidance,), guidance_scale=guidance, heatmaps=False,
                          edits=False, sizes={"single": args.prompts, "two": args.prompts, "heldout": args.prompts},
                          guide=Guide(arrange="auto") if args.arrange else None)
        near = min(times, key=lambda s: abs(s - step))
        point = {"step": step, "minutes": times[near] / 60, "guidance": guidance, "arrange": args.arrange,
                 **{k: v["all"] for k, v in report["sets"].items()}}
        print(point, flush=True)
        points.append(point)
    args.out.write_text(json.dumps(points, indent=1))


if __name__ == "__main__":
    main()
