"""`diffxattn serve` from the outside: start-up, image latency, memory over many runs.

Starts `python -m diffxattn.cli serve` as a subprocess (the shipped pipeline unless --pipeline) and drives its
HTTP API as the page does (POST a run, read its Server-Sent Events to the end):

* start-up: seconds from the process start to the printed URL, to the page answering, to the model ready, and
  to the first image (a run at the pipeline's default settings, submitted as soon as the model is ready);
* image latency at the default settings (steps, guidance, sampler of the pipeline), median over --repeats runs;
* memory: the server's RSS after 10 runs and after --runs runs (default 200) of mixed requests (generate, weight
  slider, edit with local blend), each with a new seed; these use --memory-steps steps (default 5) to keep the
  benchmark short: what is measured is whether memory grows with the number of runs.

    python bench/bench_serve.py              # ~3 minutes on 2 cores
    python bench/bench_serve.py --quick      # a tiny pipeline it builds, few runs: the plumbing only
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from common import ROOT, argument_parser, machine, setup, write_results


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return round(int(line.split()[1]) / 1024, 1)
    return float("nan")


def post(url: str, body: dict) -> dict:
    request = urllib.request.Request(url + "api/runs", data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as r:
        return json.load(r)


def run(url: str, body: dict) -> float:
    """Submit a run and read its events to the end; seconds from the POST to the 'done' event."""
    start = time.perf_counter()
    answer = post(url, body)
    with urllib.request.urlopen(f"{url}api/runs/{answer['run']}/events", timeout=300) as stream:
        kind = None
        for line in stream:
            line = line.decode().strip()
            if line.startswith("event: "):
                kind = line[7:]
                if kind in ("failed", "cancelled"):
                    raise RuntimeError(f"run {answer['run']} {kind}: {stream.readline().decode()}")
                if kind == "done":
                    return time.perf_counter() - start
    raise RuntimeError("the event stream ended without 'done'")


def mixed(k: int) -> dict:
    """The k-th request of the memory test: plain, weighted (a slider), edit with local blend, in turn."""
    seed = 1000 + k
    if k % 3 == 0:
        return {"prompt": "a red circle at the left", "seed": seed}
    if k % 3 == 1:
        return {"prompt": "a red circle at the left", "seed": seed, "weights": {"1": 0.5 + (k % 7) / 4},
                "weight_mode": "embedding"}
    return {"kind": "edit", "prompt": "a red circle at the left", "to": "a blue circle at the left", "seed": seed,
            "local_blend": "red blue"}


def main() -> None:
    p = argument_parser(__doc__.split("\n")[0])
    p.add_argument("--pipeline", help="pipeline folder (default: the shipped one)")
    p.add_argument("--repeats", type=int, default=10, help="runs timed at the default settings")
    p.add_argument("--runs", type=int, default=200, help="runs before the second RSS reading")
    p.add_argument("--memory-steps", type=int, default=5, help="denoising steps of the memory runs")
    args = p.parse_args()
    setup(args.threads)
    pipeline = args.pipeline
    if args.quick:
        args.repeats, args.runs, args.memory_steps = 2, 12, 2
        pipeline = pipeline or build_tiny(Path(tempfile.mkdtemp(prefix="bench-serve-")))
    command = [sys.executable, "-m", "diffxattn.cli", "serve", "--port", "0"] + (["--pipeline", pipeline] if pipeline else [])
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    start = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    try:
        line = proc.stdout.readline()
        t_url = time.perf_counter() - start
        url = line.split()[2]
        with urllib.request.urlopen(url, timeout=30) as r:
            assert b"loading model" in r.read()
        t_page = time.perf_counter() - start
        with urllib.request.urlopen(url + "api/status?wait=30", timeout=60) as r:
            status = json.load(r)
        while not status["ready"]:
            with urllib.request.urlopen(url + "api/status?wait=30", timeout=60) as r:
                status = json.load(r)
        t_ready = time.perf_counter() - start
        run(url, {"prompt": "a red circle at the left", "seed": 0})
        t_first = time.perf_counter() - start
        latencies = [run(url, {"prompt": "a red circle left of a blue square", "seed": k}) for k in range(args.repeats)]
        steps = {"steps": args.memory_steps}
        for k in range(10):
            run(url, {**mixed(k), **steps})
        rss_10 = rss_mb(proc.pid)
        for k in range(10, args.runs):
            run(url, {**mixed(k), **steps})
        rss_n = rss_mb(proc.pid)
        proc.send_signal(2)  # Ctrl-C
        stopped = time.perf_counter()
        proc.communicate(timeout=30)
        t_stop = time.perf_counter() - stopped
    finally:
        if proc.poll() is None:
            proc.kill()
    data = {
        "pipeline": pipeline or "pipelines/shapes-32", "defaults": status["defaults"],
        "startup_s": {"url_printed": round(t_url, 2), "page_answers": round(t_page, 2), "model_ready": round(t_ready, 2),
                      "first_image": round(t_first, 2)},
        "image_latency_s": {"median": round(statistics.median(latencies), 3), "min": round(min(latencies), 3),
                            "max": round(max(latencies), 3), "repeats": args.repeats,
                            "request": "POST /api/runs to the 'done' event (image, maps, downloads ready)"},
        "memory": {"rss_mb_after_10_runs": rss_10, f"rss_mb_after_{args.runs}_runs": rss_n,
                   "growth_mb": round(rss_n - rss_10, 1), "runs": args.runs, "steps_per_run": args.memory_steps,
                   "mix": "generate / weight slider (embedding mode) / edit with local blend, a new seed each"},
        "ctrl_c_exit_code": proc.returncode, "ctrl_c_stop_s": round(t_stop, 2),
        "machine": machine(),
    }
    s, lat = data["startup_s"], data["image_latency_s"]
    markdown = "\n".join([
        "# diffxattn serve", "",
        f"Pipeline `{data['pipeline']}`, defaults {status['defaults']}.", "",
        "| measure | value |", "|---|---|",
        f"| start -> URL printed | {s['url_printed']} s |", f"| start -> page answers | {s['page_answers']} s |",
        f"| start -> model ready | {s['model_ready']} s |", f"| start -> first image | {s['first_image']} s |",
        f"| image latency at default settings (median of {args.repeats}) | {lat['median']} s |",
        f"| RSS after 10 runs | {rss_10} MB |", f"| RSS after {args.runs} runs | {rss_n} MB |",
        f"| Ctrl-C: exit code, seconds to stop | {proc.returncode}, {t_stop:.2f} s |", "",
        f"load average 1 min: {data['machine'].get('loadavg_1m_at_start')} at start, "
        f"{data['machine'].get('loadavg_1m_at_end')} at end",
    ])
    write_results(args.out, "serve", data, markdown)


def build_tiny(folder: Path) -> str:
    """--quick: a tiny untrained pipeline (configs/tiny.yaml)."""
    out = folder / "pipe"
    subprocess.run([sys.executable, "-m", "diffxattn.cli", "build", "configs/tiny.yaml", "-o", str(out),
                    "text.vocab_captions=200"], check=True, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                   capture_output=True)
    return str(out)


if __name__ == "__main__":
    main()
