"""The trainer: exact resume, caption dropout, config errors, NaN stop, atomic checkpoints, 2 processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from accelerate.state import AcceleratorState, GradientState
from accelerate.utils import load as accelerate_load
from diffusers import UNet2DConditionModel
from diffusers.optimization import get_scheduler
from safetensors.torch import load_file

from diffxattn import DiffXAttnPipeline, XAttnUNet
from diffxattn import checkpoint as ckpt
from diffxattn import train as T
from diffxattn.checkpoint import export_checkpoint
from diffxattn.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
TINY = str(ROOT / "configs" / "tiny.yaml")
QUIET = ["logging.tensorboard=false", "logging.validation_prompts=[a red circle]", "scheduler.steps=2",
         "train.cpu_threads=1"]  # tiny models: one thread is fastest
# the launch line that really starts 2 CPU processes (`--cpu --num_processes 2` starts one: accelerate #2741)
LAUNCH_2_CPU = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no",
                "--dynamo_backend", "no", "--num_cpu_threads_per_process", "1"]


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    """Each in-process run gets its own Accelerator configuration (accelerate keeps it in singletons)."""
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models run fastest on one thread, and much faster than with two on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def train(out, *args) -> int:
    code = T.main([TINY, f"train.output_dir={out}", *QUIET, *args])
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
    return code


def names(out) -> list[str]:
    return sorted(p.name for p in (Path(out) / "checkpoints").iterdir())


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


def lr_log(out) -> list[float]:
    return [json.loads(line)["lr"] for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


def reference_lrs(steps: int, max_steps: int) -> list[float]:
    """The tiny config's schedule on a bare optimizer: one process, no accumulation, no accelerate."""
    cfg = load_config(TINY).optim
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    sched = get_scheduler("cosine", opt, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)
    lrs = []
    for _ in range(steps):
        opt.step()
        sched.step()
        lrs.append(sched.get_last_lr()[0])
    return lrs


RESUME_ARGS = ["train.max_steps=6", "train.checkpoint_every=3", "train.gradient_accumulation_steps=2",
               "train.caption_dropout=0.3", "logging.validate_every=3", "logging.tensorboard=true"]


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """6 steps in one go (a) and 3 steps + a killed save + `--resume latest` + 3 steps (b)."""
    a, b = tmp_path_factory.mktemp("one-go"), tmp_path_factory.mktemp("resumed")
    assert train(a, *RESUME_ARGS) == 0
    assert train(b, *RESUME_ARGS, "train.stop_at_step=3") == 0
    assert names(b) == ["checkpoint-3"]
    # what a save killed half-way leaves: a tmp folder, and a folder without the completion marker
    (b / "checkpoints" / ".tmp-checkpoint-5").mkdir()
    (b / "checkpoints" / ".tmp-checkpoint-5" / "model.safetensors").write_bytes(b"truncated")
    (b / "checkpoints" / "checkpoint-4").mkdir()
    assert train(b, *RESUME_ARGS, "--resume", "latest") == 0
    return a, b


def test_resume_gives_the_same_weights_as_one_run(runs):
    a, b = runs
    assert names(a) == ["checkpoint-3", "checkpoint-6"]
    assert names(b) == ["checkpoint-3", "checkpoint-4", "checkpoint-6"]  # tmp removed, unmarked one ignored
    for name in ("model.safetensors", "model_1.safetensors", "ema.safetensors"):  # UNet, text encoder, EMA
        wa, wb = (load_file(p / "checkpoints" / "checkpoint-6" / name) for p in (a, b))
        assert max_diff(wa, wb) < 1e-6, name
    start = load_file(a / "checkpoints" / "checkpoint-3" / "model.safetensors")
    assert max_diff(start, load_file(a / "checkpoints" / "checkpoint-6" / "model.safetensors")) > 1e-4
    state = [json.loads((p / "checkpoints" / "checkpoint-6" / ckpt.STATE).read_text()) for p in (a, b)]
    assert state[0] == state[1] and state[0]["step"] == 6 and state[0]["batch_in_epoch"] == 12


def test_validation_grids_tensorboard_and_ema_pipeline_are_written(runs):
    a, _ = runs
    assert sorted(p.name for p in (a / "validation").iterdir()) == ["step-3.png", "step-6.png"]
    assert list((a / "tensorboard").rglob("events.out.tfevents*"))
    pipe = DiffXAttnPipeline.from_pretrained(a / "pipeline")
    assert isinstance(pipe.unet, XAttnUNet) and pipe.config.default_steps == 2
    ema = load_file(a / "checkpoints" / "checkpoint-6" / ckpt.EMA)
    trained = load_file(a / "checkpoints" / "checkpoint-6" / "model.safetensors")
    exported = {f"0.{k}": v for k, v in pipe.unet.state_dict().items()}
    assert max_diff({k: ema[k] for k in exported}, exported) == 0  # the pipeline has the EMA weights ...
    assert max_diff({f"0.{k}": v for k, v in trained.items()}, exported) > 1e-4  # ... training kept its own


def test_lr_at_step_k_does_not_depend_on_gradient_accumulation(runs):
    a, b = runs  # 2 micro-batches per optimizer step; the LR schedule counts optimizer steps
    assert lr_log(a) == pytest.approx(reference_lrs(6, 6), rel=1e-12)
    assert lr_log(b) == lr_log(a)


def test_prepared_lr_scheduler_steps_once_per_call_whatever_the_process_count(monkeypatch):
    from accelerate import Accelerator
    from accelerate.scheduler import AcceleratedScheduler

    def lrs(prepared_opt, sched) -> list[float]:
        out = []
        for _ in range(6):
            prepared_opt.step()
            sched.step()
            out.append(sched.get_last_lr()[0])
        return out

    cfg = load_config(TINY).optim
    acc = Accelerator(step_scheduler_with_optimizer=False)  # as the trainer creates it
    # as under a 2-process launch
    monkeypatch.setattr(AcceleratorState, "num_processes", property(lambda self: 2), raising=False)
    opt = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr)
    opt, sched = acc.prepare(opt, T.make_lr_scheduler(opt, cfg, 6))
    assert lrs(opt, sched) == pytest.approx(reference_lrs(6, 6), rel=1e-12)
    # control: accelerate's default would step the schedule twice per optimizer step on 2 processes
    opt2 = acc.prepare(torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=cfg.lr))
    sched2 = T.make_lr_scheduler(opt2.optimizer, cfg, 6)
    default = AcceleratedScheduler(sched2, opt2, step_with_optimizer=True)
    assert lrs(opt2, default)[:3] == pytest.approx(reference_lrs(6, 6)[1:6:2], rel=1e-12)


def test_caption_dropout_rate_matches_the_config_and_is_deterministic():
    draws = [T.drop_captions(["a red circle"] * 10, 0.3, 0, micro, 0) for micro in range(500)]
    rate = sum(t == "" for d in draws for t in d) / 5000
    assert abs(rate - 0.3) < 0.03
    texts = ["x"] * 50
    assert T.drop_captions(texts, 0.3, 0, 7, 1) == T.drop_captions(texts, 0.3, 0, 7, 1)  # resumable
    assert T.drop_captions(texts, 0.3, 0, 7, 1) != T.drop_captions(texts, 0.3, 0, 7, 0)  # ranks differ
    assert "" not in T.drop_captions(texts, 0.0, 0, 1, 0)
    assert set(T.drop_captions(texts, 1.0, 0, 1, 0)) == {""}


def test_unknown_config_key_exits_2_naming_the_key_and_the_allowed_ones(tmp_path):
    cmd = [sys.executable, "-m", "diffxattn.train", TINY, f"train.output_dir={tmp_path}", "train.lrr=1e-3"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 2
    assert "'train.lrr'" in proc.stderr and "max_steps" in proc.stderr and "allowed keys" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    with pytest.raises(ConfigError, match="train.lrr"):  # --debug: the traceback instead of the one line
        T.main([TINY, "train.lrr=1e-3", "--debug"])


def test_existing_checkpoints_without_resume_is_an_error(tmp_path, capsys):
    (tmp_path / "checkpoints" / "checkpoint-3").mkdir(parents=True)
    (tmp_path / "checkpoints" / "checkpoint-3" / ckpt.MARKER).write_text("")
    assert train(tmp_path) == 2
    assert "--resume latest" in capsys.readouterr().err


def test_nan_loss_stops_with_the_step_and_keeps_the_last_checkpoint(tmp_path, capsys):
    code = train(tmp_path, "train.max_steps=6", "train.checkpoint_every=2", "train.debug_nan_at_step=3",
                 "logging.validate_every=100")
    assert code == 1
    assert "non-finite loss (nan) at step 3" in capsys.readouterr().err
    assert names(tmp_path) == ["checkpoint-2"] and not (tmp_path / "pipeline").exists()
    good = tmp_path / "checkpoints" / "checkpoint-2"
    assert json.loads((good / ckpt.STATE).read_text())["step"] == 2
    for name in ("optimizer.bin", "scheduler.bin", "random_states_0.pkl"):  # torch files: weights_only loads
        accelerate_load(good / name, weights_only=True)
    pipe = DiffXAttnPipeline.from_pretrained(export_checkpoint(good, tmp_path / "exported"))
    assert torch.isfinite(torch.cat([p.flatten() for p in pipe.unet.parameters()])).all()


class FakeAccelerator:
    is_main_process = True

    def __init__(self, crash: bool = False):
        self.crash = crash

    def wait_for_everyone(self):
        pass

    def save_state(self, folder, safe_serialization=True):
        Path(folder).mkdir(parents=True, exist_ok=True)
        (Path(folder) / "model.safetensors").write_bytes(b"weights")
        if self.crash:
            raise KeyboardInterrupt  # killed half-way through the save


def test_a_killed_save_never_replaces_the_last_good_checkpoint(tmp_path):
    ckpt.save_checkpoint(FakeAccelerator(), tmp_path, 2, lambda d: None)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save_checkpoint(FakeAccelerator(crash=True), tmp_path, 4, lambda d: None)
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-2"
    ckpt.remove_stale(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-2"]
    ckpt.save_checkpoint(FakeAccelerator(), tmp_path, 4, lambda d: None, total_limit=3)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [2, 4]  # under the limit: nothing pruned
    for step in (6, 8):
        ckpt.save_checkpoint(FakeAccelerator(), tmp_path, step, lambda d: None, total_limit=2)
    assert [s for s, _ in ckpt.complete_checkpoints(tmp_path)] == [6, 8]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint-6", "checkpoint-8"]
    # killed after the marker, before the rename: complete, so the next start finishes the rename
    (tmp_path / "checkpoint-8").rename(tmp_path / ".tmp-checkpoint-8")
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-6"
    ckpt.remove_stale(tmp_path)
    assert ckpt.latest_checkpoint(tmp_path).name == "checkpoint-8"


def launch_2_cpu(out, *args) -> subprocess.CompletedProcess:
    accelerate = Path(sys.executable).parent / "accelerate"
    cmd = [str(accelerate), "launch", *LAUNCH_2_CPU, "-m", "diffxattn.train", TINY, f"train.output_dir={out}",
           *QUIET, "train.max_steps=4", "train.checkpoint_every=2", "logging.validate_every=4", *args]
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def test_two_cpu_processes_train_and_write_each_checkpoint_once(tmp_path):
    proc = launch_2_cpu(tmp_path)
    for rank in (0, 1):  # both ranks trained their own share of each optimizer step
        assert f"[rank {rank}/2] trained 4 batches (32 images) to step 4" in proc.stdout
    assert names(tmp_path) == ["checkpoint-2", "checkpoint-4"]
    for step in (2, 4):
        files = {p.name for p in (tmp_path / "checkpoints" / f"checkpoint-{step}").iterdir()}
        assert {"random_states_0.pkl", "random_states_1.pkl", "model.safetensors", ckpt.EMA} <= files
    assert lr_log(tmp_path) == pytest.approx(reference_lrs(4, 4), rel=1e-12)  # one line per step, rank 0 only
    assert [p.name for p in (tmp_path / "validation").iterdir()] == ["step-4.png"]
    assert isinstance(DiffXAttnPipeline.from_pretrained(tmp_path / "pipeline").unet, XAttnUNet)


@pytest.mark.slow
def test_two_cpu_processes_resume_exactly(tmp_path):
    a, b = tmp_path / "one-go", tmp_path / "resumed"
    launch_2_cpu(a)
    launch_2_cpu(b, "train.stop_at_step=2")
    proc = launch_2_cpu(b, "--resume", "latest")
    assert "[rank 1/2] trained 2 batches (16 images) to step 4" in proc.stdout
    for name in ("model.safetensors", "model_1.safetensors", ckpt.EMA):
        wa, wb = (load_file(p / "checkpoints" / "checkpoint-4" / name) for p in (a, b))
        assert max_diff(wa, wb) < 1e-6, name


def test_diffusers_unet_trains_and_exports_a_loadable_pipeline(tmp_path):
    assert train(tmp_path, "model.kind=diffusers", "train.max_steps=2", "train.checkpoint_every=2",
                 "logging.validate_every=2") == 0
    pipe = DiffXAttnPipeline.from_pretrained(tmp_path / "pipeline")
    assert isinstance(pipe.unet, UNet2DConditionModel)
    folder = tmp_path / "checkpoints" / "checkpoint-2"
    assert T.main(["export", str(folder), "-o", str(tmp_path / "again")]) == 0
    again = DiffXAttnPipeline.from_pretrained(tmp_path / "again")
    assert max_diff(pipe.unet.state_dict(), again.unet.state_dict()) == 0
    image = again("a red circle", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
    assert image.size == (16, 16)


def test_model_pretrained_starts_from_a_saved_unet_and_refuses_another_architecture(runs, tmp_path):
    from diffxattn.build import build_models

    saved = runs[0] / "pipeline"
    cfg = load_config(TINY, [f"model.pretrained={saved}", f"text.pretrained={saved}"])
    unet = build_models(cfg, None)[2]
    assert max_diff(unet.state_dict(), DiffXAttnPipeline.from_pretrained(saved).unet.state_dict()) == 0
    assert max_diff(unet.state_dict(), build_models(load_config(TINY, [f"text.pretrained={saved}"]), None)[2]
                    .state_dict()) > 0  # without it: a fresh UNet
    wider = load_config(TINY, [f"model.pretrained={saved}", f"text.pretrained={saved}",
                               "model.block_out_channels=[16, 48]"])
    with pytest.raises(ConfigError, match=r"is a different architecture than the config's model: .*shapes"):
        build_models(wider, None)
    with pytest.raises(ConfigError, match=r"model.pretrained='.*nowhere': no UNet there"):
        build_models(load_config(TINY, [f"model.pretrained={tmp_path / 'nowhere'}", f"text.pretrained={saved}"]), None)
    # the trainer fine-tunes from it and says why it cannot
    assert train(tmp_path / "ft", f"model.pretrained={saved}", f"text.pretrained={saved}", "text.train=false",
                 "train.max_steps=1", "logging.validate_every=100") == 0
    assert train(tmp_path / "bad", f"model.pretrained={tmp_path / 'nowhere'}") == 2


def test_diffxattn_train_is_the_same_trainer(runs, tmp_path):
    """`diffxattn train CONFIG [overrides]` trains exactly as `accelerate launch -m diffxattn.train` does."""
    from diffxattn.cli import main

    out = tmp_path / "cli"
    assert main(["train", TINY, f"train.output_dir={out}", *QUIET, *RESUME_ARGS]) == 0
    weights = "pipeline/unet/diffusion_pytorch_model.safetensors"
    assert max_diff(load_file(runs[0] / weights), load_file(out / weights)) == 0
    assert main(["train", TINY, f"train.output_dir={out}", "--resme", "latest"]) == 2  # a typo is no override


def test_one_override_parser_reads_every_spelling():
    from diffxattn.config import overrides_from_argv

    argv = ["--train.lr", "3e-4", "data.size=16", "--resume", "latest", "--logging.log_every=2", "--train.seed", "-1"]
    args = T.parse_args([TINY, *argv])
    assert args.config == TINY and args.resume == "latest"
    expected = ["train.lr=3e-4", "data.size=16", "logging.log_every=2", "train.seed=-1"]
    assert args.overrides == expected == overrides_from_argv([a for a in argv if a not in ("--resume", "latest")])
    with pytest.raises(SystemExit):
        T.parse_args([TINY, "--resme", "latest"])


def test_trainer_gives_torch_every_usable_core_split_among_local_processes(monkeypatch):
    """`accelerate launch` exports OMP_NUM_THREADS=1 unless told otherwise: the trainer sets the threads itself."""
    acc = T.make_accelerator(load_config(TINY))
    monkeypatch.setattr(T, "usable_cores", lambda: 4)
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    before = torch.get_num_threads()
    try:
        assert T.set_cpu_threads(load_config(TINY), acc) == 4 and torch.get_num_threads() == 4
        monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")  # two processes on this machine share its cores
        assert T.set_cpu_threads(load_config(TINY), acc) == 2 and torch.get_num_threads() == 2
        assert T.set_cpu_threads(load_config(TINY, ["train.cpu_threads=1"]), acc) == 1
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
    with pytest.raises(ConfigError, match=r"train.cpu_threads=0 must be > 0"):
        load_config(TINY, ["train.cpu_threads=0"])


def test_metrics_log_the_wall_clock(tmp_path):
    assert train(tmp_path, "train.max_steps=3") == 0
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    walls = [r["wall_s"] for r in rows]
    assert [r["step"] for r in rows] == [1, 2, 3] and 0 < walls[0] < walls[1] < walls[2]


@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
def test_min_snr_weights_cap_at_gamma_and_a_gamma_past_float32_caps_nothing(prediction):
    from diffusers import DDPMScheduler
    from diffusers.training_utils import compute_snr

    sched = DDPMScheduler(prediction_type=prediction)
    t = torch.tensor([0, 100, 500, 999])
    snr = compute_snr(sched, t)
    denominator = snr + 1 if prediction == "v_prediction" else snr
    torch.testing.assert_close(T.snr_loss_weight(sched, t, 5.0), snr.clamp(max=5.0) / denominator)
    assert snr[0] > 5 > snr[-1]  # the cap acts on the low-noise steps only
    # a finite Python float beyond float32's range (the fuzzer found 3.4028234663852886e+38 * (1 + 2**-52)): no cap
    torch.testing.assert_close(T.snr_loss_weight(sched, t, 3.402823466385289e38), snr / denominator)
