"""bench/device_train.sh, the GPU training run, end to end on the CPU with a tiny budget: training stopped by its
time limit, the newest complete checkpoint exported as an fp16 UNet in unet.tar, the pipeline scored, and only the
files the device tool brings back left in $OUT."""

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
from safetensors import safe_open

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # about a minute on 2 cores


@pytest.mark.parametrize("config, extra, channels", [
    (None, [], None),  # the shipped model, fine-tuned: its layout
    ("configs/shapes-32-cpu.yaml", ["model.pretrained=null"], [64, 96, 128]),  # another layout, from scratch
])
def test_device_train_script_stops_at_its_time_limit_and_keeps_the_newest_checkpoint(tmp_path, config, extra,
                                                                                       channels):
    out, run = tmp_path / "out", tmp_path / "run"
    env = {**os.environ, "OUT": str(out), "RUN_DIR": str(run), "TRAIN_S": "45", "EVAL_ARGS": "--quick --sets single",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}", **({"CONFIG": config} if config
                                                                                         else {})}
    overrides = ["train.max_steps=100000", "train.batch_size=2", "train.checkpoint_every=1", "train.mixed_precision=no",
                 "data.num_workers=0", "logging.log_every=1", "train.checkpoints_total_limit=2", *extra]
    proc = subprocess.run(["bash", str(ROOT / "bench" / "device_train.sh"), *overrides], env=env, capture_output=True,
                          text=True, timeout=600)
    log = (out / "log.txt").read_text()
    assert proc.returncode == 0, log[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["eval.json", "log.txt", "metrics.jsonl", "unet.tar"]
    assert "training exit code 124" in log  # stopped by TRAIN_S, not finished
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    exported = int(log.split("unet.tar: ")[1].split(",")[0].rsplit("checkpoint-", 1)[1])
    assert 1 <= exported <= max(steps) < 100000
    with tarfile.open(out / "unet.tar") as tar:
        assert sorted(tar.getnames()) == ["unet", "unet/config.json", "unet/diffusion_pytorch_model.safetensors"]
        tar.extractall(tmp_path / "pipe", filter="data")
    with safe_open(str(tmp_path / "pipe" / "unet" / "diffusion_pytorch_model.safetensors"), "pt") as f:
        assert {str(f.get_tensor(k).dtype) for k in f.keys()} == {"torch.float16"}
    shipped = json.loads((ROOT / "pipelines" / "shapes-32" / "unet" / "config.json").read_text())
    assert json.loads((tmp_path / "pipe" / "unet" / "config.json").read_text())["block_out_channels"] == \
        (channels or shipped["block_out_channels"])
    report = json.loads((out / "eval.json").read_text())
    assert report["pipeline"] == str(run / "export") and list(report["sets"]) == ["single"]
