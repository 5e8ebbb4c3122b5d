"""Trainer overhead: images/s of diffxattn.train's loop vs a bare PyTorch loop, same work, one process; and of
the README's train command (`accelerate launch -m diffxattn.train configs/shapes-32.yaml`) vs that bare loop.

    python bench/bench_trainer.py [--quick] [--out bench/results] [--threads 2]

Both sides train the shapes-32 model (UNet + jointly trained text encoder) on the same data, batch size,
AdamW settings and noise / v-prediction / min-SNR loss. The trainer's step is `train.loop_step` (accelerate,
keyed generators, caption dropout, gradient clipping, EMA, loss reduction, progress bar, TensorBoard scalars);
validation and checkpoints are off. The bare step: next batch, tokenize, forward, backward, AdamW. Steps are
interleaved (trainer, bare, bare, trainer, ...) after a warm-up, so load from other processes hits both
alike. overhead = trainer seconds per step / bare seconds per step - 1 (medians).

The README command runs as a subprocess with a clean environment (no OMP_NUM_THREADS: what a user's shell
has), its steps' images/s read from its metrics.jsonl (median after the warm-up); the bare loop runs in this
process with `--threads` threads (default: all cores of this machine) just before and after it.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import common  # noqa: E402

NAME = "trainer"


def settings(quick: bool) -> dict:
    """Quick (< 1 min): batch 16, few repeats, a tokenizer from fewer captions (the same model size).
    The trainer's fixed costs per step (EMA, clipping, ...) weigh more at batch 16 than at the config's 64."""
    if quick:
        return dict(warmup=1, repeats=4, batch=16, vocab_captions=2000)
    return dict(warmup=3, repeats=20, batch=64, vocab_captions=20000)


def trainer_step(out: str, s: dict):
    """The real trainer set up on shapes-32 (no validation, no checkpoints); returns (step fn, run)."""
    from tqdm.auto import tqdm

    from diffxattn import train as T
    from diffxattn.config import load_config

    cfg = load_config(common.CONFIG, [f"train.output_dir={out}", f"text.vocab_captions={s['vocab_captions']}",
                                      f"train.batch_size={s['batch']}", "logging.validate_every=1000000",
                                      "train.checkpoint_every=1000000"])
    acc = T.make_accelerator(cfg)
    run = T.setup(cfg, acc, None)
    if cfg.logging.tensorboard:
        acc.init_trackers("tensorboard")
    stream = T.batch_stream(run)
    bar = tqdm(total=cfg.train.max_steps, desc="train", unit="step", file=open(os.devnull, "w"))
    return (lambda: T.loop_step(run, stream, bar)), run


def bare_step(run):
    """A plain loop over the same model architecture, data, optimizer and loss: nothing else."""
    import torch
    import torch.nn.functional as F
    from diffusers import DDPMScheduler

    from diffxattn import train as T
    from diffxattn.build import build_dataset
    from diffxattn.models import text as text_mod

    cfg = run.cfg
    torch.manual_seed(cfg.train.seed)
    tokenizer, text_encoder, unet = T.build_models(cfg, run.tokenizer)
    params = list(unet.parameters()) + list(text_encoder.parameters())
    o = cfg.optim
    opt = torch.optim.AdamW(params, lr=o.lr, betas=o.betas, weight_decay=o.weight_decay)
    s = cfg.scheduler
    noise_scheduler = DDPMScheduler(num_train_timesteps=s.num_train_timesteps, beta_schedule=s.beta_schedule,
                                    prediction_type=s.prediction_type)
    loader = torch.utils.data.DataLoader(build_dataset(cfg.data), cfg.train.batch_size, shuffle=True,
                                         drop_last=True, collate_fn=T._collate)
    batches = iter(loader)

    def step():
        batch = next(batches)
        x0 = batch["pixel_values"]
        noise = torch.randn_like(x0)
        t = torch.randint(0, s.num_train_timesteps, (x0.shape[0],))
        ids, mask = text_mod.tokenize(tokenizer, batch["text"])
        emb = text_encoder(ids)[0]
        x_t = noise_scheduler.add_noise(x0, noise, t)
        pred = unet(x_t, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample
        target = noise_scheduler.get_velocity(x0, noise, t)
        loss = F.mse_loss(pred, target, reduction="none").mean(dim=(1, 2, 3))
        (loss * T.snr_loss_weight(noise_scheduler, t, cfg.train.snr_gamma)).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def readme_command(out: str, s: dict) -> list[float]:
    """images/s of each step after the warm-up of the README's train command, as a user launches it."""
    steps = s["warmup"] + s["repeats"]
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    # `accelerate launch`, run by this interpreter (its console script may not be on PATH)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-m", "diffxattn.train", str(common.CONFIG), f"train.output_dir={out}",
           f"train.max_steps={steps}", f"train.batch_size={s['batch']}", f"text.vocab_captions={s['vocab_captions']}",
           "logging.validate_every=1000000", "train.checkpoint_every=1000000", "logging.log_every=1"]
    subprocess.run(cmd, env=env, cwd=common.ROOT, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    rows = [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]
    return [r["images_per_s"] for r in rows[s["warmup"]:]]


def bare_images_per_s(step, batch: int, repeats: int) -> list[float]:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        rates.append(batch / (time.perf_counter() - start))
    return rates


def main(argv=None) -> dict:
    args = common.parse_args(__doc__.split("\n")[0], argv)
    common.setup(args.threads)
    s = settings(args.quick)
    with tempfile.TemporaryDirectory(prefix="diffxattn-bench-trainer-") as out:
        trainer, run = trainer_step(out, s)
        fns = {"trainer": trainer, "bare": bare_step(run)}
        times = common.interleaved(fns, warmup=s["warmup"], repeats=s["repeats"])
        run.accelerator.end_training()
        # README command vs the bare loop with every core, the bare loop just before and after it
        bare = bare_images_per_s(fns["bare"], s["batch"], s["repeats"] // 2)
        launched = readme_command(str(Path(out) / "launch"), s)
        bare += bare_images_per_s(fns["bare"], s["batch"], s["repeats"] - s["repeats"] // 2)
    launch_ips, bare_all_ips = statistics.median(launched), statistics.median(bare)
    batch = run.cfg.train.batch_size
    row = common.comparison("train step", "trainer", "bare", times["trainer"], times["bare"], "s/image",
                            per=batch)
    trainer_ips, bare_ips = 1 / row["ours_value"], 1 / row["other_value"]
    overhead = row["ours_value"] / row["other_value"] - 1
    data = {"benchmark": NAME, "quick": args.quick, "machine": common.machine(), "settings": s,
            "trainer_images_per_s": trainer_ips, "bare_images_per_s": bare_ips, "overhead": overhead,
            "readme_command_images_per_s": launch_ips, "bare_around_it_images_per_s": bare_all_ips,
            "readme_vs_bare": launch_ips / bare_all_ips, "rows": [row]}
    md = "\n\n".join([
        f"# Trainer overhead ({'quick' if args.quick else 'full'})",
        common.markdown_table(["loop", "images/s (median)", "s/step (median)"], [
            ["diffxattn.train (accelerate, EMA, clipping, dropout, logging)", common.fmt(trainer_ips),
             common.fmt(row["ours_value"] * batch)],
            ["bare PyTorch loop", common.fmt(bare_ips), common.fmt(row["other_value"] * batch)]]),
        f"Trainer overhead: {overhead:+.1%} ({s['repeats']} interleaved steps each after {s['warmup']} "
        f"warm-up, batch {batch}, shapes-32).",
        common.markdown_table(["command", "images/s (median)", "ratio", "target"], [
            ["`accelerate launch -m diffxattn.train configs/shapes-32.yaml` (README)", common.fmt(launch_ips),
             f"{launch_ips / bare_all_ips:.2f}x", ">= 0.9x"],
            [f"bare PyTorch loop, {data['machine']['threads']} threads, just before and after", common.fmt(bare_all_ips), "1", ""]]),
        common.machine_line(data["machine"])])
    common.write_results(args.out, NAME, data, md)
    return data


if __name__ == "__main__":
    main()
