"""Contrastive CLIP pre-training on the experiment's own data, for a frozen text encoder.

    diffxattn train-clip configs/shapes-32.yaml -o runs/clip --steps 3000

Trains transformers' `CLIPModel` (the text tower sized by the config's `text` section, a small ViT vision
tower) with CLIP's symmetric contrastive loss on (image, caption) pairs, then saves the text tower as a
`CLIPTextModel` + tokenizer folder that `text.pretrained` (and `load_text_encoder`) reads.

With `hard_negatives`, each image also competes against a caption with its words bound differently (colors or
shapes swapped between the objects, the relation or position mirrored; NegCLIP, Yuksekgonul et al. 2023): in-batch
negatives alone let a bag of words win. `binding_retrieval` measures exactly that: how often an image scores its
own caption above each such negative.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.optimization import get_scheduler
from transformers import CLIPConfig, CLIPModel, CLIPTextModel

from .build import build_dataset, learn_tokenizer, text_config
from .config import ExperimentConfig
from .data.captions import binding_negatives
from .models import text as text_mod


def clip_config(cfg: ExperimentConfig, tokenizer) -> CLIPConfig:
    """The config's text tower (as `build` makes it) beside a small ViT for the data's images."""
    size = cfg.data.size
    vision = dict(image_size=size, patch_size=max(2, size // 8), hidden_size=128, intermediate_size=256,
                  num_hidden_layers=3, num_attention_heads=4, num_channels=3)
    return CLIPConfig(text_config=text_config(cfg.text, tokenizer).to_dict(), vision_config=vision,
                      projection_dim=cfg.text.hidden_size)


def _features(model: CLIPModel, tokenizer, texts: list[str], pixels: torch.Tensor | None = None):
    """L2-normalised text (and image) embeddings."""
    device = model.logit_scale.device
    ids, mask = text_mod.tokenize(tokenizer, texts)
    text = model.text_projection(model.text_model(input_ids=ids.to(device), attention_mask=mask.to(device)).pooler_output)
    if pixels is None:
        return F.normalize(text, dim=-1)
    image = model.visual_projection(model.vision_model(pixel_values=pixels.to(device)).pooler_output)
    return F.normalize(text, dim=-1), F.normalize(image, dim=-1)


def contrastive_loss(model: CLIPModel, tokenizer, pixels: torch.Tensor, texts: list[str],
                     negatives: list[str] = ()) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's symmetric loss; `negatives` are extra captions that compete for every image (image -> text
    only). Returns (loss, text-to-image logits (B, B))."""
    text, image = _features(model, tokenizer, list(texts) + list(negatives), pixels)
    logits = model.logit_scale.exp() * image @ text.T  # (B, B + negatives)
    target = torch.arange(len(texts), device=logits.device)
    per_text = logits[:, :len(texts)].T
    return (F.cross_entropy(logits, target) + F.cross_entropy(per_text, target)) / 2, per_text


def _pick_negatives(texts: list[str], rng: np.random.Generator) -> list[str]:
    """One hard negative per caption that has any (a random kind)."""
    out = []
    for text in texts:
        options = list(binding_negatives(text).values())
        if options:
            out.append(options[rng.integers(len(options))])
    return out


@torch.no_grad()
def binding_retrieval(model: CLIPModel, tokenizer, cfg: ExperimentConfig, n: int = 512, seed: int = 12345) -> dict:
    """{kind: fraction of images whose caption scores above that kind of negative} over n scenes the training
    never drew (another data seed), and "all": over every (image, negative) pair."""
    data = dataclasses.replace(cfg.data, seed=seed, length=n)
    dataset = build_dataset(data)
    items = [dataset[i] for i in range(n)]
    model.eval()
    hits: dict[str, list[bool]] = {}
    for start in range(0, n, 128):
        chunk = items[start:start + 128]
        pixels = torch.stack([i["pixel_values"] for i in chunk])
        texts = [i["text"] for i in chunk]
        text, image = _features(model, tokenizer, texts, pixels)
        own = (image * text).sum(-1)
        negatives = [(k, kind, caption) for k, t in enumerate(texts) for kind, caption in binding_negatives(t).items()]
        if negatives:
            theirs = _features(model, tokenizer, [caption for *_, caption in negatives])
            for (k, kind, _), feature in zip(negatives, theirs):
                hits.setdefault(kind, []).append(bool(own[k] > image[k] @ feature))
    model.train()
    summary = {kind: float(np.mean(v)) for kind, v in sorted(hits.items())}
    summary["all"] = float(np.mean([h for v in hits.values() for h in v])) if hits else float("nan")
    return summary


def train_clip(cfg: ExperimentConfig, out: str | Path, *, steps: int = 3000, batch_size: int = 256, lr: float = 1e-3,
               seed: int = 0, log_every: int = 100, hard_negatives: bool = False) -> dict:
    """Train a CLIP on the config's data; save its text tower into `out`. Returns the final metrics, with the
    held-out `binding_retrieval`. `hard_negatives`: NegCLIP's swapped-binding captions as extra negatives."""
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
    rng = np.random.default_rng(seed)
    batches = (batch for _ in iter(int, 1) for batch in loader)  # epochs, forever
    for step in range(1, steps + 1):
        pixels, texts = next(batches)
        negatives = _pick_negatives(texts, rng) if hard_negatives else []
        loss, per_text = contrastive_loss(model, tokenizer, pixels, texts, negatives)
        loss.backward()
        optimizer.step()
        schedule.step()
        optimizer.zero_grad(set_to_none=True)
        if step % log_every == 0 or step == steps:
            # in-batch retrieval: does each caption pick its own image? (identical captions count as hits)
            same = torch.tensor([[a == b for b in texts] for a in texts], device=device)
            hit = same[torch.arange(len(texts)), per_text.argmax(1)].float().mean().item()
            metrics = {"step": step, "loss": loss.item(), "text_to_image_top1": hit,
                       "seconds": time.time() - start}
            print(metrics, flush=True)
    metrics["binding_retrieval"] = binding_retrieval(model, tokenizer, cfg)
    print(f"held-out binding retrieval: {metrics['binding_retrieval']}", flush=True)
    text_model = CLIPTextModel(model.config.text_config)
    text_model.load_state_dict(model.text_model.state_dict())
    text_model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return metrics
