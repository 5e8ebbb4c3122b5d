"""Train a text-to-image UNet (and its small CLIP text encoder) with accelerate.

    accelerate launch -m diffxattn.train configs/shapes-32.yaml [section.key=value ...] [--resume latest|PATH]
    diffxattn train configs/tiny.yaml train.max_steps=20                  # one process (or python -m diffxattn.train)
    python -m diffxattn.train export runs/tiny/checkpoints/checkpoint-6 -o pipelines/tiny

Two processes on CPU (`accelerate launch --cpu --num_processes 2` starts only one, accelerate issue #2741):
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        --mixed_precision no --dynamo_backend no -m diffxattn.train configs/tiny.yaml

Resume is exact: every random draw of the loop (noise, timesteps, caption dropout) comes from a generator
keyed on (seed, micro-step, rank), the data order depends only on (seed, epoch), and a checkpoint stores the
data position, so N steps + `--resume latest` + N steps give the weights of 2N steps in one go.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
import yaml
from accelerate import Accelerator
from accelerate.utils import GradientAccumulationPlugin, broadcast_object_list, set_seed
from diffusers import DDPMScheduler
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel, compute_snr
from tqdm.auto import tqdm
from transformers import CLIPTokenizer

from . import atomic, errors, runlock
from . import checkpoint as ckpt
from .build import build_dataset, build_models, learn_tokenizer, make_pipeline
from .config import ConfigError, ExperimentConfig, OptimConfig, load_config, overrides_from_argv, to_dict
from .images import labelled_grid
from .models import text as text_mod
from .pipeline import DiffXAttnPipeline

_NOISE, _DROPOUT = 1, 2  # stream ids of the keyed generators


class NonFiniteLoss(RuntimeError):
    """The loss became NaN/inf; training stops without saving."""


class DataError(errors.UserError):
    """The training data cannot be read or is too small; the message names the data."""


@contextlib.contextmanager
def data_errors():
    """Whatever reading the user's data raises is the data's fault: ValueError/OSError already name the file or
    setting; anything else (a dataset library's own error) becomes a DataError."""
    try:
        yield
    except errors.USER_ERRORS:
        raise
    except Exception as e:
        raise DataError(f"reading the training data failed: {type(e).__name__}: {e}") from e


def keyed_generator(*key: int) -> torch.Generator:
    """A torch generator that depends only on `key`: nothing to checkpoint, the same after a resume."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence(list(key)).generate_state(1)[0]))


def drop_captions(texts: list[str], p: float, *key: int) -> list[str]:
    """Replace each caption by "" with probability p (for classifier-free guidance), deterministic per key."""
    drop = np.random.default_rng([_DROPOUT, *key]).random(len(texts)) < p
    return ["" if d else t for t, d in zip(texts, drop)]


class EpochSampler(torch.utils.data.Sampler):
    """A permutation of range(n) that depends only on (seed, epoch), so a data position is (epoch, batch)."""

    def __init__(self, n: int, seed: int):
        self.n, self.seed, self.epoch = n, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __iter__(self):
        return iter(torch.randperm(self.n, generator=keyed_generator(self.seed, self.epoch)).tolist())

    def __len__(self) -> int:
        return self.n


def make_lr_scheduler(optimizer: torch.optim.Optimizer, cfg: OptimConfig, max_steps: int):
    """Warm-up then cosine/constant, one `step()` per optimizer step.

    The trainer's Accelerator has step_scheduler_with_optimizer=False, so the prepared scheduler steps once
    per call, not num_processes times: the LR at optimizer step k is the same on any number of processes.
    """
    name = "cosine" if cfg.lr_schedule == "cosine" else "constant_with_warmup"
    return get_scheduler(name, optimizer, num_warmup_steps=cfg.warmup_steps, num_training_steps=max_steps)


def snr_loss_weight(noise_scheduler: DDPMScheduler, t: torch.Tensor, gamma: float) -> torch.Tensor:
    """Min-SNR-gamma weights (Hang et al. 2023): min(snr, g)/snr for epsilon, min(snr, g)/(snr + 1) for v."""
    snr = compute_snr(noise_scheduler, t)
    v = noise_scheduler.config.prediction_type == "v_prediction"
    cap = min(gamma, torch.finfo(snr.dtype).max)  # a gamma beyond the dtype's range caps nothing (and cannot be cast)
    return snr.clamp(max=cap) / (snr + 1 if v else snr)


@dataclass
class TrainState:
    """Everything the loop's functions share: the models, optimizer and data of a training run, and its position."""
    cfg: ExperimentConfig
    accelerator: Accelerator
    unet: torch.nn.Module  # prepared (maybe DDP-wrapped)
    text_encoder: torch.nn.Module  # prepared when trained, else frozen
    tokenizer: CLIPTokenizer
    trained: list  # the unwrapped trained modules: [UNet] or [UNet, text encoder]
    optimizer: torch.optim.Optimizer
    lr_scheduler: object
    dataloader: object
    sampler: EpochSampler
    noise_scheduler: DDPMScheduler
    ema: EMAModel | None
    out: Path
    step: int = 0  # optimizer steps done
    epoch: int = 0  # data position: the epoch, and how many of its batches this process consumed
    batch_in_epoch: int = 0
    batches_seen: int = 0  # by this process in this invocation
    started: float = dataclasses.field(default_factory=time.perf_counter)  # this invocation's start (wall clock)

    @property
    def params(self) -> list[torch.nn.Parameter]:
        return list(ckpt.named_trained_params(self.trained).values())


def run_tokenizer(cfg: ExperimentConfig, accelerator: Accelerator, dataset, resume: Path | None):
    """The run's vocabulary: learned from the captions once (main process) and kept in the run folder."""
    if cfg.text.pretrained:
        return None
    folder = Path(cfg.train.output_dir) / ckpt.TOKENIZER
    with accelerator.main_process_first():
        if resume is not None:
            with ckpt.reading(resume):
                return CLIPTokenizer.from_pretrained(str(resume / ckpt.TOKENIZER))
        if accelerator.is_main_process:
            return learn_tokenizer(cfg, folder, dataset)
        return CLIPTokenizer.from_pretrained(str(folder))


def make_accelerator(cfg: ExperimentConfig) -> Accelerator:
    t = cfg.train
    return Accelerator(  # accumulation counted in micro-batches only, never cut at an epoch's end
        gradient_accumulation_plugin=GradientAccumulationPlugin(num_steps=t.gradient_accumulation_steps,
                                                                sync_with_dataloader=False),
        mixed_precision=t.mixed_precision, log_with="tensorboard" if cfg.logging.tensorboard else None,
        project_dir=t.output_dir, step_scheduler_with_optimizer=False)


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity mask, e.g. a container's share), else the machine's."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def set_cpu_threads(cfg: ExperimentConfig, accelerator: Accelerator) -> int | None:
    """On CPU, give torch `train.cpu_threads` threads, by default every usable core split among the processes on
    this machine. `accelerate launch` without `--num_cpu_threads_per_process` exports OMP_NUM_THREADS=1, which
    ran the shapes-32 training at 28 instead of 52 images/s on 2 cores. Returns the thread count (None on GPU)."""
    if accelerator.device.type != "cpu":
        return None
    local = int(os.environ.get("LOCAL_WORLD_SIZE", accelerator.num_processes))
    threads = cfg.train.cpu_threads or max(1, usable_cores() // max(local, 1))
    torch.set_num_threads(threads)
    return threads


def setup(cfg: ExperimentConfig, accelerator: Accelerator, resume: Path | None) -> TrainState:
    t, o, s = cfg.train, cfg.optim, cfg.scheduler
    set_seed(t.seed)
    dataset = load_dataset(cfg, accelerator.num_processes)
    tokenizer, text_encoder, unet = build_models(cfg, run_tokenizer(cfg, accelerator, dataset, resume))
    trained = [unet] + ([text_encoder] if cfg.text.train else [])
    params = list(ckpt.named_trained_params(trained).values())
    optimizer = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    sampler = EpochSampler(len(dataset), cfg.data.seed + t.seed)
    dataloader = torch.utils.data.DataLoader(dataset, t.batch_size, sampler=sampler, drop_last=True,
                                             num_workers=cfg.data.num_workers, collate_fn=_collate)
    *models, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        *trained, optimizer, dataloader, make_lr_scheduler(optimizer, o, t.max_steps))
    noise_scheduler = DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_schedule=s.beta_schedule,
                                    prediction_type=s.prediction_type)
    ema = EMAModel(params, decay=t.ema_decay) if t.ema else None
    text_model = models[1] if cfg.text.train else text_encoder.to(accelerator.device)
    return TrainState(cfg, accelerator, models[0], text_model, tokenizer, trained, optimizer, lr_scheduler,
               dataloader, sampler, noise_scheduler, ema, Path(t.output_dir))


def load_dataset(cfg: ExperimentConfig, processes: int):
    """The config's training data, holding at least one batch for every process (drop_last=True: with fewer
    items an epoch has no batch, and the loop would wait for one forever)."""
    with data_errors():
        dataset = build_dataset(cfg.data)
    need = cfg.train.batch_size * processes
    if len(dataset) < need:
        per = f" x {processes} processes = {need}" if processes > 1 else ""
        raise DataError(f"the training data ({cfg.data.kind}) has {len(dataset)} items, fewer than one batch "
                        f"(train.batch_size={cfg.train.batch_size}{per}); lower train.batch_size or add data")
    return dataset


def _collate(items: list[dict]) -> dict:
    # only what the loss reads: the shapes scenes' masks etc. stay out of the device transfer
    return {"pixel_values": torch.stack([i["pixel_values"] for i in items]),
            "text": [i["text"] for i in items]}


def batch_stream(run: TrainState):
    """Batches forever from the run's data position, advancing it."""
    while True:
        run.dataloader.set_epoch(run.epoch)
        run.sampler.set_epoch(run.epoch)
        skip = run.batch_in_epoch
        with data_errors():
            for batch in run.accelerator.skip_first_batches(run.dataloader, skip) if skip else run.dataloader:
                run.batch_in_epoch += 1
                run.batches_seen += 1
                yield batch
        if skip == 0 and run.batch_in_epoch == 0:  # load_dataset rules this out; never loop without data
            raise DataError(f"an epoch of the training data gave no batch of {run.cfg.train.batch_size}")
        run.epoch, run.batch_in_epoch = run.epoch + 1, 0


def loss_fn(run: TrainState, batch: dict, micro: int) -> torch.Tensor:
    """Diffusion loss of one micro-batch; `micro` (the global micro-step) keys noise and caption dropout."""
    cfg, acc = run.cfg, run.accelerator
    x0 = batch["pixel_values"]  # (B, C, H, W) in [-1, 1]
    key = (cfg.train.seed, micro, acc.process_index)
    gen = keyed_generator(_NOISE, *key)
    noise = torch.randn(x0.shape, generator=gen).to(x0)
    t = torch.randint(0, cfg.scheduler.num_train_timesteps, (x0.shape[0],), generator=gen).to(x0.device)
    texts = drop_captions(batch["text"], cfg.train.caption_dropout, *key)
    ids, mask = text_mod.tokenize(run.tokenizer, texts)
    with torch.set_grad_enabled(cfg.text.train):
        emb = run.text_encoder(ids.to(acc.device))[0]  # (B, S, D)
    x_t = run.noise_scheduler.add_noise(x0, noise, t)
    v = cfg.scheduler.prediction_type == "v_prediction"
    target = run.noise_scheduler.get_velocity(x0, noise, t) if v else noise
    pred = run.unet(x_t, t, encoder_hidden_states=emb, encoder_attention_mask=mask.to(acc.device)).sample
    loss = F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3))  # (B,)
    if cfg.train.snr_gamma is not None:
        loss = loss * snr_loss_weight(run.noise_scheduler, t, cfg.train.snr_gamma)
    if cfg.train.debug_nan_at_step == run.step + 1:
        loss = loss * float("nan")
    return loss.mean()


def train_step(run: TrainState, batches: list[dict]) -> float:
    """One optimizer step over the accumulated micro-batches; returns the loss (mean over ranks)."""
    acc, g = run.accelerator, len(batches)
    total = torch.zeros((), device=acc.device)
    for j, batch in enumerate(batches):
        with acc.accumulate(*run.trained):
            loss = loss_fn(run, batch, run.step * g + j)
            acc.backward(loss)  # divides by g
        total += loss.detach()
    loss = acc.reduce(total / g, reduction="mean")
    if not torch.isfinite(loss):  # every rank sees the reduced loss, so all stop here, before the update
        last = ckpt.latest_checkpoint(run.out / "checkpoints")
        raise NonFiniteLoss(f"non-finite loss ({loss.item()}) at step {run.step + 1}; stopped without "
                            f"saving. Last checkpoint: {last}")
    if run.cfg.optim.max_grad_norm > 0:
        acc.clip_grad_norm_(run.params, run.cfg.optim.max_grad_norm)
    run.optimizer.step()
    if not run.optimizer.step_was_skipped:  # fp16 overflow: the LR schedule waits too
        run.lr_scheduler.step()
    run.optimizer.zero_grad(set_to_none=True)
    if run.ema is not None:
        run.ema.step(run.params)
    run.step += 1
    return loss.item()


@contextlib.contextmanager
def ema_weights(run: TrainState):
    """The EMA weights in eval mode inside; the training weights (bit-exact) and train mode after."""
    if run.ema is not None:
        run.ema.store(run.params)
        run.ema.copy_to(run.params)
    for m in run.trained:
        m.eval()
    try:
        with torch.random.fork_rng(devices=[]):
            yield
    finally:
        for m in run.trained:
            m.train()
        if run.ema is not None:
            run.ema.restore(run.params)


def _run_pipeline(run: TrainState) -> DiffXAttnPipeline:
    unwrap = run.accelerator.unwrap_model
    return make_pipeline(run.cfg, unwrap(run.unet), unwrap(run.text_encoder), run.tokenizer)


def validate(run: TrainState) -> None:
    """Sample the validation prompts with EMA weights (fixed seeds); save a labelled grid and log it."""
    log = run.cfg.logging
    if run.accelerator.is_main_process:
        prompts = list(log.validation_prompts)
        gens = [torch.Generator().manual_seed(log.validation_seed + k) for k in range(len(prompts))]
        with ema_weights(run):
            grid = labelled_grid(list(zip(prompts, _run_pipeline(run)(prompts, generator=gens).images)), len(prompts))
        atomic.save_image(grid, run.out / "validation" / f"step-{run.step}.png")
        if log.tensorboard:
            writer = run.accelerator.get_tracker("tensorboard", unwrap=True)
            writer.add_image("validation", np.asarray(grid), run.step, dataformats="HWC")
    run.accelerator.wait_for_everyone()


def save(run: TrainState) -> Path:
    """A checkpoint: accelerate's states + data position, EMA (safetensors), config and tokenizer."""
    state = {"step": run.step, "epoch": run.epoch, "batch_in_epoch": run.batch_in_epoch,
             "num_processes": run.accelerator.num_processes}
    ema = None
    if run.ema is not None:
        state["ema"] = {k: v for k, v in run.ema.state_dict().items() if k != "shadow_params"}
        ema = dict(zip(ckpt.named_trained_params(run.trained), run.ema.shadow_params))
    tokenizer = None if run.cfg.text.pretrained else run.tokenizer
    config = yaml.safe_dump(to_dict(run.cfg), sort_keys=False)
    def write(folder: Path) -> None:
        ckpt.write_trainer_files(folder, state, config, tokenizer, ema)

    return ckpt.save_checkpoint(run.accelerator, run.out / "checkpoints", run.step, write,
                                run.cfg.train.checkpoints_total_limit)


def load(run: TrainState, folder: Path) -> None:
    """Restore a checkpoint: accelerate's states (weights_only loads), then position and EMA."""
    with ckpt.reading(folder):
        _load(run, folder)


def _load(run: TrainState, folder: Path) -> None:
    run.accelerator.load_state(str(folder))
    state = ckpt.read_state(folder)
    run.step, run.epoch, run.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
    if state["num_processes"] != run.accelerator.num_processes:
        run.accelerator.print(f"warning: checkpoint written by {state['num_processes']} processes, resumed "
                              f"with {run.accelerator.num_processes}: the data order differs from one run")
    if run.ema is not None:
        shadow = ckpt.read_ema(folder, str(run.accelerator.device))
        params = [shadow[n] for n in ckpt.named_trained_params(run.trained)]
        run.ema.load_state_dict({**state["ema"], "shadow_params": params})


def export_pipeline(run: TrainState, out: Path) -> None:
    """Save the pipeline with EMA weights to `out`, the run's own folder (replaced once the new one is complete)."""
    if run.accelerator.is_main_process:
        with ema_weights(run):
            ckpt.save_pipeline(_run_pipeline(run), out, overwrite=True)
    run.accelerator.wait_for_everyone()


def train(cfg: ExperimentConfig, resume: str | None = None) -> int:
    acc = make_accelerator(cfg)
    lock = lock_output(acc, Path(cfg.train.output_dir))
    try:
        return run_training(cfg, acc, resume)
    finally:
        if lock is not None:
            runlock.release(lock)


def lock_output(acc: Accelerator, out: Path) -> Path | None:
    """The main process takes output_dir/run.lock before anything reads or cleans the folder; if another run
    holds it, every process stops with its message. Returns the lock (main process) or None."""
    lock = refusal = None
    if acc.is_main_process:
        out.mkdir(parents=True, exist_ok=True)
        try:
            lock = runlock.acquire(out)
        except runlock.RunLockedError as e:
            refusal = str(e)
    if acc.num_processes > 1:
        refusal = broadcast_object_list([refusal])[0]
    if refusal:
        raise runlock.RunLockedError(refusal)
    return lock


def resume_folder(cfg: ExperimentConfig, resume: str | None) -> Path | None:
    """The checkpoint to start from (None: a new run). Refuses what would mix two runs in one folder, write over
    a checkpoint-N folder that is not a finished save, or replace an output_dir/pipeline the project did not write."""
    t = cfg.train
    root = Path(t.output_dir) / "checkpoints"
    partial = ", ".join(p.name for _, p in ckpt.incomplete_checkpoints(root))
    if resume is None:
        if ckpt.complete_checkpoints(root):
            raise ConfigError(f"{root} already has checkpoints; pass --resume latest to continue, "
                              "or choose another train.output_dir")
        folder = None
    elif resume == "latest":
        folder = ckpt.latest_checkpoint(root)
        if folder is None:
            found = f" ({partial}: no {ckpt.MARKER} marker)" if partial else ""
            raise ConfigError(f"--resume latest: {root} has no complete checkpoint{found}; leave out --resume to "
                              "start a new run")
    else:
        folder = Path(resume)
        if not ckpt.is_complete(folder):
            raise ConfigError(f"--resume {resume}: not a complete checkpoint (no {ckpt.MARKER} marker)")
    # the run replaces its own pipeline folder at the end: anything else there is refused now, not hours later
    ckpt.check_replaceable(Path(t.output_dir) / "pipeline")
    with ckpt.reading(folder):
        start = ckpt.read_state(folder)["step"] if folder else 0
    stop = min(t.max_steps, t.stop_at_step or t.max_steps)
    for step, path in ckpt.incomplete_checkpoints(root):
        if start < step <= stop and (step % t.checkpoint_every == 0 or step == stop):
            raise ConfigError(f"{path} is not a finished checkpoint (no {ckpt.MARKER} marker) and this run would "
                              f"save step {step} in its place; move it out of {root}")
    return folder


def run_training(cfg: ExperimentConfig, acc: Accelerator, resume: str | None) -> int:
    t, out = cfg.train, Path(cfg.train.output_dir)
    if acc.is_main_process:  # clean up after killed saves before anyone picks a checkpoint
        ckpt.remove_stale(out / "checkpoints")
    acc.wait_for_everyone()
    folder = resume_folder(cfg, resume)
    threads = set_cpu_threads(cfg, acc)
    run = setup(cfg, acc, folder)
    if folder is not None:
        load(run, folder)
    acc.print((f"resumed from {folder} at step {run.step}" if folder else f"new run in {out}")
              + (f" ({threads} CPU threads per process)" if threads else ""))
    if cfg.logging.tensorboard:
        acc.init_trackers("tensorboard")  # the config is in every checkpoint (config.yaml)
    stop = min(t.max_steps, t.stop_at_step or t.max_steps)
    bar = tqdm(total=t.max_steps, initial=run.step, desc="train", unit="step",
               disable=not acc.is_main_process)
    stream, saved = batch_stream(run), run.step
    try:
        while run.step < stop:
            loop_step(run, stream, bar)
            if run.step % cfg.logging.validate_every == 0:
                validate(run)
            if run.step % t.checkpoint_every == 0 or run.step == stop:
                save(run)
                saved = run.step
        if saved != run.step:  # nothing trained (resumed at the end): still leave a checkpoint here
            save(run)
        export_pipeline(run, out / "pipeline")
    finally:
        bar.close()
        acc.end_training()  # also ends the process group: nothing collective after this
    print(f"[rank {acc.process_index}/{acc.num_processes}] trained {run.batches_seen} batches "
          f"({run.batches_seen * t.batch_size} images) to step {run.step}", flush=True)
    acc.print(f"pipeline saved to {out / 'pipeline'}")
    return 0


def loop_step(run: TrainState, stream, bar: tqdm) -> None:
    """One optimizer step of the loop: data, update, progress bar, scalars (validation/checkpoints aside)."""
    t = run.cfg.train
    start = time.perf_counter()
    loss = train_step(run, [next(stream) for _ in range(t.gradient_accumulation_steps)])
    images = t.batch_size * run.accelerator.num_processes * t.gradient_accumulation_steps
    ips = images / (time.perf_counter() - start)
    bar.update(1)
    bar.set_postfix(loss=f"{loss:.4f}", img_s=f"{ips:.1f}")
    if run.step % run.cfg.logging.log_every == 0:
        log_metrics(run, {"loss": loss, "lr": run.lr_scheduler.get_last_lr()[0], "images_per_s": ips,
                          "wall_s": time.perf_counter() - run.started})


def log_metrics(run: TrainState, scalars: dict) -> None:
    """TensorBoard (if enabled) and output_dir/metrics.jsonl (main process)."""
    run.accelerator.log(scalars, step=run.step)
    if run.accelerator.is_main_process:
        with open(run.out / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": run.step, **scalars}) + "\n")


def parse_args(argv: list[str]) -> argparse.Namespace:
    """`CONFIG [OVERRIDES] [--resume X]` or `export CHECKPOINT -o OUT`; overrides (`--a.b 1`, `a.b=1`) are read
    by `config.overrides_from_argv`, as `diffxattn build` and `diffxattn train` read them."""
    p = errors.OneLineParser(prog="accelerate launch -m diffxattn.train", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show tracebacks")
    if argv[:1] == ["export"]:
        p.add_argument("command", choices=["export"])
        p.add_argument("checkpoint", help="a checkpoint-N folder")
        p.add_argument("-o", "--out", required=True, help="pipeline folder to write")
        p.add_argument("--overwrite", action="store_true",
                       help="replace OUT even if it holds other files than a pipeline diffxattn wrote")
        return p.parse_args(argv)
    p.add_argument("config", help="YAML experiment file")
    p.add_argument("--resume", help="'latest' (the newest complete checkpoint) or a checkpoint folder")
    args, extra = p.parse_known_args(argv)
    try:
        args.overrides = overrides_from_argv(extra)
    except ConfigError as e:
        p.error(str(e))
    return args


def main(argv: list[str] | None = None) -> int:
    """Exit code 0; 2 with one line for a user error (config, data, checkpoint, disk); 1 for a NaN loss."""
    args = parse_args(list(sys.argv[1:] if argv is None else argv))
    return errors.run("diffxattn.train", lambda: command(args), args.debug, failures=(NonFiniteLoss,))


def command(args: argparse.Namespace) -> int:
    if getattr(args, "command", None) == "export":
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        diffusers_logging.disable_progress_bar()  # a one-shot command: its result is one line
        transformers_logging.disable_progress_bar()
        print(f"pipeline saved to {ckpt.export_checkpoint(args.checkpoint, args.out, args.overwrite)}")
        return 0
    return train(load_config(args.config, args.overrides), args.resume)


if __name__ == "__main__":
    sys.exit(main())
