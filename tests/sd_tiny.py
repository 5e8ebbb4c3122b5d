"""A tiny, randomly initialised Stable Diffusion pipeline, built and saved locally (no download)."""

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel

from diffxattn.models import text as text_mod
from conftest import CAPTIONS


def tiny_sd_pipeline(tmp_dir) -> StableDiffusionPipeline:
    torch.manual_seed(0)
    tokenizer = text_mod.build_tokenizer(CAPTIONS, tmp_dir / "tok", max_length=16)
    text_encoder = text_mod.build_text_encoder(tokenizer, hidden_size=32, num_layers=1, num_heads=2)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=8, norm_num_groups=32)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                        norm_num_groups=32, sample_size=16)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=DDIMScheduler(), safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.save_pretrained(tmp_dir / "sd")
    pipe = StableDiffusionPipeline.from_pretrained(tmp_dir / "sd", safety_checker=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe
