"""bench/device_train_both.sh (two runs of bench/device_train.sh), the GPU training, end to end on the CPU with a
tiny budget: training stopped by its time limit, the newest complete checkpoint exported as an fp16 UNet in unet.tar,
the pipeline scored, and only the files the device tool brings back left in $OUT."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # about two minutes on 2 cores


def test_both_device_runs_stop_at_their_time_limit_and_keep_their_newest_checkpoints(tmp_path):
    """bench/device_train_both.sh: the shipped layout fine-tuned and the patch-stem layout from scratch, side by side,
    each leaving device_train.sh's four files in its own folder (eight in all, what the device tool brings back)."""
    out, run = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "OUT": str(out), "RUN_DIR": str(run), "TRAIN_S": "60", "EVAL_ARGS": "--quick --sets single",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    overrides = ["train.max_steps=100000", "train.batch_size=2", "train.checkpoint_every=1", "train.mixed_precision=no",
                 "data.num_workers=0", "logging.log_every=1", "train.checkpoints_total_limit=2"]
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_train_both.sh"), *overrides], env=env,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "stage3 exit code 0, patch exit code 0" in proc.stdout
    assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == [
        f"{name}/{f}" for name in ("patch", "stage3") for f in ("eval.json", "log.txt", "metrics.jsonl", "unet.tar")]
    shipped = json.loads((ROOT / "pipelines" / "shapes-32" / "unet" / "config.json").read_text())
    for name, channels in (("stage3", shipped["block_out_channels"]), ("patch", [64, 96, 128])):
        check_run(out / name, Path(f"{run}-{name}"), tmp_path / name, channels)


def check_run(out: Path, run: Path, tmp: Path, channels: list[int]) -> None:
    """One device_train.sh run: stopped by its time limit, its newest complete checkpoint exported as an fp16 UNet of
    the expected layout (`channels`), and that pipeline scored."""
    log = (out / "log.txt").read_text()
    assert "training exit code 124" in log, log[-3000:]  # stopped by TRAIN_S, not finished
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    exported = int(log.split("unet.tar: ")[1].split(",")[0].rsplit("checkpoint-", 1)[1])
    assert 1 <= exported <= max(steps) < 100000
    with tarfile.open(out / "unet.tar") as tar:
        assert sorted(tar.getnames()) == ["unet", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
        tar.extractall(tmp / "pipe", filter="data")
    with safe_open(str(tmp / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    assert json.loads((tmp / "pipe" / "unet" / "config.json").read_text())["block_out_channels"] == channels
    report = json.loads((out / "eval.json").read_text())
    assert report["pipeline"] == str(run / "export") and list(report["sets"]) == ["single"]
