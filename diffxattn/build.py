"""Build the components an experiment config describes: dataset, tokenizer, text encoder, UNet, scheduler,
pipeline. `build_models` is the one entry for the models; `make_pipeline` assembles a pipeline from them."""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import torch
from diffusers import UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTokenizer

from . import limits
from .config import ConfigError, DataConfig, ExperimentConfig, ModelConfig, TextConfig
from .models import XAttnUNet
from .models import text as text_mod
from .pipeline import DiffXAttnPipeline
from .schedulers import make_scheduler


def build_dataset(cfg: DataConfig, split: str = "train"):
    """The training data a config names: procedural shapes scenes or an image folder with metadata.jsonl."""
    if cfg.kind == "shapes":
        from .data.shapes import ShapesConfig, ShapesDataset

        kw = dict(size=cfg.size, min_objects=cfg.min_objects, max_objects=cfg.max_objects,
                  two_object_prob=cfg.two_object_prob, seed=cfg.seed, length=cfg.length, split=split)
        if cfg.holdout is not None:
            kw["holdout"] = cfg.holdout
        return ShapesDataset(ShapesConfig(**kw))
    from .data.imagefolder import ImageFolderDataset

    if not cfg.root:
        raise ValueError("data.kind='imagefolder' needs data.root: a folder with metadata.jsonl")
    return ImageFolderDataset(cfg.root, size=cfg.size)


def dataset_captions(dataset, n: int) -> list[str]:
    """Up to n captions to learn a tokenizer vocabulary from."""
    if hasattr(dataset, "captions"):
        return dataset.captions(n)
    return [dataset[i]["text"] for i in range(min(n, len(dataset)))]


def learn_tokenizer(cfg: ExperimentConfig, folder: str | Path, dataset=None) -> CLIPTokenizer:
    """A CLIP tokenizer whose vocabulary is learned from (up to text.vocab_captions of) the data's captions,
    saved in `folder` (for a config without a pretrained text encoder)."""
    dataset = build_dataset(cfg.data) if dataset is None else dataset
    captions = dataset_captions(dataset, cfg.text.vocab_captions)
    return text_mod.build_tokenizer(captions, folder, max_length=cfg.text.max_length)


def text_config(cfg: TextConfig, tokenizer: CLIPTokenizer) -> CLIPTextConfig:
    """The small CLIP text model a config describes, for `tokenizer` (also the text tower of `train-clip`)."""
    return text_mod.text_encoder_config(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads)


def build_text(cfg: TextConfig, tokenizer: CLIPTokenizer):
    """(tokenizer, text_encoder): loaded from `cfg.pretrained`, else a small random CLIP for `tokenizer`.
    Frozen unless `cfg.train`."""
    if cfg.pretrained:
        tokenizer, encoder = text_mod.load_text_encoder(cfg.pretrained)
    else:
        encoder = sized(lambda: text_mod.build_text_encoder(tokenizer, cfg.hidden_size, cfg.num_layers, cfg.num_heads),
                        "the config's text encoder")
    if not cfg.train:
        encoder.requires_grad_(False).eval()
    return tokenizer, encoder


def sized(build: Callable[[], torch.nn.Module], what: str) -> torch.nn.Module:
    """`build()`, after building it once on the meta device (no memory) to check its parameter count against
    the limit. The constructor's errors are the config values' fault: a ConfigError naming `what`."""
    try:
        with torch.device("meta"):
            n = sum(p.numel() for p in build().parameters())
    except Exception as e:
        raise ConfigError(f"{what} cannot be built from the config: {type(e).__name__}: {e}") from e
    limits.check(limits.PARAMS, n, f"the parameter count of {what}")
    return build()


def build_unet(cfg: ModelConfig, cross_attention_dim: int, in_channels: int = 3):
    """XAttnUNet from the model config, or a diffusers UNet2DConditionModel of the same shape (for comparisons)."""
    return sized(lambda: _build_unet(cfg, cross_attention_dim, in_channels), "the config's UNet")


def _build_unet(cfg: ModelConfig, cross_attention_dim: int, in_channels: int = 3):
    if cfg.kind == "xattn":
        return XAttnUNet(
            sample_size=cfg.sample_size, in_channels=in_channels, out_channels=in_channels,
            block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
            cross_attention_resolutions=cfg.cross_attention_resolutions,
            self_attention_resolutions=cfg.self_attention_resolutions, num_heads=cfg.num_heads,
            cross_attention_dim=cross_attention_dim, gated_cross_attention=cfg.gated_cross_attention,
            query_pos_embed=cfg.query_pos_embed, ff_mult=cfg.ff_mult, patch_size=cfg.patch_size,
        )
    levels = len(cfg.block_out_channels)
    attn = set(range(levels)) if cfg.diffusers_attention_levels is None else set(cfg.diffusers_attention_levels)
    down = tuple("CrossAttnDownBlock2D" if i in attn else "DownBlock2D" for i in range(levels))
    up = tuple("CrossAttnUpBlock2D" if levels - 1 - i in attn else "UpBlock2D" for i in range(levels))
    return UNet2DConditionModel(
        sample_size=cfg.sample_size, in_channels=in_channels, out_channels=in_channels,
        down_block_types=down, up_block_types=up, block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block, cross_attention_dim=cross_attention_dim,
        attention_head_dim=[c // cfg.num_heads for c in cfg.block_out_channels],
        norm_num_groups=min(32, min(cfg.block_out_channels)),
    )


def build_models(cfg: ExperimentConfig, tokenizer: CLIPTokenizer | None = None, *,
                 workdir: str | Path | None = None):
    """(tokenizer, text encoder, UNet) of a config: the one way components are built (the trainer, `build`,
    CLIP pre-training's tokenizer and checkpoint export all come here).

    The tokenizer is `text.pretrained`'s, else the one given (a run's, a checkpoint's), else learned from the
    data's captions into `workdir` (a temporary folder by default). The UNet starts from `model.pretrained`'s
    weights when set.
    """
    if tokenizer is None and not cfg.text.pretrained:
        tokenizer = learn_tokenizer(cfg, workdir or tempfile.mkdtemp(prefix="diffxattn-tokenizer-"))
    tokenizer, text_encoder = build_text(cfg.text, tokenizer)
    unet = build_unet(cfg.model, text_encoder.config.hidden_size)
    if cfg.model.pretrained:
        load_unet_weights(unet, cfg.model.pretrained)
    return tokenizer, text_encoder, unet


def build_pipeline(cfg: ExperimentConfig, tokenizer: CLIPTokenizer | None = None,
                   workdir: str | Path | None = None) -> DiffXAttnPipeline:
    """A complete pipeline for an experiment config: untrained, except for what `model.pretrained` and
    `text.pretrained` load."""
    tokenizer, text_encoder, unet = build_models(cfg, tokenizer, workdir=workdir)
    return make_pipeline(cfg, unet, text_encoder, tokenizer)


def load_unet_weights(unet, path: str | Path) -> None:
    """Copy the weights of the UNet saved in `path` (a pipeline folder with unet/, or a UNet folder) into
    `unet`, in its dtype; a different architecture is an error that names the first differences."""
    folder = Path(path) / "unet" if (Path(path) / "unet").is_dir() else Path(path)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"model.pretrained={str(path)!r}: no UNet there (expected a pipeline folder with unet/ "
                         "or a folder with config.json and the weights)")
    theirs = type(unet).from_pretrained(str(folder)).state_dict()
    ours = unet.state_dict()
    missing, extra = sorted(set(ours) - set(theirs)), sorted(set(theirs) - set(ours))
    shapes = [f"{k} {tuple(theirs[k].shape)} vs {tuple(v.shape)}" for k, v in ours.items()
              if k in theirs and theirs[k].shape != v.shape]
    if missing or extra or shapes:
        raise ConfigError(f"model.pretrained={str(path)!r} is a different architecture than the config's model: "
                         f"missing {missing[:3]}, unexpected {extra[:3]}, shapes (saved vs config) {shapes[:3]}")
    unet.load_state_dict({k: v.to(ours[k].dtype) for k, v in theirs.items()})


def make_pipeline(cfg: ExperimentConfig, unet, text_encoder, tokenizer) -> DiffXAttnPipeline:
    """A pipeline with the config's sampler and default steps / guidance."""
    s = cfg.scheduler
    scheduler = make_scheduler(s.sampler, num_train_timesteps=s.num_train_timesteps,
                               beta_schedule=s.beta_schedule, prediction_type=s.prediction_type)
    pipe = DiffXAttnPipeline(unet, text_encoder, tokenizer, scheduler, default_steps=s.steps,
                             default_guidance_scale=s.guidance_scale, default_guidance_interval=s.guidance_interval)
    pipe.set_progress_bar_config(disable=True)
    return pipe
