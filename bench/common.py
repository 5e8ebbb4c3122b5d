"""Shared pieces of the benchmarks: the compared models, interleaved timing, peak RSS, profiles, result files.

Every ratio in bench/ is measured side by side in one process: warm-up each side, then repeat
(ours, other, ours, other, ... with the order rotated each round) and report medians, so load from
other processes on the machine hits both sides alike.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import itertools
import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
SHIPPED = ROOT / "configs" / "shapes-32.yaml"  # the shipped model's layout
CONFIG = SHIPPED  # the config whose UNet is 'ours' (`use_config`)
TEXT_LEN, TEXT_DIM = 24, 128  # the shapes-32 text encoder's output: (B, 24, 128)

MODELS = {
    "ours": "XAttnUNet (configs/shapes-32.yaml): cross-attn at 16x16, 8x8; self-attn at 8x8",
    "diffusers-all": "UNet2DConditionModel, CrossAttn blocks at every level (32x32, 16x16, 8x8)",
    "diffusers-low": "UNet2DConditionModel, CrossAttn blocks only at 16x16 and 8x8 (our resolutions)",
}


def use_config(path) -> None:
    """Compare the UNet of another experiment config (default: the shipped layout, configs/shapes-32.yaml)."""
    from diffxattn.config import load_config

    global CONFIG
    CONFIG = Path(path).resolve()
    cfg = load_config(CONFIG).model
    stem = f"{cfg.patch_size}x{cfg.patch_size} patch stem; " if cfg.patch_size > 1 else ""
    where = lambda rs: ", ".join(f"{r}x{r}" for r in rs)  # noqa: E731
    MODELS["ours"] = (f"XAttnUNet ({config_name()}): {stem}cross-attn at "
                      f"{where(cfg.cross_attention_resolutions)}; self-attn at {where(cfg.self_attention_resolutions)}")


def config_name(path: Path | None = None) -> str:
    """A config (default: CONFIG) as the results show it: relative to the repository when it is in it."""
    path = path or CONFIG
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


# -- command line and machine --
def parse_args(description: str, argv=None) -> argparse.Namespace:
    return argument_parser(description).parse_args(argv)


def argument_parser(description: str) -> argparse.ArgumentParser:
    """--quick, --out and --threads, shared by every benchmark script."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--quick", action="store_true", help="tiny sizes and repeats (for the tests), same code")
    p.add_argument(
        "--out", default=str(ROOT / "bench" / "results"), help="folder for <name>.json and <name>.md"
    )
    p.add_argument("--threads", type=int, default=2, help="torch.set_num_threads")
    return p


_STARTED: dict = {}  # set by setup(): wall clock, process CPU time and load average when the benchmark began


def setup(threads: int) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    _STARTED.update(wall=time.perf_counter(), cpu=time.process_time(), load=_load())


def _load() -> float:
    return round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else 0.0


def machine() -> dict:
    """The machine, and how busy it was: load average at setup() and now, and the CPU seconds this process
    got per wall second since setup() (close to `threads` on an idle machine; much lower = shared)."""
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    import diffusers

    out = {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "threads": torch.get_num_threads(),
        "python": platform.python_version(),
        "loadavg_1m_at_start": _STARTED.get("load", _load()),
        "loadavg_1m_at_end": _load(),
    }
    if torch.cuda.is_available():
        out["gpu"] = torch.cuda.get_device_name()
    if _STARTED:
        wall = time.perf_counter() - _STARTED["wall"]
        out.update(
            wall_s=round(wall, 1), cpu_per_wall=round((time.process_time() - _STARTED["cpu"]) / wall, 2)
        )
    return out


# -- the compared models --
def model_config(name: str):
    """ModelConfig of one compared model: 'ours', 'diffusers-all' or 'diffusers-low'."""
    from diffxattn.config import load_config

    cfg = load_config(CONFIG).model
    if name == "ours":
        return cfg
    return _diffusers_config(cfg, name, diffusers_layers_per_block())


def _diffusers_config(cfg, name: str, layers: tuple[int, ...]):
    levels = None if name == "diffusers-all" else tuple(range(1, len(cfg.block_out_channels)))
    return dataclasses.replace(cfg, kind="diffusers", layers_per_block=layers, diffusers_attention_levels=levels)


@functools.lru_cache(maxsize=None)
def _matched_layers(config: Path) -> tuple[int, ...]:
    from diffxattn.build import build_unet
    from diffxattn.config import load_config

    cfg = load_config(config).model
    ours = num_params(build_unet(cfg, TEXT_DIM))
    own = cfg.layers_per_block if isinstance(cfg.layers_per_block, (list, tuple)) else \
        [cfg.layers_per_block] * len(cfg.block_out_channels)
    candidates = sorted(itertools.product((1, 2, 3), repeat=len(own)),
                        key=lambda c: sum(abs(a - b) for a, b in zip(c, own)))
    for layers in candidates:
        counts = [num_params(build_unet(_diffusers_config(cfg, n, layers), TEXT_DIM))
                  for n in ("diffusers-all", "diffusers-low")]
        if all(abs(n / ours - 1) <= 0.10 for n in counts):
            return layers
    raise AssertionError(f"no diffusers layers per block of 1-3 lands within +-10% of {config}'s {ours:,} parameters")


def diffusers_layers_per_block() -> tuple[int, ...]:
    """Layers per block of the diffusers UNets compared with CONFIG's: our channels, and the layers per block
    closest to ours (fewest layers added or removed) that land within +-10% of our parameter count in both
    variants. For the shipped layout (2 everywhere) that is (2, 2, 1): 1 everywhere is -12%, 2 everywhere +30%."""
    return _matched_layers(CONFIG)


def build_model(name: str) -> torch.nn.Module:
    from diffxattn.build import build_unet

    torch.manual_seed(0)
    return build_unet(model_config(name), TEXT_DIM)


def num_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def check_param_match(counts: dict[str, int], tolerance: float = 0.10) -> None:
    for name, n in counts.items():
        rel = n / counts["ours"] - 1
        if abs(rel) > tolerance:
            raise AssertionError(
                f"{name} has {n} parameters, {rel:+.1%} vs ours ({counts['ours']}); "
                f"the comparison needs +-{tolerance:.0%}"
            )


def text_batch(batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Random text embeddings (B, 24, 128) and a key mask (B, 24) with 10 real tokens (a typical caption)."""
    g = torch.Generator().manual_seed(seed)
    emb = torch.randn(batch, TEXT_LEN, TEXT_DIM, generator=g)
    mask = torch.zeros(batch, TEXT_LEN, dtype=torch.bool)
    mask[:, :10] = True
    return emb, mask


class TrainStep:
    """One forward + backward + AdamW step of a UNet on a fixed random batch (v-prediction-like MSE)."""

    def __init__(self, model: torch.nn.Module, batch: int, size: int = 32, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.model = model.train()
        self.opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        self.x = torch.randn(batch, 3, size, size, generator=g)
        self.target = torch.randn(batch, 3, size, size, generator=g)
        self.t = torch.randint(0, 1000, (batch,), generator=g)
        self.emb, self.mask = text_batch(batch, seed)

    def __call__(self) -> None:
        pred = self.model(
            self.x, self.t, encoder_hidden_states=self.emb, encoder_attention_mask=self.mask
        ).sample
        loss = torch.nn.functional.mse_loss(pred, self.target)
        loss.backward()
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


_TEXT = None


def text_components():
    """(tokenizer, text encoder) of the shapes-32 config, built small from a few hundred captions (cached)."""
    global _TEXT
    if _TEXT is None:
        from diffxattn.build import build_text, learn_tokenizer
        from diffxattn.config import load_config

        cfg = load_config(CONFIG, ["text.vocab_captions=400"])
        _TEXT = build_text(cfg.text, learn_tokenizer(cfg, tempfile.mkdtemp(prefix="diffxattn-bench-tok-")))
    return _TEXT


def build_pipe(unet: torch.nn.Module, steps: int = 30, guidance: float = 3.0):
    """A real DiffXAttnPipeline around `unet` (DDIM, v-prediction) with the shapes-32 tiny text encoder."""
    from diffxattn import DiffXAttnPipeline, make_scheduler

    tokenizer, encoder = text_components()
    pipe = DiffXAttnPipeline(
        unet.eval(),
        encoder.eval(),
        tokenizer,
        make_scheduler("ddim"),
        default_steps=steps,
        default_guidance_scale=guidance,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


PROMPT = "a red circle left of a blue square"


def sample(pipe, steps: int, size: int = 32, prompt: str = PROMPT, seed: int = 0):
    """One size x size image from `pipe`: text encoder, then `steps` UNet calls (batch 2 under guidance)."""
    return pipe(
        prompt,
        num_inference_steps=steps,
        height=size,
        width=size,
        generator=torch.Generator().manual_seed(seed),
        output_type="pt",
    ).images


# -- timing --
def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of fn(); on a GPU, after its queued kernels have finished."""
    start = time.perf_counter()
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def interleaved(
    fns: dict[str, Callable[[], object]],
    *,
    warmup: int,
    repeats: int,
    warm: dict[str, Callable[[], object]] | None = None,
) -> dict[str, list[float]]:
    """Seconds per call of each fn: `warmup` untimed calls each (of `warm[name]` if given, e.g. a shorter
    sampling run), then `repeats` rounds calling every fn once, the order rotated each round so no side
    always runs first (or right after the slow one)."""
    for name in fns:
        for _ in range(warmup):
            (warm or fns)[name]()
    names = list(fns)
    times: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        for n in names[r % len(names) :] + names[: r % len(names)]:
            times[n].append(timed(fns[n]))
    return times


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def comparison(
    metric: str,
    ours: str,
    other: str,
    ours_samples: list[float],
    other_samples: list[float],
    unit: str,
    target: tuple[str, float] | None = None,
    per: float = 1.0,
    **extra,
) -> dict:
    """A result row: medians (divided by `per`, e.g. images per call), ratio = other / ours, target check.

    With samples from `interleaved` (one per side per round), `round_ratios` are other / ours within each
    round: on a shared machine they show whether load changed between rounds (loaded rounds compress
    ratios, since both sides then wait on the scheduler)."""
    ov, tv = median(ours_samples) / per, median(other_samples) / per
    ratio = tv / ov
    if len(ours_samples) == len(other_samples):
        extra["round_ratios"] = [t / o for o, t in zip(ours_samples, other_samples, strict=True)]
    row = {
        "metric": metric,
        "ours": ours,
        "other": other,
        "unit": unit,
        "ours_value": ov,
        "other_value": tv,
        "ratio": ratio,
        "samples": {"ours": ours_samples, "other": other_samples},
        "per": per,
        **extra,
    }
    if target is not None:
        op, value = target
        met = {">=": ratio >= value, "<=": ratio <= value, "==": abs(ratio - value) < 1e-9}[op]
        row.update(target=f"{op} {value:g}", met=bool(met))
    return row


# -- FLOP --
def count_flops(fn: Callable[[], object]) -> int:
    """FLOP of one fn() by torch's FLOP counter (matrix multiplies, convolutions, attention; forward and
    backward; pointwise ops count 0)."""
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def matmul_peak(size: int = 1024, repeats: int = 10) -> float:
    """The machine's fp32 matrix-multiply speed (GFLOP/s) at the current thread count: the best of `repeats`
    size x size products, the yardstick for a model's achieved GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b
    best = min(timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


# -- memory --
def rss_mb(field: str = "VmHWM") -> float:
    """This process's resident memory from /proc/self/status: VmHWM = peak so far, VmRSS = now (MiB)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def reset_peak_rss() -> None:
    """Restart this process's VmHWM at its current RSS (Linux >= 4.0; a forked child already starts so)."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
    except OSError:
        pass


# -- profiling --
# op-name fragments -> the kind of work, for the "where does the time go" line under a profile
OP_KINDS = {
    "convolution": ("conv",),
    "attention": ("scaled_dot_product", "softmax", "bmm", "baddbmm"),
    "linear": ("addmm", "aten::mm", "linear"),
    "normalization": ("norm",),
    "optimizer": ("Optimizer", "sqrt", "lerp", "addcdiv", "addcmul"),
}


def op_kind(name: str) -> str:
    for kind, fragments in OP_KINDS.items():
        if any(f in name for f in fragments):
            return kind
    return "other"


def profile_table(
    fn: Callable[[], object], iters: int = 2, top: int = 10
) -> tuple[str, list[dict], dict[str, float]]:
    """Top ops by self CPU time over `iters` calls of fn (after one unprofiled call):
    (markdown table, rows, share of self CPU time per kind of op over all ops)."""
    from torch.profiler import ProfilerActivity, profile

    fn()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iters):
            fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1
    kinds: dict[str, float] = {}
    for e in events:
        kinds[op_kind(e.key)] = kinds.get(op_kind(e.key), 0.0) + e.self_cpu_time_total / total
    rows = [
        {
            "op": e.key,
            "self_cpu_ms": e.self_cpu_time_total / 1000 / iters,
            "share": e.self_cpu_time_total / total,
            "calls": e.count // iters,
        }
        for e in events[:top]
    ]
    md = markdown_table(
        ["op", "self CPU ms / call", "share", "calls / call"],
        [[r["op"], f"{r['self_cpu_ms']:.1f}", f"{r['share']:.1%}", r["calls"]] for r in rows],
    )
    return md, rows, kinds


def rounds_text(row: dict) -> str:
    """Per-round ratios of a comparison row, e.g. '3.9 8.2 8.8'."""
    return " ".join(f"{r:.2g}" for r in row.get("round_ratios", []))


def kinds_line(kinds: dict[str, float]) -> str:
    """'convolution 45%, attention 6%, ...' (largest first)."""
    return ", ".join(f"{k} {v:.0%}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]) if v >= 0.01)


# -- output --
def markdown_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(map(str, headers)) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(map(str, r)) + " |" for r in rows]
    return "\n".join(lines)


def machine_line(m: dict, how: str = "each ratio is measured interleaved in one process") -> str:
    busy = (
        f"1-minute load average {m['loadavg_1m_at_start']} at start, {m.get('loadavg_1m_at_end', '?')} at end"
        + (
            f"; this process got {m['cpu_per_wall']} CPU-s per wall-s over {m['wall_s']:.0f} s"
            if "cpu_per_wall" in m
            else ""
        )
    )
    return (
        f"Machine: {m['nproc']} CPU cores ({m['cpu']}){', GPU ' + m['gpu'] if m.get('gpu') else ''}, "
        f"torch {m['torch']}, diffusers {m['diffusers']}, "
        f"{m['threads']} threads; {busy}. Other work shared the machine, so absolute numbers are noisy; "
        f"{how}."
    )


def fmt(x: float) -> str:
    return f"{x:.3g}" if abs(x) < 100 else f"{x:.0f}"


def write_results(out: str | Path, name: str, data: dict, markdown: str) -> Path:
    """bench/results/<name>.json and <name>.md; prints the markdown."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=1))
    (out / f"{name}.md").write_text(markdown + "\n")
    print(markdown)
    return out / f"{name}.json"
