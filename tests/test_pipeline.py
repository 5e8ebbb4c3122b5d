import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline
from PIL import Image

from diffxattn import DiffXAttnPipeline
from conftest import seeded, tiny_pipeline


def test_same_seed_gives_identical_bits(tiny_pipe):
    a = tiny_pipe("a red circle", generator=seeded(3), output_type="np", guidance_scale=2.0).images
    b = tiny_pipe("a red circle", generator=seeded(3), output_type="np", guidance_scale=2.0).images
    c = tiny_pipe("a red circle", generator=seeded(4), output_type="np", guidance_scale=2.0).images
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_an_image_does_not_depend_on_its_batch(tiny_pipe):
    # per-image generators make the noise identical; BLAS may sum a batch in another order, so the float
    # output can differ in the last bits, but the saved 8-bit image is the same
    batch = tiny_pipe(["a red circle", "a blue square"], generator=seeded(7, 2), output_type="np").images
    alone = tiny_pipe("a blue square", generator=seeded(8), output_type="np").images
    np.testing.assert_allclose(batch[1], alone[0], atol=1e-5)
    as_png = lambda a: np.round(a * 255).astype(np.uint8)  # noqa: E731 - what postprocess() does for PIL
    assert np.array_equal(as_png(batch[1]), as_png(alone[0]))


def test_guidance_one_is_the_conditional_prediction(tiny_pipe):
    pipe = tiny_pipe
    out = pipe("a red circle", negative_prompt="a blue square", guidance_scale=1.0, generator=seeded(1),
               output_type="pt").images
    # the same loop written out by hand with the conditional branch only
    emb, mask = pipe.encode_prompt(["a red circle"])
    x = torch.randn((1, 3, 16, 16), generator=seeded(1)[0])
    pipe.scheduler.set_timesteps(4)
    for t in pipe.scheduler.timesteps:
        with torch.no_grad():
            pred = pipe.unet(x, t, emb, encoder_attention_mask=mask).sample
        x = pipe.scheduler.step(pred, t, x).prev_sample
    assert torch.equal(out, (x / 2 + 0.5).clamp(0, 1))
    guided = pipe("a red circle", negative_prompt="a blue square", guidance_scale=3.0, generator=seeded(1),
                  output_type="pt").images
    assert not torch.equal(out, guided)


def test_output_types_and_images_per_prompt(tiny_pipe):
    pil = tiny_pipe(["a red circle", "a blue square"], num_images_per_prompt=2, generator=seeded(0, 4)).images
    assert len(pil) == 4 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in pil)
    arr = tiny_pipe("a red circle", height=32, width=16, generator=seeded(0), output_type="np").images
    assert arr.shape == (1, 32, 16, 3) and arr.dtype == np.float32


def test_save_and_load_round_trip_bit_for_bit(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == "DiffXAttnPipeline" and index["unet"][1] == "XAttnUNet"
    assert (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "tokenizer" / "tokenizer_config.json").is_file()
    for loaded in (DiffXAttnPipeline.from_pretrained(tmp_path), DiffusionPipeline.from_pretrained(tmp_path)):
        assert type(loaded) is DiffXAttnPipeline
        loaded.set_progress_bar_config(disable=True)
        for name in ("unet", "text_encoder"):
            a, b = getattr(tiny_pipe, name).state_dict(), getattr(loaded, name).state_dict()
            assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        assert loaded.tokenizer.get_vocab() == tiny_pipe.tokenizer.get_vocab()
        x = loaded("a red circle", generator=seeded(2), output_type="np", guidance_scale=2.0).images
        y = tiny_pipe("a red circle", generator=seeded(2), output_type="np", guidance_scale=2.0).images
        assert np.array_equal(x, y)


@pytest.mark.parametrize("kwargs,message", [
    (dict(prompt="a red circle", height=13), "height=13 must be a positive multiple of the UNet's down-sampling factor 2"),
    (dict(prompt="a red circle", width=0), "width=0 must be a positive multiple"),
    (dict(prompt=[]), "prompt is an empty list"),
    (dict(prompt=["a", "b"], negative_prompt=["x"]), "negative_prompt has 1 entries but prompt has 2"),
    (dict(prompt="a", num_inference_steps=0), "num_inference_steps=0 must be a whole number >= 1"),
    (dict(prompt="a", output_type="jpg"), "output_type='jpg'"),
])
def test_bad_input_names_the_value(tiny_pipe, kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        tiny_pipe(**kwargs)


def test_compiled_unet_samples_plain_runs_and_controlled_runs_use_the_eager_unet(tiny_text, monkeypatch):
    from diffxattn.control import AttentionStore

    pipe = tiny_pipeline(tiny_text, default_steps=3)
    eager = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").images
    calls = []

    def fake_compile(unet, **options):  # a stand-in that records the calls it gets (compiling takes minutes)
        def compiled(*args, **kwargs):
            calls.append(options)
            return unet(*args, **kwargs)
        return compiled

    monkeypatch.setattr(torch, "compile", fake_compile)
    assert pipe.compile_unet(mode="reduce-overhead") is pipe
    plain = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert calls == [{"mode": "reduce-overhead"}] * 3 and torch.equal(plain, eager)
    with AttentionStore(pipe) as store:
        pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt")
    assert len(calls) == 3  # the store's run went to the eager UNet, whose processors it replaced
    assert store.nbytes() > 0  # and it captured the maps


@pytest.mark.slow
def test_compiled_unet_matches_the_eager_images(tiny_text):
    pipe = tiny_pipeline(tiny_text, default_steps=3, default_guidance_scale=3.0)
    eager = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").images
    compiled = pipe.compile_unet()("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt").images
    torch.testing.assert_close(compiled, eager, atol=1e-5, rtol=0)
