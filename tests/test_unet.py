import pytest
import torch

from diffxattn import SCHEDULERS, DiffXAttnPipeline, XAttnUNet, make_scheduler
from conftest import seeded


@pytest.mark.parametrize("size,channels,cross,selfattn", [
    (16, (8, 16), (16, 8), (8,)),
    (32, (8, 16, 16), (16, 8), (8,)),
    (64, (8, 8, 16, 16), (16, 8), (8,)),
    (32, (8, 16, 16, 16), (32, 16, 8, 4), (32, 4)),
])
def test_output_shape_matches_input_for_several_configs(size, channels, cross, selfattn):
    torch.manual_seed(0)
    unet = XAttnUNet(sample_size=size, block_out_channels=channels, layers_per_block=1, num_heads=2,
                     cross_attention_resolutions=cross, self_attention_resolutions=selfattn, cross_attention_dim=12)
    x = torch.randn(2, 3, size, size)
    out = unet(x, torch.tensor([1, 999]), torch.randn(2, 7, 12)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    attn2 = [n for n, _ in unet.named_modules() if n.endswith("attn2")]
    assert attn2, "cross-attention layers exist"
    # a non-square input of a valid size works too
    assert unet(torch.randn(1, 3, size, 2 * size), 5, torch.randn(1, 7, 12)).sample.shape == (1, 3, size, 2 * size)


def test_attention_lives_only_at_configured_resolutions():
    unet = XAttnUNet(sample_size=32, block_out_channels=(8, 16, 16), layers_per_block=1, num_heads=2,
                     cross_attention_resolutions=(8,), self_attention_resolutions=(8,), cross_attention_dim=12)
    names = [n for n, _ in unet.named_modules() if n.endswith(("attn1", "attn2"))]
    assert names and all(n.startswith(("down_blocks.2", "mid_block", "up_blocks.0")) for n in names)


def test_bad_unet_config_names_the_value():
    with pytest.raises(ValueError, match=r"cross_attention_resolutions has \[12\].*\[32, 16, 8\]"):
        XAttnUNet(sample_size=32, block_out_channels=(8, 16, 16), cross_attention_resolutions=(12,), num_heads=2)
    unet = XAttnUNet(sample_size=16, block_out_channels=(8, 16), layers_per_block=1, num_heads=2,
                     cross_attention_dim=12)
    with pytest.raises(ValueError, match="15x16 must be divisible by the UNet's down-sampling factor 2"):
        unet(torch.randn(1, 3, 15, 16), 1, torch.randn(1, 4, 12))


@pytest.mark.parametrize("name", list(SCHEDULERS))
@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_every_scheduler_samples_with_the_unet(tiny_pipe, name, prediction_type):
    pipe = DiffXAttnPipeline(tiny_pipe.unet, tiny_pipe.text_encoder, tiny_pipe.tokenizer,
                             make_scheduler(name, prediction_type=prediction_type))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == prediction_type
    out = pipe("a red circle", num_inference_steps=3, guidance_scale=2.0, generator=seeded(0), output_type="pt").images
    assert out.shape == (1, 3, 16, 16) and torch.isfinite(out).all()
    assert 0 <= out.min() and out.max() <= 1


def test_unknown_scheduler_lists_the_known_ones():
    with pytest.raises(ValueError, match="unknown scheduler 'dpm'; known schedulers: ddpm, ddim, dpm-solver\\+\\+"):
        make_scheduler("dpm")


def test_scheduler_keeps_training_settings_when_switched():
    ddim = make_scheduler("ddim", prediction_type="epsilon", beta_schedule="linear", num_train_timesteps=500)
    euler = make_scheduler("euler", config=ddim.config)
    assert (euler.config.prediction_type, euler.config.beta_schedule, euler.config.num_train_timesteps) == (
        "epsilon", "linear", 500)


def test_layers_per_block_per_level_from_a_config_file(tmp_path):
    from diffxattn.build import build_unet
    from diffxattn.config import ConfigError, load_config
    (tmp_path / "c.yaml").write_text("model:\n  block_out_channels: [8, 16, 16]\n  layers_per_block: [2, 1, 1]\n"
                                     "  num_heads: 2\n")
    cfg = load_config(tmp_path / "c.yaml").model
    assert cfg.layers_per_block == (2, 1, 1)
    unet = build_unet(cfg, cross_attention_dim=32)
    assert [len(b.resnets) for b in unet.down_blocks] == [2, 1, 1]
    assert [len(b.resnets) for b in unet.up_blocks] == [2, 2, 3]  # reversed, + 1 each as in diffusers
    out = unet(torch.randn(2, 3, 32, 32), torch.tensor([3, 500]), torch.randn(2, 4, 32)).sample
    assert out.shape == (2, 3, 32, 32)
    with pytest.raises(ValueError, match=r"layers_per_block=\(2, 1\) must be an int >= 1 or one such int per level"):
        XAttnUNet(block_out_channels=(8, 16, 16), layers_per_block=(2, 1), num_heads=2)
    (tmp_path / "bad.yaml").write_text("model:\n  layers_per_block: two\n")
    with pytest.raises(ConfigError, match="model.layers_per_block"):
        load_config(tmp_path / "bad.yaml")


def test_patch_stem_runs_the_first_level_at_half_resolution(tiny_text):
    """patch_size=2: a 32x32 image is processed on a 16x16 grid (attention maps at 16 and 8), and the output
    has the input's shape again (pixel shuffle)."""
    tokenizer, encoder = tiny_text
    torch.manual_seed(0)
    unet = XAttnUNet(sample_size=32, patch_size=2, block_out_channels=(16, 32), layers_per_block=1, num_heads=2,
                     cross_attention_resolutions=(16, 8), self_attention_resolutions=(8,), cross_attention_dim=32)
    seen = {}
    for name, module in unet.named_modules():
        if name.endswith("attn2"):
            module.register_forward_pre_hook(lambda m, args, name=name: seen.update({name: args[0].shape[1]}))
    x = torch.randn(2, 3, 32, 32)
    out = unet(x, torch.tensor([10, 900]), torch.randn(2, 5, 32)).sample
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert sorted(set(seen.values())) == [64, 256]  # 8x8 and 16x16 query tokens
    assert unet.downsample_factor == 4
    pipe = DiffXAttnPipeline(unet, encoder, tokenizer, make_scheduler("ddim"))
    pipe.set_progress_bar_config(disable=True)
    assert pipe.downsample_factor == 4
    assert pipe("a red circle", num_inference_steps=2, generator=seeded(0), output_type="pt").images.shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match=r"sample_size=36 must be divisible by patch_size \* 2\*\*\(levels-1\)=8"):
        XAttnUNet(sample_size=36, patch_size=4, block_out_channels=(16, 32), num_heads=2)
