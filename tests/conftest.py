"""Tiny models the tests build themselves (nothing is downloaded: HF_HUB_OFFLINE=1)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import torch

from diffxattn import DiffXAttnPipeline, XAttnUNet, make_scheduler
from diffxattn.models import text as text_mod

CAPTIONS = [
    "a red circle at the left", "a blue square at the right", "a small green triangle above a red circle",
    "a large yellow diamond", "a purple circle left of an orange square", "a blue circle below a red square",
]


def tiny_unet(**kw) -> XAttnUNet:
    args = dict(sample_size=16, block_out_channels=(16, 32), layers_per_block=1, cross_attention_resolutions=(16, 8),
                self_attention_resolutions=(8,), num_heads=2, cross_attention_dim=32)
    args.update(kw)
    torch.manual_seed(0)
    return XAttnUNet(**args)


@pytest.fixture(scope="session")
def tiny_text(tmp_path_factory):
    tokenizer = text_mod.build_tokenizer(CAPTIONS, tmp_path_factory.mktemp("tokenizer"), max_length=16)
    encoder = text_mod.build_text_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    return tokenizer, encoder


def tiny_pipeline(tiny_text, **config) -> DiffXAttnPipeline:
    """A fresh pipeline around `tiny_unet()` and the tiny text encoder (DDIM, 4 steps unless `config` says)."""
    tokenizer, encoder = tiny_text
    pipe = DiffXAttnPipeline(tiny_unet(), encoder, tokenizer, make_scheduler("ddim"), **{"default_steps": 4, **config})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="session")
def tiny_pipe(tiny_text) -> DiffXAttnPipeline:
    return tiny_pipeline(tiny_text)


@pytest.fixture(scope="session")
def sd_pipe(tmp_path_factory):
    """A tiny random Stable Diffusion pipeline (16x16 images)."""
    from sd_tiny import tiny_sd_pipeline

    return tiny_sd_pipeline(tmp_path_factory.mktemp("sd"))


def seeded(seed: int = 0, n: int = 1):
    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def step_inputs(pipe, g, step: int, **kw):
    """The tensors guide `g`'s step callback sees before `step` (after step - 1) of a plain run of "a red circle",
    and that step's timestep."""
    saved = {}

    def grab(pipe, i, t, tensors):
        saved.update(tensors if i == step - 1 else {})
        return {}

    kw.setdefault("generator", seeded(0, kw.get("num_images_per_prompt", 1)))
    pipe("a red circle", callback_on_step_end=grab, callback_on_step_end_tensor_inputs=g.tensor_inputs, **kw)
    return saved, pipe.scheduler.timesteps[step]
