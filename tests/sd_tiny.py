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


def _sdxl_text(tmp_dir, *, pad_token: str = "!"):
    """SDXL's second text side: a CLIP tokenizer padding with '!' (as SDXL's tokenizer_2 does) and a
    CLIPTextModelWithProjection, whose pooled output conditions the UNet next to the time ids."""
    from transformers import CLIPTextModelWithProjection, CLIPTokenizer

    text_mod.build_tokenizer(CAPTIONS, tmp_dir / "tok2", max_length=16)
    tokenizer_2 = CLIPTokenizer.from_pretrained(str(tmp_dir / "tok2"), pad_token=pad_token)
    config = text_mod.text_encoder_config(tokenizer_2, hidden_size=32, num_layers=2, num_heads=2)
    config.pad_token_id = tokenizer_2.pad_token_id
    torch.manual_seed(1)
    return tokenizer_2, CLIPTextModelWithProjection(config)


def _sdxl_unet(cross_attention_dim: int, time_ids: int, pooled_dim: int) -> UNet2DConditionModel:
    """SDXL's UNet layout, tiny: no attention at the top level, two transformer blocks below it, and the
    "text_time" added conditioning (pooled text + `time_ids` numbers, each embedded in 8 channels)."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, block_out_channels=(32, 64), layers_per_block=1,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2), attention_head_dim=(2, 4), use_linear_projection=True,
        cross_attention_dim=cross_attention_dim, norm_num_groups=32, addition_embed_type="text_time",
        addition_time_embed_dim=8, projection_class_embeddings_input_dim=8 * time_ids + pooled_dim)


def _tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                         norm_num_groups=32, sample_size=16)


def tiny_sdxl_pipeline(tmp_dir):
    """A tiny random Stable Diffusion XL base pipeline (16x16 images): two tokenizers and text encoders whose
    penultimate hidden states are concatenated (32 + 32 channels), the second one's pooled output and 6 time ids
    as added conditioning."""
    from diffusers import StableDiffusionXLPipeline

    tokenizer = text_mod.build_tokenizer(CAPTIONS, tmp_dir / "tok", max_length=16)
    text_encoder = text_mod.build_text_encoder(tokenizer, hidden_size=32, num_layers=2, num_heads=2)
    tokenizer_2, text_encoder_2 = _sdxl_text(tmp_dir)
    pipe = StableDiffusionXLPipeline(vae=_tiny_vae(), text_encoder=text_encoder, text_encoder_2=text_encoder_2,
                                     tokenizer=tokenizer, tokenizer_2=tokenizer_2, unet=_sdxl_unet(64, 6, 32),
                                     scheduler=DDIMScheduler())
    pipe.save_pretrained(tmp_dir / "sdxl")
    pipe = StableDiffusionXLPipeline.from_pretrained(tmp_dir / "sdxl")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl_refiner(tmp_dir):
    """The SDXL refiner's layout, tiny: an image-to-image pipeline with only the second tokenizer and text
    encoder, and 5 time ids (the aesthetic score replaces the target size)."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    tokenizer_2, text_encoder_2 = _sdxl_text(tmp_dir)
    pipe = StableDiffusionXLImg2ImgPipeline(
        vae=_tiny_vae(), text_encoder=None, text_encoder_2=text_encoder_2, tokenizer=None, tokenizer_2=tokenizer_2,
        unet=_sdxl_unet(32, 5, 32), scheduler=DDIMScheduler(), requires_aesthetics_score=True)
    pipe.save_pretrained(tmp_dir / "refiner")
    pipe = StableDiffusionXLImg2ImgPipeline.from_pretrained(tmp_dir / "refiner")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3_pipeline(tmp_dir):
    """A tiny random Stable Diffusion 3 pipeline (16x16 images): an MMDiT (`SD3Transformer2DModel`, 2x2 patches,
    two joint-attention blocks) reading two CLIP encoders' penultimate states side by side (32 + 32 channels) and
    their pooled outputs; no T5 encoder (SD3 then reads zeros in its place, as `text_encoder_3=None` allows)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    tokenizer = text_mod.build_tokenizer(CAPTIONS, tmp_dir / "tok", max_length=16)
    torch.manual_seed(0)
    text_encoder = CLIPTextModelWithProjection(text_mod.text_encoder_config(tokenizer, hidden_size=32, num_layers=2,
                                                                            num_heads=2))
    tokenizer_2, text_encoder_2 = _sdxl_text(tmp_dir)
    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
                                        attention_head_dim=8, num_attention_heads=2, joint_attention_dim=64,
                                        caption_projection_dim=16, pooled_projection_dim=64, pos_embed_max_size=8)
    torch.manual_seed(0)
    vae = AutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(32, 64), latent_channels=4,
                        norm_num_groups=32, sample_size=16, shift_factor=0.0)
    pipe = StableDiffusion3Pipeline(transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(), vae=vae,
                                    text_encoder=text_encoder, tokenizer=tokenizer, text_encoder_2=text_encoder_2,
                                    tokenizer_2=tokenizer_2, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe
