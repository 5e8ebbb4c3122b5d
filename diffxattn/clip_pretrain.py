"""Contrastive CLIP pre-training on the experiment's own data, for a frozen text encoder.

    diffxattn train-clip configs/shapes-32.yaml -o runs/clip --steps 3000

Trains transformers' `CLIPModel` (the text tower sized by the config's `text` section, a small ViT vision
tower) with CLIP's symmetric contrastive loss on (image, caption) pairs, then saves the text tower as a
`CLIPTextModel` + tokenizer folder that `text.pretrained` (and `load_text_encoder`) reads.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
from diffusers.optimization import get_scheduler
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from .build import build_dataset, learn_tokenizer, text_config
from .config import ExperimentConfig
from .models import text as text_mod


def clip_config(cfg: ExperimentConfig, tokenizer) -> CLIPConfig:
    """The config's text tower (as `build` makes it) beside a small ViT for the data's images."""
    size = cfg.data.size
    vision = dict(image_size=size, patch_size=max(2, size // 8), hidden_size=128, intermediate_size=256,
                  num_hidden_layers=3, num_attention_heads=4, num_channels=3)
    return CLIPConfig(text_config=text_config(cfg.text, tokenizer).to_dict(), vision_config=vision,
                      projection_dim=cfg.text.hidden_size)


def train_clip(cfg: ExperimentConfig, out: str | Path, *, steps: int = 3000, batch_size: int = 256, lr: float = 1e-3,
               seed: int = 0, log_every: int = 100) -> dict:
    """Train a CLIP on the config's data; save its text tower into `out`. Returns the final metrics."""
    out = Path(out)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    torch.manual_seed(seed)
    dataset = build_dataset(cfg.data)
    tokenizer = learn_tokenizer(cfg, out, dataset)
    model = CLIPModel(clip_config(cfg, tokenizer)).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    schedule = get_scheduler("cosine", optimizer, num_warmup_steps=max(1, steps // 20), num_training_steps=steps)
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True,
                                         num_workers=cfg.data.num_workers,
                                         collate_fn=lambda b: (torch.stack([i["pixel_values"] for i in b]),
                                                               [i["text"] for i in b]))
    start, metrics = time.time(), {}
    batches = (batch for _ in iter(int, 1) for batch in loader)  # epochs, forever
    for step in range(1, steps + 1):
        pixels, texts = next(batches)
        ids, mask = text_mod.tokenize(tokenizer, texts)
        outputs = model(input_ids=ids.to(device), attention_mask=mask.to(device), pixel_values=pixels.to(device),
                        return_loss=True)
        outputs.loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            # in-batch retrieval: does each caption pick its own image? (identical captions count as hits)
            same = torch.tensor([[a == b for b in texts] for a in texts], device=device)
            hit = same[torch.arange(len(texts)), outputs.logits_per_text.argmax(1)].float().mean().item()
            metrics = {"step": step, "loss": outputs.loss.item(), "text_to_image_top1": hit,
                       "seconds": time.time() - start}
            print(metrics, flush=True)
    text_model = CLIPTextModel(model.config.text_config)
    text_model.load_state_dict(model.text_model.state_dict())
    text_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return metrics
