"""Attention control on Stable Diffusion XL: two tokenizers and text encoders, pooled embeddings and time ids.

The same guarantees as on Stable Diffusion: capture changes no bit, weight 1 changes no bit, processors come back
after every `with` block (also after an error), a word swap keeps the source's maps, guidance lowers its loss.
The refiner's layout (only the second text encoder, an aesthetic score among the time ids) is covered for capture
and weights.
"""

import copy

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline
from diffusers.models.attention_processor import AttnProcessor2_0

from diffxattn.conditioning import embed_texts, embed_weighted, prompt_tokens
from diffxattn.control import AttentionStore, StepRange, attention_layers
from diffxattn.control.edits import LocalBlend, PromptToPrompt
from diffxattn.control.guided import AttentionGuide, Guide
from diffxattn.control.processor import UnsupportedAttentionError, _INSTALLED
from diffxattn.generation import WEIGHT_MODES, edit, generate
from diffxattn.models import text as text_mod
from conftest import seeded, step_inputs

KW = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np")
# An image sampled in a batch of 2 against the same image alone: the same computation but for GEMM blocking,
# which follows the batch; on an AVX2-only CPU the [0, 1] pixels differ by up to 1.4e-5 (earlier machines stayed
# under 1e-5). A wrong text or pooled embedding moves them by more than 1e-3.
BATCH_ATOL = 1e-4


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from sd_tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


@pytest.fixture(scope="module")
def refiner(tmp_path_factory):
    from sd_tiny import tiny_sdxl_refiner

    return tiny_sdxl_refiner(tmp_path_factory.mktemp("refiner"))


def _untouched(pipe, before: dict) -> bool:
    """The pipeline's processors are the ones it had, and nothing of the control layer is left on it."""
    return ({n: m.processor for n, m in attention_layers(pipe.unet).items()} == before
            and id(pipe.unet) not in _INSTALLED and "encode_prompt" not in pipe.__dict__
            and not {"step", "set_timesteps", "set_begin_index"} & set(pipe.scheduler.__dict__) and not pipe.unet._forward_pre_hooks)


def _processors(pipe) -> dict:
    return {n: m.processor for n, m in attention_layers(pipe.unet).items()}


def test_the_tiny_sdxl_pipeline_has_sdxls_layout(sdxl, refiner):
    assert sdxl.unet.config.addition_embed_type == "text_time" and sdxl.unet.config.cross_attention_dim == 64
    assert sdxl.tokenizer_2.pad_token == "!" and sdxl.tokenizer.pad_token != "!"  # as SDXL's two tokenizers
    text = embed_texts(sdxl, ["a red circle"])
    assert text.embeds.shape == (1, 16, 64) and text.pooled.shape == (1, 32) and text.mask.all()
    assert refiner.tokenizer is None and refiner.text_encoder is None and refiner.config.requires_aesthetics_score
    assert embed_texts(refiner, ["a red circle"]).embeds.shape == (1, 16, 32)


def test_capture_on_sdxl_changes_no_bit_and_restores_everything(sdxl):
    before = _processors(sdxl)
    plain = sdxl("a red circle", generator=seeded(0), **KW).images
    with AttentionStore(sdxl, per_layer=True) as store:
        assert all(type(p).__name__ == "ControlledProcessor" for p in _processors(sdxl).values())
        captured = sdxl("a red circle", generator=seeded(0), **KW).images
    assert np.array_equal(plain, captured) and _untouched(sdxl, before)
    assert store.prompts == ["a red circle"] and store.steps_seen == {0, 1, 2}
    # SDXL's layout: attention below the top level only, two transformer blocks per attention
    assert store.captured_resolutions == [4] and len(store.layer_sums) == 8
    assert all(name.endswith("attn2") for name in store.layer_sums)
    maps = store.word_maps()
    assert list(maps) == ["a", "red", "circle"] and all(m.shape == (16, 16) for m in maps.values())
    tokens = store.token_maps()  # every position's share of each query's attention: rows sum to 1
    torch.testing.assert_close(tokens.sum(0), torch.ones(16, 16))


def test_processors_are_restored_after_an_error_inside_an_sdxl_run(sdxl):
    before = _processors(sdxl)

    def fail(pipe, i, t, tensors):
        raise RuntimeError("stop at step 1")

    with pytest.raises(RuntimeError, match="stop at step 1"):
        with AttentionStore(sdxl):
            generate(sdxl, "a (red:1.5) circle", callback_on_step_end=fail, **KW)
    assert _untouched(sdxl, before)
    with pytest.raises(RuntimeError, match="stop at step 1"):
        edit(sdxl, "a red circle", "a blue circle", local_blend=["red", "blue"], guide=Guide(excite=("circle",)),
             callback_on_step_end=fail, **KW)
    assert _untouched(sdxl, before)


@pytest.mark.parametrize("mode", WEIGHT_MODES)
def test_word_weights_on_sdxl(sdxl, mode):
    plain = sdxl("a red circle", generator=seeded(0), **KW).images
    one = generate(sdxl, "a (red:1.0) circle", weight_mode=mode, generator=seeded(0), **KW).images
    more = generate(sdxl, "a (red:1.8) circle", weight_mode=mode, generator=seeded(0), **KW).images
    less = generate(sdxl, "a (red:0.5) circle", weight_mode=mode, generator=seeded(0), **KW).images
    assert np.array_equal(one, plain)  # weight 1: the pipeline's own bits
    assert np.abs(more - plain).max() > 1e-3 and np.abs(less - plain).max() > 1e-3


def test_attention_weight_scales_only_the_weighted_tokens_probabilities_on_sdxl(sdxl):
    kw = {**KW, "num_inference_steps": 2}
    first = ["down_blocks.1.attentions.0.transformer_blocks.0.attn2"]  # the first cross-attention: same inputs
    with AttentionStore(sdxl, steps=(0, 1), layers=first) as plain:  # step 0: both runs start from the same noise
        generate(sdxl, "a red circle", generator=seeded(0), **kw)
    with AttentionStore(sdxl, steps=(0, 1), layers=first) as weighted:
        generate(sdxl, "a (red:2) circle", generator=seeded(0), **kw)
    (key, p), w = next(iter(plain.sums.items())), weighted.sums[(4, 4)]
    red = prompt_tokens(sdxl, "a red circle").positions(["red"])
    assert key == (4, 4) and red == [2]
    torch.testing.assert_close(w[..., 2], 2 * p[..., 2])
    others = [k for k in range(16) if k != 2]
    torch.testing.assert_close(w[..., others], p[..., others])


def test_embedding_weights_on_sdxl_act_on_both_encoders_and_keep_the_pooled_embedding(sdxl):
    plain = embed_texts(sdxl, ["a red circle"])
    empty = embed_texts(sdxl, [""])
    for mode in ("compel", "a1111"):
        same = embed_weighted(sdxl, ["a (red:1) circle"], mode)
        assert torch.equal(same.embeds, plain.embeds) and torch.equal(same.pooled, plain.pooled)
    doubled = embed_weighted(sdxl, ["a (red:2) circle"], "compel")
    expected = empty.embeds[0, 2] + 2 * (plain.embeds[0, 2] - empty.embeds[0, 2])  # all 64 channels: 32 + 32
    torch.testing.assert_close(doubled.embeds[0, 2], expected)
    assert torch.equal(doubled.embeds[0, [0, 1, 3]], plain.embeds[0, [0, 1, 3]])
    assert torch.equal(doubled.pooled, plain.pooled)
    removed = embed_weighted(sdxl, ["a (red:0) circle"], "compel")  # the run is hidden inside both encoders
    for half in (slice(0, 32), slice(32, 64)):  # later tokens of each encoder change, not only 'red' itself
        assert not torch.allclose(removed.embeds[0, 3, half], plain.embeds[0, 3, half])


def test_prompt_schedule_on_sdxl_switches_the_pooled_embedding_too(sdxl):
    plain = sdxl("a red circle", generator=seeded(0), **KW).images
    blue = embed_texts(sdxl, ["a blue circle"])
    seen = {}

    def record(pipe, i, t, tensors):
        seen[i] = {k: v.clone() for k, v in tensors.items()}

    never = generate(sdxl, "a [red:blue:3] circle", generator=seeded(0), **KW).images
    switched = generate(sdxl, "a [red:blue:1] circle", generator=seeded(0), callback_on_step_end=record,
                        callback_on_step_end_tensor_inputs=["prompt_embeds", "add_text_embeds"], **KW).images
    assert np.array_equal(never, plain) and np.abs(switched - plain).max() > 1e-3
    # after step 0 the conditional row (the second, under guidance) is the blue prompt's, pooled included
    torch.testing.assert_close(seen[0]["add_text_embeds"][1], blue.pooled[0].detach())
    torch.testing.assert_close(seen[0]["prompt_embeds"][1], blue.embeds[0].detach())
    assert not torch.allclose(seen[0]["add_text_embeds"][1], embed_texts(sdxl, ["a red circle"]).pooled[0])


def test_word_swap_edit_on_sdxl_keeps_the_sources_maps(sdxl):
    alone = sdxl("a red circle", generator=seeded(0), **KW).images[0]
    source, target = edit(sdxl, "a red circle", "a blue circle", **KW)
    np.testing.assert_allclose(source, alone, atol=BATCH_ATOL)
    assert np.abs(source - target).max() > 1e-3
    with AttentionStore(sdxl, steps=(0, 1)) as store, \
            PromptToPrompt(sdxl, "a red circle", "a blue circle", cross_replace=(0, 1.0)):
        sdxl(["a red circle", "a blue circle"], generator=seeded(0) + seeded(0), **KW)
    for key in store.sums:  # the target's cross-attention maps are the source's
        torch.testing.assert_close(store.sums[key][1], store.sums[key][0])
    featured = edit(sdxl, "a red circle", "a blue circle", feature_replace=(0, 0.5), **KW)
    np.testing.assert_allclose(featured.source, alone, atol=BATCH_ATOL)
    assert np.abs(featured.edited - target).max() > 1e-4  # the source's decoder features went in


def test_local_blend_on_sdxl_keeps_the_source_outside_the_mask(sdxl):
    with PromptToPrompt(sdxl, "a red circle", "a blue circle"), \
            LocalBlend(sdxl, ["a red circle", "a blue circle"], ["red", "blue"], threshold=0.9) as blend:
        latents = sdxl(["a red circle", "a blue circle"], generator=seeded(0) + seeded(0),
                       callback_on_step_end=blend.callback, **{**KW, "output_type": "latent"}).images
    outside = blend.mask[0, 0] == 0
    assert blend.mask.shape[-2:] == (8, 8) and outside.any() and not outside.all()
    assert torch.equal(latents[1][:, outside], latents[0][:, outside])
    assert not torch.equal(latents[1], latents[0])


@pytest.mark.parametrize("guidance_scale", [1.0, 4.0])
def test_guidance_on_sdxl_lowers_its_loss_with_and_without_classifier_free_guidance(sdxl, guidance_scale):
    kw = dict(num_inference_steps=4, guidance_scale=guidance_scale, output_type="np")
    guide = Guide(excite=("circle",), steps=StepRange.steps(0, 4), step_size=0.3, refine=())
    with AttentionGuide(sdxl, guide) as g:
        g.check(["a red circle"])
        tensors, t = step_inputs(sdxl, g, 2, **kw)
        assert set(g.tensor_inputs) >= {"add_text_embeds", "add_time_ids"}
        x = tensors["latents"]
        embeds, mask = g._text(tensors, 1)
        assert embeds.shape == (1, 16, 64) and g.added["text_embeds"].shape == (1, 32)
        assert g.added["time_ids"].shape == (1, 6)
        out = g.callback(sdxl, 1, t, tensors)["latents"]
        losses = [float(g._loss_and_grad(sdxl, y, t, embeds, mask)[0]) for y in (x, out)]
    assert losses[1] < losses[0]
    plain = sdxl("a red circle", generator=seeded(0), **kw).images
    guided = generate(sdxl, "a red circle", guide=guide, generator=seeded(0), **kw).images
    assert np.isfinite(guided).all() and np.abs(guided - plain).max() > 1e-3
    assert np.array_equal(sdxl("a red circle", generator=seeded(0), **kw).images, plain)  # all restored


# -- the refiner's layout: only the second text encoder --

def test_capture_and_weights_on_the_sdxl_refiner(refiner):
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(image=image, strength=1.0, num_inference_steps=3, guidance_scale=5.0, output_type="np")
    before = _processors(refiner)
    plain = refiner("a red circle", generator=seeded(0), **kw).images
    with AttentionStore(refiner) as store:
        captured = refiner("a red circle", generator=seeded(0), **kw).images
    assert np.array_equal(plain, captured) and _untouched(refiner, before)
    maps = store.word_maps()
    assert list(maps) == ["a", "red", "circle"] and all(m.shape == (16, 16) for m in maps.values())
    for mode in WEIGHT_MODES:
        one = generate(refiner, "a (red:1.0) circle", weight_mode=mode, generator=seeded(0), **kw).images
        more = generate(refiner, "a (red:1.8) circle", weight_mode=mode, generator=seeded(0), **kw).images
        assert np.array_equal(one, plain) and np.abs(more - plain).max() > 1e-3
    removed = embed_weighted(refiner, ["a (red:0) circle"], "compel")
    assert removed.embeds.shape == (1, 16, 32) and torch.isfinite(removed.embeds).all()


def test_the_refiners_steps_are_the_last_ones_of_the_run_its_strength_keeps(refiner):
    """A scheduler with `set_begin_index` (SDXL's Euler) is told where image-to-image starts; DDIM is not."""
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(
        **{**refiner.components, "scheduler": EulerDiscreteScheduler.from_config(refiner.scheduler.config)},
        requires_aesthetics_score=True)
    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    before = _processors(pipe)
    with AttentionStore(pipe, steps=StepRange.fraction(0.5, 1)) as store:
        pipe("a red circle", image=image, strength=0.5, num_inference_steps=4, output_type="np")
    assert store.num_steps == 4 and store.steps_seen == {2, 3} and _untouched(pipe, before)


# -- two tokenizers that disagree --

def test_tokenizers_that_split_a_word_differently_are_an_error_naming_it(sdxl, tmp_path):
    other = text_mod.build_tokenizer(["a red thing"], tmp_path / "other", max_length=16)  # 'circle' unmerged
    pipe = StableDiffusionXLPipeline(**{**sdxl.components, "tokenizer_2": other})
    assert prompt_tokens(pipe, "a red").words == [("a", [1]), ("red", [2])]  # where they agree: fine
    message = r"the pipeline's two tokenizers split the word 'circle' of 'a red circle' differently"
    with pytest.raises(ValueError, match=message):
        generate(pipe, "a red circle", **KW)
    with pytest.raises(ValueError, match=message):
        PromptToPrompt(pipe, "a red circle", "a blue circle")
    with pytest.raises(ValueError, match=r"read 16 and 8 tokens"):
        short = text_mod.build_tokenizer(["a red circle"], tmp_path / "short", max_length=8)
        prompt_tokens(StableDiffusionXLPipeline(**{**sdxl.components, "tokenizer_2": short}), "a red circle")


# -- any UNet2DConditionModel: what the control layer does not cover is an error, never a silent no-op --

class RenamedProcessor(AttnProcessor2_0):
    """A processor class the control layer does not know (it could compute anything)."""


class OtherAttention(torch.nn.Module):
    """An attention module of another kind: it has a processor, but it is not a diffusers Attention."""

    def __init__(self):
        super().__init__()
        self.processor = AttnProcessor2_0()

    def set_processor(self, processor):
        self.processor = processor


def _sd_with(sd_pipe, change):
    unet = copy.deepcopy(sd_pipe.unet)
    change(unet)
    return StableDiffusionPipeline(**{**sd_pipe.components, "unet": unet})


@pytest.mark.parametrize("case", ["processor", "module", "multihead"])
def test_attention_the_control_layer_does_not_cover_is_an_error_naming_the_layer(sd_pipe, case):
    layer = "down_blocks.0.attentions.0.transformer_blocks.0.attn2"
    if case == "processor":
        pipe = _sd_with(sd_pipe, lambda unet: unet.get_submodule(layer).set_processor(RenamedProcessor()))
        message = rf"attention layer '{layer}' uses processor test_sdxl.RenamedProcessor, which diffxattn's"
    elif case == "module":
        pipe = _sd_with(sd_pipe, lambda unet: unet.get_submodule(layer.rsplit(".", 1)[0]).add_module(
            "extra", OtherAttention()))
        message = (r"attention module 'down_blocks.0.attentions.0.transformer_blocks.0.extra' is a "
                   r"test_sdxl.OtherAttention \(processor AttnProcessor2_0\), not a diffusers Attention layer")
    else:
        pipe = _sd_with(sd_pipe, lambda unet: unet.get_submodule(layer.rsplit(".", 1)[0]).add_module(
            "mha", torch.nn.MultiheadAttention(32, 2)))
        message = r"attention module 'down_blocks.0.attentions.0.transformer_blocks.0.mha' is a torch.nn"
    before = _processors(pipe)
    with pytest.raises(UnsupportedAttentionError, match=message) as error:
        with AttentionStore(pipe):
            pass
    assert "\n" not in str(error.value) and isinstance(error.value, ValueError)  # one line, a user error
    with pytest.raises(UnsupportedAttentionError, match=message):
        generate(pipe, "a (red:1.5) circle", **KW)
    assert _untouched(pipe, before)  # nothing was installed


def test_a_known_processor_set_by_the_user_is_covered(sd_pipe):
    from diffusers.models.attention_processor import AttnProcessor

    pipe = _sd_with(sd_pipe, lambda unet: unet.set_attn_processor(AttnProcessor()))  # explicit softmax
    plain = pipe("a red circle", generator=seeded(0), **KW).images
    with AttentionStore(pipe) as store:
        captured = pipe("a red circle", generator=seeded(0), **KW).images
    assert np.array_equal(plain, captured) and list(store.word_maps()) == ["a", "red", "circle"]


def test_heatmap_export_on_the_sdxl_refiner_reads_its_only_tokenizer(refiner, tmp_path):
    import json

    from diffxattn import heatmaps

    image = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with AttentionStore(refiner) as store:
        out = refiner("a red circle", image=image, strength=1.0, num_inference_steps=2, output_type="pil").images[0]
    heatmaps.export(tmp_path, store, out, "a red circle")
    meta = json.loads((tmp_path / "maps.json").read_text())
    assert meta["words"] == ["a", "red", "circle"] and meta["tokens"][0] == "<|startoftext|>"


def test_and_sub_prompts_on_sdxl_carry_their_own_pooled_embedding(sdxl):
    kw = {**KW, "output_type": "pt"}
    plain = generate(sdxl, "a red circle", generator=seeded(0), **kw).images
    halves = generate(sdxl, "a red circle :0.5 AND a red circle :0.5", generator=seeded(0), **kw).images
    torch.testing.assert_close(halves, plain, rtol=0, atol=BATCH_ATOL)
    both = generate(sdxl, "a red circle AND a blue square", generator=seeded(0), **kw).images
    swapped = generate(sdxl, "a blue square AND a red circle", generator=seeded(0), **kw).images
    # the sum over sub-prompts does not depend on their order only if each row has its own text and pooled embedding
    torch.testing.assert_close(swapped, both, rtol=0, atol=BATCH_ATOL)
    assert (both - plain).abs().max() > 1e-3
