"""Issue #19: nothing a user owns is deleted, no run hangs, no wrong image with exit code 0, every user error
is one line with exit code 2. One test (or more) per numbered item of the issue."""

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from PIL import Image

from diffxattn import DiffXAttnPipeline, conditioning
from diffxattn import checkpoint as ckpt
from diffxattn import train as T
from diffxattn.cli import main
from diffxattn.config import ConfigError, load_config
from diffxattn.control import AttentionStore
from diffxattn.data import ImageFolderDataset
from diffxattn.generation import generate
from diffxattn.heatmaps import export
from diffxattn.limits import LimitError
from diffxattn.pipeline import NonFiniteImageError
from diffxattn.prompt_syntax import PromptSyntaxError, parse_weights
from conftest import seeded

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["logging.tensorboard=false", "logging.validation_prompts=[a red circle]", "scheduler.steps=2",
         "logging.validate_every=100"]
ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def train(out, *args) -> int:
    code = T.main([TINY, f"train.output_dir={out}", *QUIET, *args])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return code


def cli(*args) -> int:
    """The `diffxattn` command in this process: its exit code, also for argparse's errors."""
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


def one_line(err: str, prog: str) -> str:
    """The single stderr line of a user error (no traceback, no usage block), after any progress output."""
    lines = err.strip().splitlines()
    errors = [line for line in lines if line.startswith(f"{prog}: error: ")]
    assert len(errors) == 1 and lines[-1] == errors[0] and "Traceback" not in err, err
    return errors[0]


@pytest.fixture(scope="module")
def pipe_dir(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("saved") / "pipe"
    tiny_pipe.save_pretrained(folder)
    return folder


def edited_pipeline(pipe_dir, tmp_path, file: str, **values) -> Path:
    """A copy of the saved pipeline with `values` set in one of its JSON configs."""
    folder = tmp_path / f"edited-{len(list(tmp_path.iterdir()))}"
    shutil.copytree(pipe_dir, folder)
    config = json.loads((folder / file).read_text())
    config.update(values)
    (folder / file).write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def checkpoint_dir(tmp_path_factory):
    """A complete checkpoint of a 1-step tiny run."""
    out = tmp_path_factory.mktemp("run")
    assert train(out, "train.max_steps=1", "train.checkpoint_every=1") == 0
    return out / "checkpoints" / "checkpoint-1"


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


# ---- 1. export never deletes a folder it did not write ------------------------------------------------

def test_export_refuses_a_users_folder_and_never_replaces_the_working_directory_or_its_parent(
        checkpoint_dir, tmp_path, capsys, monkeypatch):
    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    assert T.main(["export", str(checkpoint_dir), "-o", str(thesis)]) == 2
    line = one_line(capsys.readouterr().err, "diffxattn.train")
    assert "is not empty and is not a pipeline folder written by diffxattn (it holds thesis.tex)" in line
    assert "--overwrite" in line
    assert tree(thesis) == {"thesis.tex": b"years of work"}

    work = tmp_path / "work" / "sub"
    work.mkdir(parents=True)
    (tmp_path / "work" / "notes.txt").write_text("mine")
    monkeypatch.chdir(work)
    for target in ("..", ".", str(tmp_path)):  # not even with --overwrite
        assert T.main(["export", str(checkpoint_dir), "-o", target, "--overwrite"]) == 2
        line = one_line(capsys.readouterr().err, "diffxattn.train")
        assert f"refusing to replace '{target}': it is or contains the working directory" in line
    assert (tmp_path / "work" / "notes.txt").read_text() == "mine" and work.is_dir()
    # a folder holding the checkpoint being exported
    assert T.main(["export", str(checkpoint_dir), "-o", str(checkpoint_dir.parent), "--overwrite"]) == 2
    assert "it is or contains" in capsys.readouterr().err and ckpt.is_complete(checkpoint_dir)


def test_export_replaces_its_own_pipeline_and_with_overwrite_a_folder_atomically(
        checkpoint_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "pipe"
    assert T.main(["export", str(checkpoint_dir), "-o", str(out)]) == 0
    assert T.main(["export", str(checkpoint_dir), "-o", str(out)]) == 0  # a pipeline it wrote: replaced
    assert DiffXAttnPipeline.from_pretrained(out).unet.config.sample_size == 16

    thesis = tmp_path / "thesis"
    thesis.mkdir()
    (thesis / "thesis.tex").write_text("years of work")
    real_save = DiffXAttnPipeline.save_pretrained

    def disk_fills_up(self, folder, **kw):
        real_save(self, folder, **kw)  # the new folder is half written when the disk is full
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(DiffXAttnPipeline, "save_pretrained", disk_fills_up)
    assert T.main(["export", str(checkpoint_dir), "-o", str(thesis), "--overwrite"]) == 2
    assert "disk full" in one_line(capsys.readouterr().err, "diffxattn.train")
    assert tree(thesis) == {"thesis.tex": b"years of work"}  # the old folder stays until the new one is whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["pipe", "thesis"]  # no temporary folder left
    monkeypatch.setattr(DiffXAttnPipeline, "save_pretrained", real_save)
    assert T.main(["export", str(checkpoint_dir), "-o", str(thesis), "--overwrite"]) == 0
    assert not (thesis / "thesis.tex").exists()
    assert DiffXAttnPipeline.from_pretrained(thesis).unet.config.sample_size == 16


def test_build_follows_the_same_overwrite_policy(tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "data.csv").write_text("1,2")
    assert cli("build", TINY, "-o", tmp_path / "mine", "text.vocab_captions=50") == 2
    assert "not a pipeline folder written by diffxattn" in one_line(capsys.readouterr().err, "diffxattn build")
    assert tree(tmp_path / "mine") == {"data.csv": b"1,2"}


# ---- 2. data smaller than a batch: an error, not an endless loop -----------------------------------------

def test_training_data_smaller_than_a_batch_is_an_error_not_a_hang(tmp_path, capsys):
    cmd = [sys.executable, "-m", "diffxattn.train", TINY, f"train.output_dir={tmp_path / 'a'}", *QUIET,
           "train.max_steps=3", "data.length=4"]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, timeout=300, cwd=ROOT)
    assert proc.returncode == 2
    line = one_line(proc.stderr, "diffxattn.train")
    assert "the training data (shapes) has 4 items, fewer than one batch (train.batch_size=8)" in line
    root = tmp_path / "images"
    root.mkdir()
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(root / "a.png")
    (root / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a red circle"}\n')
    assert train(tmp_path / "b", "data.kind=imagefolder", f"data.root={root}", "train.max_steps=2") == 2
    assert "(imagefolder) has 1 items, fewer than one batch" in one_line(capsys.readouterr().err, "diffxattn.train")


# ---- 3. one run per output folder ----------------------------------------------------------------------

def write_lock(out: Path, pid: int, host: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "run.lock").write_text(json.dumps({"pid": pid, "host": host}))


def test_a_second_run_into_a_used_output_folder_is_refused_and_a_stale_lock_is_taken_over(tmp_path, capsys):
    out, host = tmp_path / "run", socket.gethostname()
    owner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    try:
        write_lock(out, owner.pid, host)
        assert train(out, "train.max_steps=1") == 2
        line = one_line(capsys.readouterr().err, "diffxattn.train")
        assert f"is in use by the run of process {owner.pid} on {host}" in line
        assert [p.name for p in out.iterdir()] == ["run.lock"]  # nothing read, cleaned or written
    finally:
        owner.kill()
        owner.wait()
    write_lock(out, 1, "another-host.example")  # cannot be checked from here: respected
    assert train(out, "train.max_steps=1") == 2
    assert "on another-host.example" in (err := capsys.readouterr().err) and "delete the lock file" in err
    write_lock(out, owner.pid, host)  # its process is gone: stale
    (out / "pipeline").mkdir()
    (out / "pipeline" / "notes.txt").write_text("mine")  # not a pipeline the run wrote: refused before training
    assert train(out, "train.max_steps=1") == 2
    assert "pipeline is not empty and is not a pipeline folder written by diffxattn (it holds notes.txt)" in \
        one_line(capsys.readouterr().err, "diffxattn.train")
    assert (out / "pipeline" / "notes.txt").read_text() == "mine" and not (out / "checkpoints").exists()
    (out / "pipeline" / "notes.txt").unlink()
    assert train(out, "train.max_steps=1") == 0
    assert not (out / "run.lock").exists()
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1]


@pytest.mark.slow
def test_two_real_trainers_into_one_folder_never_mix(tmp_path, capsys):
    out = tmp_path / "run"
    log = tmp_path / "a.log"
    cmd = [sys.executable, "-m", "diffxattn.train", TINY, f"train.output_dir={out}", *QUIET,
           "train.max_steps=100000", "train.checkpoint_every=2", "train.batch_size=2"]
    with open(log, "w") as f:
        first = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=ENV, cwd=ROOT)
    try:
        deadline = time.monotonic() + 300
        while not (out / "metrics.jsonl").is_file() or ckpt.latest_checkpoint(out / "checkpoints") is None:
            assert first.poll() is None and time.monotonic() < deadline, log.read_text()[-2000:]
            time.sleep(0.05)
        for resume in ([], ["--resume", "latest"]):  # a new run, and one resuming the other's checkpoints
            assert train(out, "train.max_steps=4", *resume) == 2
            assert f"in use by the run of process {first.pid}" in capsys.readouterr().err
    finally:
        first.send_signal(signal.SIGKILL)
        first.wait()
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, len(steps) + 1))  # one run's lines only
    latest = ckpt.complete_checkpoints(out / "checkpoints")[-1][0]
    assert train(out, f"train.max_steps={latest + 1}", "--resume", "latest") == 0  # the killed run's lock: stale
    assert not (out / "run.lock").exists()


# ---- 4. YAML alias bombs -------------------------------------------------------------------------------

BOMB = ('logging:\n  validation_prompts: [&i [&h [&g [&f [&e [&d [&c [&b [&a ["lol","lol","lol","lol","lol",'
        '"lol","lol","lol","lol"],*a,*a,*a,*a,*a,*a,*a,*a],*b,*b,*b,*b,*b,*b,*b,*b],*c,*c,*c,*c,*c,*c,*c,*c],'
        '*d,*d,*d,*d,*d,*d,*d,*d],*e,*e,*e,*e,*e,*e,*e,*e],*f,*f,*f,*f,*f,*f,*f,*f],*g,*g,*g,*g,*g,*g,*g,*g],'
        '*h,*h,*h,*h,*h,*h,*h,*h]]\n')


def test_a_yaml_alias_bomb_is_refused_at_once_with_a_short_message(tmp_path):
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text(BOMB)
    start = time.process_time()
    with pytest.raises(ConfigError, match=r"YAML at line 2 expands to more than 100,000 values") as info:
        load_config(bomb)
    assert time.process_time() - start < 5 and len(str(info.value)) < 200
    proc = subprocess.run([sys.executable, "-m", "diffxattn.cli", "build", str(bomb), "-o", str(tmp_path / "out")],
                          capture_output=True, text=True, env=ENV, timeout=300)
    assert proc.returncode == 2 and "expands to more than" in one_line(proc.stderr, "diffxattn build")
    with pytest.raises(ConfigError, match="refers to itself"):
        load_config(overrides=["logging.validation_prompts=&a [x, *a]"])


def test_config_errors_quote_big_values_briefly_and_plain_aliases_still_work(tmp_path):
    big = tmp_path / "big.yaml"
    big.write_text("logging:\n  validation_prompts: [[" + ", ".join(["'" + "x" * 1000 + "'"] * 50) + "]]\n")
    with pytest.raises(ConfigError, match=r"validation_prompts\[0\]: expected str, got \[") as info:
        load_config(big)
    assert len(str(info.value)) < 300
    with pytest.raises(ConfigError) as info:
        load_config(overrides=["model.kind=" + "y" * 1_000_000])
    assert len(str(info.value)) < 300 and "model.kind=" in str(info.value)
    ok = tmp_path / "ok.yaml"
    ok.write_text("data: &d {size: 16}\nmodel: {sample_size: 16}\nlogging:\n  validation_prompts: &p [a, b]\n")
    assert load_config(ok).logging.validation_prompts == ("a", "b")


# ---- 5. no wrong image with exit code 0 -----------------------------------------------------------------

@pytest.mark.parametrize("value", ["inf", "1e308", "nan", "-5", "0.5", "0", "101"])
def test_guidance_outside_1_to_100_is_an_error(pipe_dir, tmp_path, capsys, value):
    out = tmp_path / "x.png"
    assert cli("generate", "a red circle", "--pipeline", pipe_dir, "--guidance", value, "-o", out) == 2
    line = one_line(capsys.readouterr().err, "diffxattn generate")
    assert "argument --guidance: guidance=" in line and "must be a number in [1, 100]" in line
    assert not out.exists()


def test_steps_zero_and_bad_guidance_are_errors_in_the_api_too(tiny_pipe, pipe_dir, tmp_path, capsys):
    assert cli("generate", "a red circle", "--pipeline", pipe_dir, "--steps", "0", "-o", tmp_path / "x.png") == 2
    assert "steps=0 must be a whole number >= 1" in one_line(capsys.readouterr().err, "diffxattn generate")
    for kwargs, message in [({"num_inference_steps": 0}, "num_inference_steps=0 must be a whole number"),
                            ({"guidance_scale": float("inf")}, "guidance_scale=inf must be"),
                            ({"guidance_scale": float("nan")}, "guidance_scale=nan must be"),
                            ({"guidance_scale": -5.0}, "guidance_scale=-5.0 must be")]:
        with pytest.raises(LimitError, match=message):
            tiny_pipe("a red circle", **kwargs)
    with pytest.raises(ValueError, match="steps must be at least 1, got 0"):  # it ran the default 4 steps
        generate(tiny_pipe, "a (red:1.2) circle", num_inference_steps=0)
    with pytest.raises(LimitError, match="guidance_scale=nan must be"):
        generate(tiny_pipe, "a (red:1.2) circle", guidance_scale=float("nan"))
    for value in (1, 100):  # the ends of the range work
        image = tiny_pipe("a red circle", guidance_scale=value, num_inference_steps=2, generator=seeded(0),
                          output_type="np").images
        assert np.isfinite(image).all() and image.std() > 0


def test_a_nan_in_the_scheduler_config_or_the_samples_is_an_error(pipe_dir, tmp_path, capsys):
    folder = edited_pipeline(pipe_dir, tmp_path, "scheduler/scheduler_config.json", beta_schedule="linear",
                             beta_start=float("nan"))
    assert cli("generate", "a red circle", "--pipeline", folder, "-o", tmp_path / "x.png") == 2
    assert "scheduler_config.json: beta_start is not a finite number" in one_line(capsys.readouterr().err,
                                                                                  "diffxattn generate")
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(NonFiniteImageError, match="NaN/inf"):  # the last guard: never a black image
        DiffXAttnPipeline.postprocess(torch.full((1, 3, 4, 4), float("nan")))


# ---- 6. 16-bit and float images ------------------------------------------------------------------------

def test_16_bit_pngs_and_float_images_are_scaled_not_clipped(tmp_path):
    gray16 = np.array([[0, 16384, 32768, 65535]] * 4, np.uint16)
    Image.fromarray(gray16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode == "I;16"  # a real 16-bit PNG
    Image.fromarray(np.full((4, 4), 0.25, np.float32)).save(tmp_path / "f.tiff")
    Image.fromarray(np.full((4, 4), 2.0, np.float32)).save(tmp_path / "bright.tiff")
    (tmp_path / "metadata.jsonl").write_text("".join(json.dumps({"file_name": n, "text": "x"}) + "\n"
                                                     for n in ("g16.png", "f.tiff", "bright.tiff")))
    ds = ImageFolderDataset(tmp_path, size=4)
    expected = np.round(gray16 / 257.0) / 127.5 - 1  # 0, 64, 128, 255 in 8 bits
    assert np.allclose(ds[0]["pixel_values"].numpy(), expected[None].repeat(3, 0), atol=1e-6)
    assert np.allclose(ds[1]["pixel_values"].numpy(), 64 / 127.5 - 1, atol=1e-6)
    with pytest.raises(ValueError, match=r"bright\.tiff: a mode F image with values from 2 to 2; expected 0 to 1"):
        ds[2]


# ---- 7. atomic image writes ----------------------------------------------------------------------------

def test_a_failed_image_write_leaves_the_old_file_and_says_disk(pipe_dir, tmp_path, capsys, monkeypatch):
    out = tmp_path / "old.png"
    assert cli("generate", "a red circle", "--pipeline", pipe_dir, "--steps", "2", "-o", out) == 0
    good = out.read_bytes()

    def full_disk(self, fp, *args, **kwargs):
        Path(fp).write_bytes(good[:20])  # part of the file made it to disk
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(Image.Image, "save", full_disk)
    assert cli("generate", "a blue square", "--pipeline", pipe_dir, "--steps", "2", "-o", out) == 2
    line = one_line(capsys.readouterr().err, "diffxattn generate")
    assert f"disk full while writing {out}" in line
    assert out.read_bytes() == good and [p.name for p in tmp_path.iterdir()] == ["old.png"]


# ---- 8. sizes checked before allocation ----------------------------------------------------------------

@pytest.mark.parametrize("args, limit", [(["-n", "100000"], "DIFFXATTN_MAX_PIXELS"),
                                         (["--height", "65536"], "DIFFXATTN_MAX_IMAGE_PIXELS"),
                                         (["--scale", "10000"], "DIFFXATTN_MAX_PIXELS"),
                                         (["--steps", "100000"], "DIFFXATTN_MAX_STEPS")])
def test_sizes_over_a_limit_are_refused_up_front_naming_it(pipe_dir, tmp_path, capsys, args, limit):
    start = time.process_time()
    assert cli("generate", "a red circle", "--pipeline", pipe_dir, *args, "-o", tmp_path / "x.png") == 2
    assert time.process_time() - start < 20  # refused, not allocated (the issue: minutes, then MemoryError)
    line = one_line(capsys.readouterr().err, "diffxattn generate")
    assert "over the limit of" in line and f"raise it with the environment variable {limit}=N" in line


def test_a_limit_is_raised_by_its_environment_variable(pipe_dir, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("DIFFXATTN_MAX_PIXELS", "256")  # one 16x16 image
    assert cli("generate", "a red circle", "--pipeline", pipe_dir, "--steps", "1", "-n", "2", "-o",
               tmp_path / "x.png") == 2
    assert "2 images of 16x16 pixels is 512, over the limit of 256" in capsys.readouterr().err
    monkeypatch.setenv("DIFFXATTN_MAX_PIXELS", "512")
    assert cli("generate", "a red circle", "--pipeline", pipe_dir, "--steps", "1", "-n", "2", "-o",
               tmp_path / "x.png") == 0
    assert (tmp_path / "x-1.png").is_file()


@pytest.mark.parametrize("value, message", [(10**9, "num_train_timesteps is 1,000,000,000, over the limit"),
                                            (1e9, "num_train_timesteps=1000000000.0 must be a whole number")])
def test_a_pipeline_folder_asking_for_a_billion_timesteps_is_refused(pipe_dir, tmp_path, capsys, value, message):
    folder = edited_pipeline(pipe_dir, tmp_path, "scheduler/scheduler_config.json", num_train_timesteps=value)
    start = time.process_time()
    assert cli("generate", "a red circle", "--pipeline", folder, "-o", tmp_path / "x.png") == 2
    assert time.process_time() - start < 20 and message in one_line(capsys.readouterr().err, "diffxattn generate")


# ---- 9. one line, exit code 2, for every error a user can cause --------------------------------------

@pytest.mark.parametrize("file, values, message", [
    ("unet/config.json", {"num_heads": "two"}, "TypeError: unsupported operand"),
    ("unet/config.json", {"cross_attention_resolutions": None}, "TypeError: 'NoneType' object is not iterable"),
    # a config asking for parameters the weights file lacks (diffusers leaves them unallocated, on "meta")
    ("unet/config.json", {"gated_cross_attention": 1}, "has no weights for down_blocks.0.attentions.0.gate"),
    ("scheduler/scheduler_config.json", {"trained_betas": [0.5] * 10}, "IndexError: index"),
    ("scheduler/scheduler_config.json", {"beta_schedule": "foo"}, "NotImplementedError: foo is not implemented"),
    ("text_encoder/config.json", {"hidden_act": "foo"}, "KeyError: 'foo'"),
    ("tokenizer/tokenizer_config.json", {"model_max_length": 10**12}, "model_max_length=1000000000000 must be"),
    ("model_index.json", {"default_steps": 0}, "model_index.json: default_steps=0 must be a whole number"),
])
def test_malformed_component_configs_give_one_line(pipe_dir, tmp_path, capsys, file, values, message):
    folder = edited_pipeline(pipe_dir, tmp_path, file, **values)
    assert cli("generate", "a red circle", "--pipeline", folder, "--steps", "2", "-o", tmp_path / "x.png") == 2
    assert message in one_line(capsys.readouterr().err, "diffxattn generate")


def test_deeply_nested_json_bad_counts_and_override_yaml_give_one_line(pipe_dir, tmp_path, capsys):
    folder = tmp_path / "deep"
    shutil.copytree(pipe_dir, folder)
    (folder / "unet" / "config.json").write_text("[" * 100_000 + "]" * 100_000)  # RecursionError in json
    assert cli("generate", "a red circle", "--pipeline", folder, "-o", tmp_path / "x.png") == 2
    assert "config.json is not valid JSON (RecursionError" in one_line(capsys.readouterr().err, "diffxattn generate")
    assert cli("generate", "a red circle", "--pipeline", pipe_dir, "-n", "0") == 2
    assert "argument -n: expected a whole number >= 1, got 0" in one_line(capsys.readouterr().err, "diffxattn generate")
    assert cli("build", TINY, "-o", tmp_path / "b", "text.hidden_size=[1") == 2
    assert "override 'text.hidden_size=[1': the value is not valid YAML" in one_line(capsys.readouterr().err,
                                                                                    "diffxattn build")
    assert train(tmp_path / "t", "train.max_steps={") == 2
    assert "not valid YAML" in one_line(capsys.readouterr().err, "diffxattn.train")
    with pytest.raises(ValueError, match="is not valid JSON"):  # --debug: the traceback instead
        main(["--debug", "generate", "x", "--pipeline", str(folder)])


def test_trainer_data_checkpoint_and_disk_errors_give_one_line(checkpoint_dir, tmp_path, capsys, monkeypatch):
    root = tmp_path / "images"
    root.mkdir()
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    (root / "metadata.jsonl").write_text('{"file_name": "broken.png", "text": "a red circle"}\n')
    assert train(tmp_path / "a", "data.kind=imagefolder", f"data.root={root}", "train.batch_size=1") == 2
    assert "broken.png: cannot be decoded as an image" in one_line(capsys.readouterr().err, "diffxattn.train")

    damaged = tmp_path / "checkpoint-1"
    shutil.copytree(checkpoint_dir, damaged)
    weights = damaged / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    assert T.main(["export", str(damaged), "-o", str(tmp_path / "p")]) == 2
    assert f"cannot read the checkpoint {damaged}" in one_line(capsys.readouterr().err, "diffxattn.train")
    assert train(tmp_path / "b", "train.max_steps=2", "--resume", str(damaged)) == 2
    assert f"cannot read the checkpoint {damaged}" in one_line(capsys.readouterr().err, "diffxattn.train")

    def full_disk(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "trainer_state.json")

    monkeypatch.setattr(ckpt, "write_trainer_files", full_disk)
    assert train(tmp_path / "c", "train.max_steps=1", "train.checkpoint_every=1") == 2
    assert "disk full while writing trainer_state.json" in one_line(capsys.readouterr().err, "diffxattn.train")
    assert not (tmp_path / "c" / "run.lock").exists()  # the lock goes with the run, however it ends


# ---- 10. the smaller ones ------------------------------------------------------------------------------

def test_resume_latest_without_a_complete_checkpoint_is_an_error_naming_the_folder(tmp_path, capsys):
    partial = tmp_path / "checkpoints" / "checkpoint-3"
    partial.mkdir(parents=True)
    (partial / "model.safetensors").write_bytes(b"my copy, half done")
    assert train(tmp_path, "train.max_steps=3", "--resume", "latest") == 2
    line = one_line(capsys.readouterr().err, "diffxattn.train")
    assert f"--resume latest: {tmp_path / 'checkpoints'} has no complete checkpoint (checkpoint-3: no COMPLETE" in line
    assert train(tmp_path, "train.max_steps=3", "train.checkpoint_every=3") == 2  # a new run would save step 3
    assert f"{partial} is not a finished checkpoint" in one_line(capsys.readouterr().err, "diffxattn.train")
    assert tree(partial) == {"model.safetensors": b"my copy, half done"}


def test_heatmap_export_into_a_used_folder_removes_only_its_own_stale_word_maps(tiny_pipe, tmp_path):
    out = tmp_path / "maps"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    (out / "word-07-mine.png").write_bytes(b"not listed in maps.json: not the export's")
    for prompt in ("a red circle left of a blue square", "a green triangle"):
        with AttentionStore(tiny_pipe) as store:
            image = tiny_pipe(prompt, num_inference_steps=2, generator=seeded(0)).images[0]
        meta = export(out, store, image, prompt, seed=0, scale=2)
    words = sorted(p.name for p in out.glob("word-*.png"))
    assert words == sorted([*meta["word_files"].values(), "word-07-mine.png"])
    assert meta["words"] == ["a", "green", "triangle"] and (out / "notes.txt").read_text() == "mine"
    with pytest.raises(LimitError, match="scale=0 must be a whole number >= 1"):
        export(out, store, image, "a green triangle", scale=0)


@pytest.mark.parametrize("command", ["generate", "heatmap"])
@pytest.mark.parametrize("scale", ["0", "-3"])
def test_scale_below_one_is_an_error(pipe_dir, tmp_path, capsys, command, scale):
    assert cli(command, "a red circle", "--pipeline", pipe_dir, "--scale", scale, "-o", tmp_path / "x") == 2
    assert f"argument --scale: expected a whole number >= 1, got {scale}" in one_line(capsys.readouterr().err,
                                                                                      f"diffxattn {command}")


def test_a_huge_prompt_is_quoted_briefly_in_warnings_and_errors(tiny_pipe):
    prompt = "a red circle " + "left of a blue square " * 20_000  # 440 KB
    with pytest.warns(UserWarning) as caught:
        conditioning.check_length(tiny_pipe.tokenizer, [prompt])
    assert len(str(caught[0].message)) < 400 and "these words are dropped: of a blue square" in str(caught[0].message)
    with pytest.raises(PromptSyntaxError) as info:
        parse_weights(prompt + "(unclosed", strict=True)
    assert len(str(info.value)) < 400 and str(info.value).splitlines()[-1].endswith("^")


def test_a_word_cut_by_the_encoder_window_gets_no_map(tiny_pipe):
    prompt = "a red circle " + "q" * 300  # the long word starts inside the 16-token window and ends past it
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with AttentionStore(tiny_pipe) as store:
            tiny_pipe(prompt, num_inference_steps=2, generator=seeded(0))
    assert any("these words are dropped: " + "q" * 50 in str(w.message) for w in caught)
    assert [w for w, _ in store.words()] == ["a", "red", "circle"]
