"""SIGKILL the trainer at random moments (many of them inside checkpoint writes): checkpoints stay atomic."""

import os
import random
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffxattn import DiffXAttnPipeline
from diffxattn import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
KILLS = 22
FAST = ["train.checkpoint_every=1", "train.checkpoints_total_limit=2", "logging.validate_every=100000",
        "logging.tensorboard=false", "logging.validation_prompts=[a red circle]", "scheduler.steps=2",
        "train.batch_size=2"]
TMP_CKPT = re.compile(r"\.tmp-checkpoint-(\d+)")
DEADLINE_S = 600  # per wait, generous: the machine may be busy


def _tmp_entries(root: Path) -> set[str]:
    try:
        return {e.name for e in os.scandir(root) if e.name.startswith(".tmp-")}
    except FileNotFoundError:
        return set()


def _newest_step(root: Path) -> int | None:
    found = ckpt.complete_checkpoints(root)
    return found[-1][0] if found else None


def _start(out: Path, log: Path, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "diffxattn.train", TINY, f"train.output_dir={out}", *FAST, *extra]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    with open(log, "w") as f:
        return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)


def _wait_for(proc: subprocess.Popen, log: Path, what: str, cond) -> None:
    """Poll (about every ms) until cond() is true; fail if the trainer exits or it takes too long."""
    end = time.monotonic() + DEADLINE_S
    while not cond():
        if proc.poll() is not None:
            pytest.fail(f"trainer exited ({proc.returncode}) while waiting for {what}:\n{log.read_text()[-3000:]}")
        if time.monotonic() > end:
            proc.kill()
            proc.wait()
            pytest.fail(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")
        time.sleep(0.001)


def _check_invariants(root: Path) -> int | None:
    """Every checkpoint-N is complete and readable; latest_checkpoint is the newest complete one."""
    names = sorted(p.name for p in root.iterdir()) if root.is_dir() else []
    finals = [n for n in names if re.fullmatch(r"checkpoint-\d+", n)]
    for name in finals:
        folder = root / name
        assert ckpt.is_complete(folder), f"{name} has no {ckpt.MARKER} marker: {names}"
        state = ckpt.read_state(folder)
        assert state["step"] == int(name.split("-")[1])
        for index in (0, 1):  # UNet, text encoder (trained in the tiny config)
            weights = ckpt.read_model_weights(folder, index)
            assert weights and all(torch.isfinite(v).all() for v in weights.values()), (name, index)
        ema = ckpt.read_ema(folder)
        assert ema and all(torch.isfinite(v).all() for v in ema.values()), name
    assert [p.name for _, p in ckpt.complete_checkpoints(root)] == sorted(finals, key=lambda n: int(n[11:]))
    latest = ckpt.latest_checkpoint(root)
    if finals:
        assert latest is not None and ckpt.is_complete(latest) and latest.name == max(finals, key=lambda n: int(n[11:]))
        return int(latest.name.split("-")[1])
    assert latest is None
    return None


def _resume_step(root: Path) -> int | None:
    """The step `--resume latest` will start from: remove_stale first renames complete tmp folders into place."""
    steps = [s for s, _ in ckpt.complete_checkpoints(root)]
    steps += [int(m.group(1)) for n in _tmp_entries(root) if (m := TMP_CKPT.fullmatch(n))
              and ckpt.is_complete(root / n) and not (root / f"checkpoint-{m.group(1)}").exists()]
    return max(steps, default=None)


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_half_written_checkpoint(tmp_path):
    rng = random.Random(0)
    out, root = tmp_path / "run", tmp_path / "run" / "checkpoints"
    t0 = time.monotonic()
    newest, history = None, []
    in_write = marker_set = 0
    for k in range(KILLS):
        log = tmp_path / f"log-{k}.txt"
        stale = _tmp_entries(root)  # left by the previous kill: remove_stale deletes/renames them at start
        before = _resume_step(root)
        proc = _start(out, log, "train.max_steps=100000", *(["--resume", "latest"] if k else []))
        _wait_for(proc, log, "stale tmp folders to be cleaned up", lambda: not (_tmp_entries(root) & stale))
        if rng.random() < 0.5:  # kill inside the k-th new checkpoint write, a few ms to 0.2 s into it
            kind, nth, delay = "tmp", rng.randint(1, 3), rng.choice([0.0, rng.uniform(0, 0.2)])
            seen: set[str] = set()

            def nth_tmp_seen() -> bool:
                seen.update(n for n in _tmp_entries(root) if TMP_CKPT.fullmatch(n))
                return len(seen) >= nth
            _wait_for(proc, log, f"tmp checkpoint #{nth}", nth_tmp_seen)
        else:  # kill at a random moment once this process has written its first checkpoint
            kind, delay = "delay", rng.uniform(0, 2.0)
            _wait_for(proc, log, "a new checkpoint",
                      lambda: (_newest_step(root) or 0) > (before or 0))
        time.sleep(delay)
        proc.kill()  # SIGKILL
        proc.wait()
        assert proc.returncode == -9, log.read_text()[-3000:]
        left = _tmp_entries(root)
        tmps = [n for n in left if TMP_CKPT.fullmatch(n)]
        in_write += bool(tmps)
        marker_set += any(ckpt.is_complete(root / n) for n in tmps)
        step = _check_invariants(root)
        assert step is not None or newest is None, "a complete checkpoint disappeared"
        if newest is not None:
            assert step >= newest, f"newest complete checkpoint went back from {newest} to {step}"
        newest = step
        history.append((kind, round(delay, 3), step, sorted(left)))

    # a last resumed run raises max_steps by 2 and finishes normally
    start = _resume_step(root)
    assert start is not None
    log = tmp_path / "log-final.txt"
    proc = _start(out, log, f"train.max_steps={start + 2}", "--resume", "latest")
    assert proc.wait(timeout=DEADLINE_S) == 0, log.read_text()[-3000:]
    text = log.read_text()
    assert f"at step {start}" in text and f"to step {start + 2}" in text, text[-3000:]
    assert _check_invariants(root) == start + 2 and not _tmp_entries(root)
    assert [s for s, _ in ckpt.complete_checkpoints(root)] == [start + 1, start + 2]
    pipe = DiffXAttnPipeline.from_pretrained(out / "pipeline")
    assert torch.isfinite(torch.cat([p.flatten() for p in pipe.unet.parameters()])).all()

    for i, h in enumerate(history):
        print(f"kill {i:2d}: {h[0]:5s} +{h[1]:.3f}s -> newest checkpoint-{h[2]}, left {h[3]}")
    print(f"{KILLS} SIGKILLs in {time.monotonic() - t0:.0f} s: {in_write} landed during a checkpoint write "
          f"({marker_set} of them after the marker, before the rename); final run {start} -> {start + 2}")
    assert in_write >= 5
