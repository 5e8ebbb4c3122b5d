import numpy as np
import pytest
import torch

from diffxattn.control import AttentionStore, StepRange
from diffxattn.conditioning import weighted_embeddings
from diffxattn.control.edits import AttentionReweight, PromptToPrompt, token_mapper
from diffxattn.generation import edit, generate
from diffxattn.models import text as text_mod
from conftest import seeded

KW = dict(output_type="np", guidance_scale=2.0)


def test_attention_reweight_of_one_is_bit_identical(tiny_pipe):
    plain = tiny_pipe("a red circle", generator=seeded(0), **KW).images
    with AttentionReweight(tiny_pipe, torch.ones(1, 16)):
        same = tiny_pipe("a red circle", generator=seeded(0), **KW).images
    assert np.array_equal(plain, same)
    assert np.array_equal(plain, generate(tiny_pipe, "a (red:1.0) circle", generator=seeded(0), **KW).images)
    changed = generate(tiny_pipe, "a (red:1.8) circle", generator=seeded(0), **KW).images
    assert not np.array_equal(plain, changed)


def test_attention_reweight_changes_only_the_target_tokens_columns(tiny_pipe):
    weights = torch.ones(1, 16)
    weights[0, 2] = 2.5  # "red"
    with AttentionStore(tiny_pipe, steps=(0, 1), per_layer=True) as plain:
        plain.observes_inputs = False  # the layer's probabilities as an edit sees them (not the store's batched ones)
        tiny_pipe("a red circle", generator=seeded(0), **KW)
    with AttentionStore(tiny_pipe, steps=(0, 1), per_layer=True) as store, AttentionReweight(tiny_pipe, weights):
        tiny_pipe("a red circle", generator=seeded(0), **KW)
    first = next(iter(plain.layer_sums))  # the first cross-attention layer of step 0 sees identical inputs
    a, b = plain.layer_sums[first][0], store.layer_sums[first][0]  # (N, S)
    torch.testing.assert_close(b[..., 2], a[..., 2] * 2.5)
    cols = [i for i in range(16) if i != 2]
    assert torch.equal(b[..., cols], a[..., cols])


def test_embedding_weight_one_is_identical_and_weights_move_the_embedding(tiny_pipe):
    z, _ = tiny_pipe.encode_prompt(["a red circle"])
    for mode in ("compel", "a1111"):
        same, _ = weighted_embeddings(tiny_pipe, ["a (red:1) circle"], mode)
        assert torch.equal(same, z)
    plain = tiny_pipe("a red circle", generator=seeded(0), **KW).images
    one = generate(tiny_pipe, "a (red:1.0) circle", weight_mode="embedding", generator=seeded(0), **KW).images
    assert np.array_equal(plain, one)
    z2, _ = weighted_embeddings(tiny_pipe, ["a (red:2) circle"], "compel")
    z_empty, _ = tiny_pipe.encode_prompt([""])
    torch.testing.assert_close(z2[0, 2], z_empty[0, 2] + 2 * (z[0, 2] - z_empty[0, 2]))
    torch.testing.assert_close(z2[0, 3], z[0, 3])

def test_embedding_down_weight_fades_the_word_out_of_later_tokens(tiny_pipe):
    """compel's down-weighting: lerp towards the prompt encoded with the word hidden from the other tokens."""
    ids, _ = text_mod.tokenize(tiny_pipe.tokenizer, ["a red circle"])
    hide = torch.zeros_like(ids, dtype=torch.bool)
    hide[0, 2] = True  # BOS a [red] circle EOS
    without = text_mod.encode(tiny_pipe.text_encoder, ids, hide)
    z, _ = tiny_pipe.encode_prompt(["a red circle"])
    assert torch.equal(without[0, :2], z[0, :2])  # causal: tokens before the word are unchanged
    assert not torch.allclose(without[0, 3], z[0, 3])  # "circle" no longer carries "red"
    z_empty, _ = tiny_pipe.encode_prompt([""])
    zero, _ = weighted_embeddings(tiny_pipe, ["a (red:0) circle"], "compel")
    torch.testing.assert_close(zero[0, 3:], without[0, 3:], atol=1e-4, rtol=0)  # weight 0: the word is gone
    half, _ = weighted_embeddings(tiny_pipe, ["a (red:0.5) circle"], "compel")
    base = z.clone()
    base[0, 2] = z_empty[0, 2] + 0.5 * (z[0, 2] - z_empty[0, 2])
    torch.testing.assert_close(half, (base + without) / 2)  # weight 0.5: half-way (lerp weight tan(pi/4) = 1)



def test_token_mapper_swap_and_refine(tiny_pipe):
    tok = tiny_pipe.tokenizer
    mapper, swap = token_mapper(tok, "a red circle", "a blue circle")
    assert swap and mapper.tolist() == list(range(16))
    mapper, swap = token_mapper(tok, "a red circle", "a large red circle")
    assert not swap
    assert mapper[:6].tolist() == [0, 1, -1, 2, 3, 4]  # BOS a [large] red circle EOS


def test_word_swap_keeps_source_maps_and_changes_the_image(tiny_pipe):
    src, tgt = edit(tiny_pipe, "a red circle", "a blue circle", num_inference_steps=4, output_type="np")
    alone = tiny_pipe("a red circle", generator=seeded(0), output_type="np").images[0]
    np.testing.assert_allclose(src, alone, atol=1e-5)  # the source row is an ordinary generation
    assert not np.allclose(src, tgt)
    with AttentionStore(tiny_pipe, steps=(0, 1)) as store, \
            PromptToPrompt(tiny_pipe, "a red circle", "a blue circle", cross_replace=(0, 1.0)):
        tiny_pipe(["a red circle", "a blue circle"], generator=seeded(0, 1) * 2)
    for key in store.sums:  # the target's cross-attention maps are the source's
        torch.testing.assert_close(store.sums[key][1], store.sums[key][0])


def test_per_word_cross_replace_and_bad_word(tiny_pipe):
    p2p = PromptToPrompt(tiny_pipe, "a red circle", "a blue circle", cross_replace={"default": (0, 1.0), "blue": (0, 0.25)})
    assert p2p.cross_ranges[2] == StepRange.fraction(0, 0.25) and p2p.cross_ranges[3] == StepRange.fraction(0, 1)
    with pytest.raises(ValueError, match="cross_replace names \\['green'\\]"):
        PromptToPrompt(tiny_pipe, "a red circle", "a blue circle", cross_replace={"green": (0, 1.0)})


def test_local_blend_keeps_pixels_outside_the_mask(tiny_pipe):
    src, tgt = edit(tiny_pipe, "a red circle", "a blue circle", local_blend=["red", "blue"], blend_threshold=0.99,
                    num_inference_steps=6, output_type="np")
    assert not np.allclose(src, tgt)
    from diffxattn.control.edits import LocalBlend  # the mask of the last step decides what was kept
    with PromptToPrompt(tiny_pipe, "a red circle", "a blue circle"), \
            LocalBlend(tiny_pipe, ["a red circle", "a blue circle"], ["red", "blue"], threshold=0.99) as blend:
        s, t = tiny_pipe(["a red circle", "a blue circle"], generator=seeded(0, 1) * 2, num_inference_steps=6,
                         callback_on_step_end=blend.callback, output_type="np").images
    outside = blend.mask[0, 0].numpy() == 0
    assert outside.any() and not outside.all()
    assert np.abs(s - t)[outside].mean() < 2 / 255


def test_prompt_editing_over_steps(tiny_pipe):
    plain_red = generate(tiny_pipe, "a red circle", generator=seeded(0), num_inference_steps=4, **KW).images
    switched = generate(tiny_pipe, "a [red:blue:2] circle", generator=seeded(0), num_inference_steps=4, **KW).images
    never = generate(tiny_pipe, "a [red:blue:4] circle", generator=seeded(0), num_inference_steps=4, **KW).images
    assert np.array_equal(never, plain_red) and not np.array_equal(switched, plain_red)


def test_feature_replace_gives_the_target_the_sources_decoder_features(tiny_pipe):
    layer = tiny_pipe.unet.get_submodule("up_blocks.0.resnets.0")
    seen = []  # the features the next layer (the ResBlock's transformer block) receives
    probe = tiny_pipe.unet.get_submodule("up_blocks.0.attentions.0").register_forward_pre_hook(
        lambda m, args: seen.append(args[0].clone()))
    try:
        kw = dict(num_inference_steps=4, guidance_scale=2.0, output_type="np")  # rows: [u_src, u_tgt, c_src, c_tgt]
        plain = edit(tiny_pipe, "a red circle", "a blue circle", **kw)
        assert all(not torch.equal(out[1], out[0]) for out in seen[1:])
        seen.clear()
        with PromptToPrompt(tiny_pipe, "a red circle", "a blue circle", feature_replace=(0, 2)) as p2p:
            assert len(p2p.hooks) == 1
            tiny_pipe(p2p.prompts, generator=seeded(0) + seeded(0), **kw)
        assert len(seen) == 4 and all(out.shape[0] == 4 for out in seen)
        for step, out in enumerate(seen):  # steps 0 and 1 injected, 2 and 3 not
            assert torch.equal(out[1], out[0]) == torch.equal(out[3], out[2]) == (step < 2)
        injected = edit(tiny_pipe, "a red circle", "a blue circle", feature_replace=(0, 1.0), **kw)
        np.testing.assert_array_equal(injected[0], plain[0])  # the source is untouched
        assert not np.array_equal(injected[1], plain[1])
    finally:
        probe.remove()
    assert not layer._forward_hooks  # the controller's hook is gone after the edit
    with pytest.raises(ValueError, match=r"feature layers \['up_blocks.9.resnets.0'\] are not modules of the UNet; "
                                         r"its ResBlocks are \['down_blocks.0.resnets.0'"):
        PromptToPrompt(tiny_pipe, "a red circle", "a blue circle", feature_layers=["up_blocks.9.resnets.0"])


def test_weights_and_step_schedules_on_stable_diffusion(sd_pipe):
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    plain = sd_pipe("a red circle", generator=seeded(0), **kw).images
    for mode in ("attention", "embedding"):  # weight 1: the same bits as the pipeline's own call
        one = generate(sd_pipe, "a (red:1.0) circle", weight_mode=mode, generator=seeded(0), **kw).images
        more = generate(sd_pipe, "a (red:1.8) circle", weight_mode=mode, generator=seeded(0), **kw).images
        assert np.array_equal(one, plain) and not np.allclose(more, plain)
    never = generate(sd_pipe, "a [red:blue:4] circle", generator=seeded(0), **kw).images
    switched = generate(sd_pipe, "a [red:blue:2] circle", generator=seeded(0), **kw).images
    blue = sd_pipe("a blue circle", generator=seeded(0), **kw).images
    assert np.array_equal(never, plain) and not np.allclose(switched, plain) and not np.allclose(switched, blue)


def test_prompt_to_prompt_edits_on_stable_diffusion(sd_pipe):
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    alone = sd_pipe("a red circle", generator=seeded(0), **kw).images[0]
    src, tgt = edit(sd_pipe, "a red circle", "a blue circle", **kw)
    np.testing.assert_allclose(src, alone, atol=1e-5)
    assert not np.allclose(src, tgt)
    with AttentionStore(sd_pipe, steps=(0, 1)) as store, \
            PromptToPrompt(sd_pipe, "a red circle", "a blue circle", cross_replace=(0, 1.0), feature_replace=(0, 0.5)):
        sd_pipe(["a red circle", "a blue circle"], generator=seeded(0) + seeded(0), **kw)
    for key in store.sums:  # the target's cross-attention maps are the source's
        torch.testing.assert_close(store.sums[key][1], store.sums[key][0])
    featured = edit(sd_pipe, "a red circle", "a blue circle", feature_replace=(0, 0.5), **kw)
    np.testing.assert_allclose(featured[0], alone, atol=1e-5)
    assert not np.allclose(featured[1], tgt)
    refined = edit(sd_pipe, "a red circle", "a large red circle", **kw)
    assert refined[0].shape == refined[1].shape == (16, 16, 3) and not np.allclose(*refined)
    from diffxattn.control.edits import LocalBlend
    with PromptToPrompt(sd_pipe, "a red circle", "a blue circle"), \
            LocalBlend(sd_pipe, ["a red circle", "a blue circle"], ["red", "blue"], threshold=0.99) as blend:
        latents = sd_pipe(["a red circle", "a blue circle"], generator=seeded(0) + seeded(0),
                          callback_on_step_end=blend.callback, **{**kw, "output_type": "latent"}).images
    outside = blend.mask[0, 0] == 0  # latent pixels (8x8) outside the mask keep the source's latents
    assert blend.mask.shape[-2:] == (8, 8) and outside.any() and not outside.all()
    assert torch.equal(latents[1][:, outside], latents[0][:, outside])
    assert not torch.equal(latents[1], latents[0])


@pytest.mark.parametrize("which", ["tiny_pipe", "sd_pipe"])
def test_a_user_callback_and_a_prompt_schedule_both_take_effect(which, request):
    pipe = request.getfixturevalue(which)
    kw = dict(num_inference_steps=4, guidance_scale=5.0, output_type="np")
    calls = []

    def brighten(pipe, step, timestep, tensors):  # the user's own step callback
        calls.append(step)
        return {"latents": tensors["latents"] + 0.05}

    schedule_only = generate(pipe, "a [red:blue:2] circle", generator=seeded(0), **kw).images
    red_and_callback = generate(pipe, "a red circle", generator=seeded(0), callback_on_step_end=brighten, **kw).images
    both = generate(pipe, "a [red:blue:2] circle", generator=seeded(0), callback_on_step_end=brighten, **kw).images
    assert calls == [0, 1, 2, 3] * 2
    assert not np.allclose(both, schedule_only)  # the callback acted...
    assert not np.allclose(both, red_and_callback)  # ...and so did the schedule


def test_edit_runs_a_user_callback_after_local_blend_on_stable_diffusion(sd_pipe):
    seen = []

    def record(pipe, step, timestep, tensors):  # the user's callback sees the latents local blend left
        seen.append(tensors["latents"].clone())

    result = edit(sd_pipe, "a red circle", "a blue circle", local_blend=["red", "blue"], blend_threshold=0.99,
                  callback_on_step_end=record, num_inference_steps=4, guidance_scale=5.0, output_type="latent")
    assert len(seen) == 4 and torch.equal(seen[-1], torch.stack(list(result)))
    outside = ~result.mask[::2, ::2]  # the image-size mask back at the 8x8 latents (vae_scale_factor 2)
    assert result.mask.shape == (16, 16) and outside.any() and not outside.all()
    assert torch.equal(seen[-1][1][:, outside], seen[-1][0][:, outside])
