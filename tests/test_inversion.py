"""Real-image inversion: invert -> reconstruct returns the input, a saved inversion round-trips, a mismatched one
is refused with the reason, edits and heatmaps from an inversion, on our pipeline and on Stable Diffusion."""

import json
import shutil

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline
from PIL import Image

from conftest import tiny_pipeline, tiny_unet
from diffxattn import DiffXAttnPipeline, make_scheduler
from diffxattn.cli import main
from diffxattn.data.shapes import ShapesConfig, render, sample_scene
from diffxattn.generation import edit
from diffxattn.inversion import METHODS, Inversion, InversionError, _Step, invert, psnr, reconstruct

PROMPT = "a red circle at the left"
TOLERANCE_DB = 35  # bench_inversion's target for the shipped model


@pytest.fixture(scope="module")
def render16():
    """A render of a never-seen scene of the shapes data, 16x16."""
    image, _ = render(sample_scene(ShapesConfig(seed=90210, size=16), 0))
    return Image.fromarray(image)


@pytest.fixture(scope="module")
def guided_pipe(tiny_text):
    """The tiny pipeline with guidance 3 over the first half of its 6 steps by default, like the shipped one."""
    return tiny_pipeline(tiny_text, default_steps=6, default_guidance_scale=3.0, default_guidance_interval=(0.0, 0.5))


def uint8(pipe_output) -> np.ndarray:
    return np.round(np.asarray(pipe_output.images[0]) * 255).astype(np.uint8)


def cli(*args) -> int:
    try:
        return main([str(a) for a in args])
    except SystemExit as e:
        return e.code


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_the_step_solved_backwards_is_ddims_step_exactly(prediction_type):
    """_Step.forward is DDIMScheduler.step (eta 0, no clipping); backward inverts it for a fixed model output."""
    scheduler = make_scheduler("ddim", prediction_type="epsilon")
    scheduler = DDIMScheduler.from_config({**scheduler.config, "prediction_type": prediction_type})
    scheduler.set_timesteps(10)
    x, m = torch.randn(1, 3, 4, 4, generator=torch.Generator().manual_seed(0)), torch.randn(1, 3, 4, 4)
    for t in scheduler.timesteps:
        step = _Step(scheduler, int(t), 10)
        prev = scheduler.step(m, t, x).prev_sample
        torch.testing.assert_close(step.forward(x, m), prev, rtol=1e-5, atol=1e-5)
        # backward takes the model output at x_t; for v and x0 predictions eps also depends on x_t itself
        torch.testing.assert_close(step.backward(prev, m), x, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("method, guidance, at_least", [
    ("fixed-point", 1.0, TOLERANCE_DB), ("null-text", 3.0, TOLERANCE_DB), ("fixed-point", 3.0, TOLERANCE_DB),
    ("ddim", 1.0, 15)])  # DDIM inversion is approximate: it only has to look like the input
def test_invert_then_reconstruct_returns_the_input(guided_pipe, render16, method, guidance, at_least):
    inv = invert(guided_pipe, render16, PROMPT, method=method, guidance=guidance)
    assert inv.latents.shape == (1, 3, 16, 16) and inv.steps == 6 and inv.guidance_interval == (0.0, 0.5)
    assert (inv.null_embeds is not None) == (method == "null-text" and guidance > 1)
    again = uint8(reconstruct(guided_pipe, inv, output_type="np"))
    assert psnr(again, np.asarray(render16)) >= at_least
    assert inv.latents.std() > 0.5  # noise, not the image: the sampler starts from it


def test_null_text_keeps_guidance_exact_where_plain_ddim_inversion_drifts(guided_pipe, render16):
    image = np.asarray(render16)
    scores = {m: psnr(uint8(reconstruct(guided_pipe, invert(guided_pipe, render16, PROMPT, method=m),
                                        output_type="np")), image) for m in ("null-text", "ddim")}
    assert scores["null-text"] >= scores["ddim"] + 10, scores


def test_a_saved_inversion_round_trips_and_draws_the_same_image(guided_pipe, render16, tmp_path):
    inv = invert(guided_pipe, render16, PROMPT)
    inv.save(tmp_path / "inv")
    assert sorted(p.name for p in (tmp_path / "inv").iterdir()) == ["inversion.json", "inversion.safetensors"]
    loaded = Inversion.load(tmp_path / "inv", guided_pipe)
    torch.testing.assert_close(loaded.latents, inv.latents, rtol=0, atol=0)
    torch.testing.assert_close(loaded.null_embeds, inv.null_embeds, rtol=0, atol=0)
    assert loaded.meta() == inv.meta() and loaded.prompt == PROMPT and loaded.method == "null-text"
    a, b = (uint8(reconstruct(guided_pipe, x, output_type="np")) for x in (inv, loaded))
    assert np.array_equal(a, b)
    inv.save(tmp_path / "inv")  # its own folder may be replaced; a user's folder may not
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("keep")
    with pytest.raises(ValueError, match="not empty and is not an inversion folder"):
        inv.save(tmp_path / "mine")
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "keep"


def test_a_mismatched_inversion_is_refused_saying_why(guided_pipe, tiny_pipe, render16, tmp_path):
    inv = invert(guided_pipe, render16, PROMPT, method="fixed-point")
    inv.save(tmp_path / "inv")
    unet = tiny_unet()  # the same architecture, one weight trained a little further
    with torch.no_grad():
        next(unet.parameters())[0].add_(1e-3)
    other = DiffXAttnPipeline(unet, tiny_pipe.text_encoder, tiny_pipe.tokenizer, make_scheduler("ddim"))
    with pytest.raises(InversionError, match="was made with another pipeline"):
        Inversion.load(tmp_path / "inv", other)
    meta = json.loads((tmp_path / "inv" / "inversion.json").read_text())
    shutil.copytree(tmp_path / "inv", tmp_path / "resized")
    (tmp_path / "resized" / "inversion.json").write_text(json.dumps({**meta, "height": 32, "width": 32}))
    with pytest.raises(InversionError, match=r"latents have shape \(1, 3, 16, 16\), but a 32x32 image .* needs "
                                             r"\(1, 3, 32, 32\)"):
        Inversion.load(tmp_path / "resized", guided_pipe)
    with pytest.raises(InversionError, match="steps 10: the inversion was made for steps 6"):
        reconstruct(guided_pipe, inv, num_inference_steps=10)
    with pytest.raises(InversionError, match="guidance 5.0: the inversion was made for guidance 3.0"):
        edit(guided_pipe, PROMPT, "a blue circle at the left", inversion=inv, guidance_scale=5.0)
    with pytest.raises(ValueError, match="is not the inversion's"):
        edit(guided_pipe, "a blue square", "a red square", inversion=inv)
    with pytest.raises(InversionError, match="is not an inversion folder: .*inversion.json is missing"):
        Inversion.load(tmp_path)
    euler = DiffXAttnPipeline(guided_pipe.unet, guided_pipe.text_encoder, guided_pipe.tokenizer,
                              make_scheduler("euler"))
    with pytest.raises(InversionError, match="inversion supports the samplers ddim; this pipeline samples with "
                                             "EulerDiscreteScheduler"):
        invert(euler, render16, PROMPT)
    with pytest.raises(InversionError, match="inversion method 'edict'; expected one of null-text"):
        invert(guided_pipe, render16, PROMPT, method="edict")


def test_edits_from_an_inversion_keep_the_source_half_identical_to_the_reconstruction(guided_pipe, render16):
    inv = invert(guided_pipe, render16, PROMPT)
    again = uint8(reconstruct(guided_pipe, inv, output_type="np"))
    from diffxattn.control import StepRange

    for options in ({}, {"local_blend": ["circle"]}, {"feature_replace": StepRange.fraction(0, 0.8)},
                    {"cross_replace": StepRange.fraction(0, 0.5), "self_replace": StepRange.fraction(0, 0.2)}):
        result = edit(guided_pipe, PROMPT, "a (blue:1.5) circle at the left", inversion=inv, output_type="np",
                      **options)
        source = np.round(result.source * 255).astype(np.uint8)
        assert np.abs(source.astype(int) - again).max() <= 1, options  # batch of 2 vs 1: float rounding at most
        assert not np.array_equal(np.round(result.edited * 255).astype(np.uint8), source), options


def test_an_image_of_another_size_or_mode_is_converted_with_a_warning(guided_pipe, render16):
    gray = render16.resize((40, 24)).convert("L")
    with pytest.warns(UserWarning) as caught:
        inv = invert(guided_pipe, gray, PROMPT, method="fixed-point")
    messages = [str(w.message) for w in caught]
    assert "the image is mode L; converted to RGB" in messages
    assert "the image is 40x24; resized to the pipeline's 16x16" in messages
    assert (inv.height, inv.width) == (16, 16)


def test_stable_diffusion_inverts_through_its_vae(sd_pipe, render16):
    """A tiny random SD UNet (v-prediction: the random epsilon UNet's steps have no stable inverse to find);
    the reconstruction is compared with the VAE's own round trip, the best a latent inversion can do."""
    scheduler = DDIMScheduler.from_config(sd_pipe.scheduler.config, prediction_type="v_prediction", clip_sample=False)
    pipe = StableDiffusionPipeline(**{**sd_pipe.components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    from diffxattn.inversion import encode_image

    with torch.no_grad():
        z = encode_image(pipe, render16)
        vae = pipe.vae.decode(z / pipe.vae.config.scaling_factor).sample
    vae = np.round(((vae[0].permute(1, 2, 0) / 2 + 0.5).clamp(0, 1) * 255).numpy()).astype(np.uint8)
    for method, guidance in (("fixed-point", 1.0), ("null-text", 3.0)):
        inv = invert(pipe, render16, PROMPT, method=method, steps=50, guidance=guidance)
        assert inv.latents.shape == (1, 4, 8, 8)
        assert psnr(uint8(reconstruct(pipe, inv, output_type="np")), vae) >= 30, method
    with pytest.raises(InversionError, match="a guidance interval needs a diffxattn pipeline"):
        invert(pipe, render16, PROMPT, guidance_interval=(0.0, 0.5))


def test_invert_edit_and_heatmap_from_the_command_line(guided_pipe, render16, tmp_path, capsys):
    guided_pipe.save_pretrained(tmp_path / "pipe")
    render16.save(tmp_path / "in.png")
    pipe, inv = tmp_path / "pipe", tmp_path / "inv"
    assert cli("invert", tmp_path / "in.png", "--prompt", PROMPT, "--pipeline", pipe, "-o", inv) == 0
    out = capsys.readouterr().out
    assert "null-text inversion, 6 steps, guidance 3" in out and "drawn again at PSNR" in out
    assert float(out.split("PSNR ")[1].split(" dB")[0]) >= TOLERANCE_DB
    assert sorted(p.name for p in inv.iterdir()) == ["input.png", "inversion.json", "inversion.safetensors",
                                                     "reconstruction.png"]
    assert cli("edit", "--inversion", inv, "--to", "a blue circle at the left", "--pipeline", pipe,
               "--local-blend", "circle", "-o", tmp_path / "edit.png") == 0
    pair = np.asarray(Image.open(tmp_path / "edit.png"))
    assert pair.shape == (16, 32, 3)
    assert np.abs(pair[:, :16].astype(int) - np.asarray(Image.open(inv / "reconstruction.png"))).max() <= 1
    assert cli("heatmap", "--inversion", inv, "--pipeline", pipe, "-o", tmp_path / "maps") == 0
    maps = json.loads((tmp_path / "maps" / "maps.json").read_text())
    assert maps["words"] == PROMPT.split()
    assert np.array_equal(np.asarray(Image.open(tmp_path / "maps" / "image.png")),
                          np.asarray(Image.open(inv / "reconstruction.png")))
    capsys.readouterr()
    # a different prompt or steps than the inversion's, a folder that is not one, a file that is not an image
    for args, message in (
            (["edit", "a blue square", "--inversion", inv, "--to", "x"], "is not the one"),
            (["heatmap", "--inversion", inv, "--num-steps", "3", "-o", tmp_path / "m2"], "steps 3: the inversion"),
            (["edit", "--inversion", tmp_path / "maps", "--to", "x"], "is not an inversion folder"),
            (["edit", "--to", "x"], "give the source prompt, or --inversion DIR"),
            (["invert", tmp_path / "maps" / "maps.json", "--prompt", "x", "-o", tmp_path / "i2"],
             "maps.json: cannot be decoded as an image"),
            (["invert", tmp_path / "in.png", "--prompt", "x", "-o", tmp_path / "maps"],
             "not an inversion folder written by diffxattn")):
        assert cli(*args, "--pipeline", pipe) == 2, args
        err = capsys.readouterr().err.strip().splitlines()
        assert err[-1].startswith(f"diffxattn {args[0]}: error: ") and message in err[-1], err
    assert (tmp_path / "maps" / "maps.json").is_file()  # the refused output folder is untouched


def test_every_method_is_offered_on_the_command_line():
    from diffxattn.cli import parser

    invert_parser = parser()._subparsers._group_actions[0].choices["invert"]
    method = next(a for a in invert_parser._actions if a.dest == "method")
    assert tuple(method.choices) == METHODS and method.default == METHODS[0]
