"""Trainer overhead: images/s of diffxattn.train's loop vs a bare PyTorch loop, same work, one process.

    python bench/bench_trainer.py [--quick] [--out bench/results] [--threads 2]

Both sides train the shapes-32 model (UNet + jointly trained text encoder) on the same data, batch size,
AdamW settings and noise / v-prediction / min-SNR loss. The trainer's step is `train.loop_step` (accelerate,
keyed generators, caption dropout, gradient clipping, EMA, loss reduction, progress bar, TensorBoard scalars);
validation and checkpoints are off. The bare step: next batch, tokenize, forward, backward, AdamW. Steps are
interleaved (trainer, bare, bare, trainer, ...) after a warm-up, so load from other processes hits both
alike. overhead = trainer seconds per step / bare seconds per step - 1 (medians).
"""

from __future__ import annotations

import os
import sys
import tempfile
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


def main(argv=None) -> dict:
    args = common.parse_args(__doc__.split("\n")[0], argv)
    common.setup(args.threads)
    s = settings(args.quick)
    with tempfile.TemporaryDirectory(prefix="diffxattn-bench-trainer-") as out:
        trainer, run = trainer_step(out, s)
        fns = {"trainer": trainer, "bare": bare_step(run)}
        times = common.interleaved(fns, warmup=s["warmup"], repeats=s["repeats"])
        run.accelerator.end_training()
    batch = run.cfg.train.batch_size
    row = common.comparison("train step", "trainer", "bare", times["trainer"], times["bare"], "s/image",
                            per=batch)
    trainer_ips, bare_ips = 1 / row["ours_value"], 1 / row["other_value"]
    overhead = row["ours_value"] / row["other_value"] - 1
    data = {"benchmark": NAME, "quick": args.quick, "machine": common.machine(), "settings": s,
            "trainer_images_per_s": trainer_ips, "bare_images_per_s": bare_ips, "overhead": overhead,
            "rows": [row]}
    md = "\n\n".join([
        f"# Trainer overhead ({'quick' if args.quick else 'full'})",
        common.markdown_table(["loop", "images/s (median)", "s/step (median)"], [
            ["diffxattn.train (accelerate, EMA, clipping, dropout, logging)", common.fmt(trainer_ips),
             common.fmt(row["ours_value"] * batch)],
            ["bare PyTorch loop", common.fmt(bare_ips), common.fmt(row["other_value"] * batch)]]),
        f"Trainer overhead: {overhead:+.1%} ({s['repeats']} interleaved steps each after {s['warmup']} "
        f"warm-up, batch {batch}, shapes-32).",
        common.machine_line(data["machine"])])
    common.write_results(args.out, NAME, data, md)
    return data


if __name__ == "__main__":
    main()
