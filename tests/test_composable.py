"""AND sub-prompts (composable diffusion): one prediction per sub-prompt, combined before guidance."""

import pytest
import torch

from diffxattn.composable import Composable
from diffxattn.conditioning import embed_texts
from diffxattn.control import AttentionStore
from diffxattn.control.guided import Guide
from diffxattn.generation import generate
from conftest import seeded, tiny_pipeline


@pytest.fixture(scope="module")
def guided_pipe(tiny_text):
    return tiny_pipeline(tiny_text, default_steps=3, default_guidance_scale=3.0)


def test_the_unet_call_gets_one_row_per_sub_prompt_and_returns_the_combined_prediction(guided_pipe):
    pipe = guided_pipe
    texts = ["", "a red circle", "a blue square", "a green triangle"]  # unconditional, then the sub-prompts
    text = embed_texts(pipe, texts)
    x, t = torch.randn(1, 3, 16, 16), torch.tensor(500)

    def eps(rows):
        # the text positional, as UNet2DConditionModel.forward's third argument (pipelines pass it either way)
        return pipe.unet(x.expand(len(rows), -1, -1, -1), t, text.embeds[rows],
                         encoder_attention_mask=text.mask[rows]).sample

    with torch.no_grad():
        u, c1, c2, c3 = eps([0, 1, 2, 3]).chunk(4)
        pipe._guidance_scale = 3.0  # what the pipeline sets during a call: the batch is (unconditional, conditional)
        with Composable(pipe, text[2:], [1.0, 0.5, -0.25]):
            out = eps([0, 1])
    expected = u + 1.0 * (c1 - u) + 0.5 * (c2 - u) - 0.25 * (c3 - u)
    assert out.shape == (2, 3, 16, 16)
    torch.testing.assert_close(out[0:1], u, rtol=0, atol=1e-6)
    torch.testing.assert_close(out[1:2], expected, rtol=0, atol=1e-5)
    assert not pipe.unet._forward_hooks and not pipe.unet._forward_pre_hooks  # removed on exit


def test_and_of_a_prompt_with_itself_at_half_weight_each_is_the_plain_prompt(guided_pipe):
    def two(prompt, **kw):  # two images per prompt, each from its own fresh generator
        return generate(guided_pipe, prompt, generator=seeded(0, 2), num_images_per_prompt=2, output_type="pt",
                        **kw).images

    plain, both = two("a red circle"), two("a red circle :0.5 AND a red circle :0.5")
    other = two("a red circle AND a blue square")
    assert plain.shape == (2, 3, 16, 16)
    torch.testing.assert_close(both, plain, rtol=0, atol=1e-5)
    assert (other - plain).abs().max() > 1e-3
    # guidance in the first half of the steps only: guided steps combine with the unconditional rows, the others
    # take the weighted mean; both give the plain prompt back
    half = dict(guidance_interval=(0.0, 0.5))
    torch.testing.assert_close(two("a red circle :0.5 AND a red circle :0.5", **half), two("a red circle", **half),
                               rtol=0, atol=1e-5)


def test_and_without_classifier_free_guidance_takes_the_weighted_mean(tiny_pipe):
    plain = generate(tiny_pipe, "a red circle", generator=seeded(), output_type="pt", guidance_scale=1.0).images
    both = generate(tiny_pipe, "a red circle :2 AND a red circle :1", generator=seeded(), output_type="pt",
                    guidance_scale=1.0).images
    torch.testing.assert_close(both, plain, rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match=r"AND weights \[1.0, -1.0\] sum to 0"):
        generate(tiny_pipe, "a red circle AND a blue square :-1", guidance_scale=1.0)


def test_and_on_stable_diffusion(sd_pipe):
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="pt")
    plain = generate(sd_pipe, "a red circle", generator=seeded(), **kw).images
    both = generate(sd_pipe, "a red circle :0.5 AND a red circle :0.5", generator=seeded(), **kw).images
    torch.testing.assert_close(both, plain, rtol=0, atol=1e-5)


def test_and_refuses_what_it_cannot_combine(guided_pipe):
    with pytest.raises(ValueError, match="attention-guided sampling cannot be combined with AND"):
        generate(guided_pipe, "a red circle AND a blue square", guide=Guide(excite=("circle",)))
    with pytest.raises(ValueError, match=r"inside the AND sub-prompt 'a \[red:blue:0.5\] circle'"):
        generate(guided_pipe, "a [red:blue:0.5] circle AND a blue square")
    with AttentionStore(guided_pipe), pytest.raises(ValueError, match="attention controllers installed"):
        generate(guided_pipe, "a red circle AND a blue square")
