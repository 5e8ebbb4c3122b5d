"""Attention-guided sampling: the losses on hand-made maps, guided steps on both UNets, bit-identical without it,
the command-line options and their errors, and the eval's guided and box scores."""

import math
import re

import numpy as np
import pytest
import torch
from PIL import Image

from diffxattn import cli
from diffxattn.cli import main
from diffxattn.control import AttentionStore, StepRange
from diffxattn.control.guided import (BOX_METHODS, AttentionGuide, Guide, bind_loss, box_loss, box_mask, excite_loss,
                                      layout_score, move_into_box, object_center, object_spread, parse_options,
                                      plan, text_maps)
from diffxattn.eval.detector import detect
from diffxattn.eval.metrics import box_iou, object_box_iou
from diffxattn.eval.prompts import box_prompts
from diffxattn.eval.run import evaluate, format_report
from diffxattn.generation import edit, generate
from conftest import seeded, step_inputs

KW = dict(output_type="np", guidance_scale=2.0)
LEFT, RIGHT = (slice(None), slice(0, 8)), (slice(None), slice(8, 16))


def blob(region, value: float = 1.0, size: int = 16) -> torch.Tensor:
    m = torch.full((size, size), 0.01)
    m[region] = value
    return m


# -- the losses, on maps made by hand --

def test_excite_loss_is_lower_for_a_word_with_a_strong_peak():
    peaked, flat = blob(LEFT), torch.full((16, 16), 0.2)
    assert excite_loss([peaked]) < 0.05 < 0.75 < excite_loss([flat])
    assert excite_loss([peaked, flat]) == excite_loss([flat])  # the weakest word decides


@pytest.mark.parametrize("kind", ["jsd", "syngen"])
def test_bind_loss_is_lower_when_the_attribute_lies_on_its_noun(kind):
    circle, square = blob(LEFT), blob(RIGHT)
    right = bind_loss([(blob(LEFT, 0.7), circle, [square])], kind)
    wrong = bind_loss([(blob(RIGHT, 0.7), circle, [square])], kind)
    assert right < wrong
    if kind == "jsd":  # JS divergence over ln 2: 0 for the same distribution, near 1 for disjoint ones
        assert right < 0.01 and wrong > 0.9


def test_box_loss_is_lower_for_a_map_inside_its_box():
    box = (0.0, 0.0, 0.5, 1.0)  # the left half
    assert box_mask(box, 16, 16)[:, :8].all() and not box_mask(box, 16, 16)[:, 8:].any()
    assert box_loss(blob(LEFT), box) < 0.05 < 0.6 < box_loss(blob(RIGHT), box)
    assert box_mask((0.5, 0.5, 0.52, 0.52), 8, 8).sum() == 1  # smaller than a cell: the cell holding it


def test_object_center_is_the_peak_of_a_words_map():
    m = blob((slice(2, 6), slice(10, 14)))  # rows 2-5, columns 10-13 of 16
    assert object_center(m) == pytest.approx((12 / 16, 4 / 16))
    m[0, 0] = 0.3  # weak attention elsewhere hardly moves it (4th power of the excess over the mean)
    assert object_center(m) == pytest.approx((12 / 16, 4 / 16), abs=0.01)
    assert object_center(torch.full((16, 16), 0.2)) is None


def test_moving_into_a_box_carries_the_object_and_permutes_the_latents():
    x = torch.randn(2, 32, 32)
    x[:, 4:12, 4:12] = 5.0  # an 8x8 object at the upper left, centered at (0.25, 0.25)
    box = (0.5, 0.5, 0.75, 0.75)  # the same size, centered at (0.625, 0.625): 12 pixels right and down
    y = move_into_box(x, (0.25, 0.25), box)
    assert (y[:, 16:24, 16:24] == 5.0).all() and (y == 5.0).sum() == (x == 5.0).sum()
    assert torch.equal(y.flatten().sort().values, x.flatten().sort().values)  # a permutation: the noise's statistics
    # the windows (10x10: 3-12 around the object, 15-24 at the box) are apart: they swap, every other pixel stays
    assert torch.equal(y[:, 3:13, 3:13], x[:, 15:25, 15:25])
    outside = torch.ones(32, 32, dtype=torch.bool)
    outside[3:13, 3:13] = outside[15:25, 15:25] = False
    assert torch.equal(y[:, outside], x[:, outside])
    # overlapping windows (a 2-pixel move): still a permutation, the object still carried
    z = move_into_box(x, (0.25, 0.25), (0.1875, 0.125, 0.4375, 0.375))
    assert (z[:, 4:12, 6:14] == 5.0).all() and torch.equal(z.flatten().sort().values, x.flatten().sort().values)
    assert move_into_box(x, (0.25, 0.25), (0.125, 0.125, 0.375, 0.375)) is x  # already centered


def test_text_maps_renormalize_the_words_only():
    maps = torch.rand(6, 4, 4)
    text = text_maps(maps, eos=4)
    torch.testing.assert_close(text[1:4].sum(0), torch.ones(4, 4))
    assert text[0].abs().sum() == 0 and text[4:].abs().sum() == 0
    sharp = text_maps(maps, eos=4, temperature=0.01)  # Attend-and-Excite's softmax(100 p)
    torch.testing.assert_close(sharp[1:4], torch.softmax(maps[1:4] * 100, dim=0))


# -- words and options --

def test_words_are_addressed_as_heatmaps_address_them(tiny_pipe):
    p = plan(tiny_pipe.tokenizer, "a red circle left of a blue circle", Guide(excite=("circle#2",), bind="auto"))
    assert p.excite == [[8]]  # BOS is 0: a red circle left of a blue circle#2
    assert [(a, n) for a, n, _ in p.bind] == [([2], [3]), ([7], [8])]
    assert p.bind[0][2] == [[7], [8]]  # the other object's words
    with pytest.raises(ValueError, match=r"excite word 'square' is not in the prompt 'a red circle'; its words: a, "
                                         r"red, circle"):
        plan(tiny_pipe.tokenizer, "a red circle", Guide(excite=("square",)))
    with pytest.raises(ValueError, match="'auto' guidance needs a prompt in the shapes scenes' grammar"):
        plan(tiny_pipe.tokenizer, "a photo of a cat", Guide(bind="auto"))


def test_options_parse_and_bad_values_name_themselves():
    g = parse_options("circle,square", "red=circle, blue=square", ["circle=0,0,0.5,0.5"], step_size=0.2, steps=None)
    assert g.excite == ("circle", "square") and g.bind == (("red", "circle"), ("blue", "square"))
    assert g.boxes == (("circle", (0.0, 0.0, 0.5, 0.5)),) and g.step_size == 0.2 and g.steps == StepRange.fraction(0, 0.5)
    assert parse_options(bind="auto").bind == "auto" and not parse_options()
    assert parse_options(arrange="auto").arrange == "auto"
    assert parse_options(arrange="cat, dog").arrange == ("cat", "dog")
    for kwargs, message in [({"boxes": ["circle=0.5,0.5,1.2,1"]}, "box of 'circle' 0.5,0.5,1.2,1: expected fractions"),
                            ({"boxes": ["circle=0.2,0.2,0.1,0.5"]}, "0 <= x0 < x1 <= 1"),
                            ({"boxes": ["circle=nan,0,1,1"]}, "box of 'circle' nan"),
                            ({"boxes": ["circle=0,0,1"]}, "expected WORD=x0,y0,x1,y1, four numbers"),
                            ({"bind": "red"}, "--bind 'red': expected ATTRIBUTE=NOUN"),
                            ({"excite": "circle,,square"}, "expected comma-separated words"),
                            ({"excite": "circle", "bind_loss": "l2"}, "bind loss 'l2'; expected one of"),
                            ({"excite": "circle", "step_size": -1.0}, "step_size=-1.0; expected a positive number"),
                            ({"excite": "circle", "iterations": 0}, "iterations=0; expected a whole number"),
                            ({"box_method": "dense"}, "box method 'dense'; expected one of ('move', 'gradient')"),
                            ({"moves": (0.4, 1.0)}, "moves=(0.4, 1.0); expected step fractions strictly between"),
                            ({"moves": "early"}, "moves='early'; expected step fractions"),
                            ({"arrange": "circle,"}, "--arrange 'circle,': expected comma-separated words"),
                            ({"arrange": "auto", "candidates": 1}, "candidates=1; expected a whole number >= 2"),
                            ({"arrange": "auto", "arrange_at": 1.0}, "arrange_at=1.0; expected a step fraction")]:
        with pytest.raises(ValueError, match=re.escape(message)):
            parse_options(**kwargs)


def dot(col: int, row: int, size: int = 16) -> torch.Tensor:
    """A map whose attention is all in one cell: its center ((col + 0.5) / size, (row + 0.5) / size), spread 0."""
    m = torch.zeros(size, size)
    m[row, col] = 1.0
    return m


def test_layout_score_rewards_the_relation_two_places_and_one_place_per_object():
    left, right, top, below_top = dot(3, 8), dot(11, 8), dot(7, 2), dot(7, 4)  # left and right: 0.5 apart
    assert layout_score([left, right], ["left of"]) == pytest.approx(0.5 + 0.15)  # obeyed: offset + capped distance
    assert layout_score([right, left], ["left of"]) == pytest.approx(-0.5 + 0.15)  # the other way round
    assert layout_score([left, left], ["left of"]) == pytest.approx(0, abs=1e-6)  # one place for both objects
    assert layout_score([top, below_top], ["above"]) == pytest.approx(0.125 + 0.0625)
    assert layout_score([top, below_top], ["below"]) == pytest.approx(-0.125 + 0.0625)
    assert layout_score([left, right], [None]) == pytest.approx(0.15)  # no relation: apart is what counts
    assert layout_score([left, right, top], ["left of", None]) == pytest.approx(0.65 + 0.5 * min(0.3, math.hypot(
        0.25, 0.375)))  # each consecutive pair
    twice = dot(2, 8) + dot(13, 8)  # a word attending in two places: its object drawn twice
    assert object_spread(left) == pytest.approx(0, abs=1e-6) and object_spread(twice) == pytest.approx(5.5 / 16)
    assert object_spread(torch.full((16, 16), 0.25)) == 1.0  # a flat map: no object
    assert layout_score([twice, top], [None], spread_weight=0) == pytest.approx(0.15)
    assert layout_score([twice, top], [None]) == pytest.approx(0.15 - 4 * 5.5 / 16)  # the worst spread counts
    assert layout_score([left], []) == pytest.approx(0, abs=1e-6)


def test_arrange_plans_the_objects_and_the_relations_between_them(tiny_pipe):
    p = plan(tiny_pipe.tokenizer, "a red circle left of a blue square", Guide(arrange="auto"))
    assert p.arrange == [[3], [8]] and p.relations == ["left of"]
    p = plan(tiny_pipe.tokenizer, "a small red circle to the right of a large blue square", Guide(arrange="auto"))
    assert p.relations == ["right of"]
    p = plan(tiny_pipe.tokenizer, "a red circle above a blue square", Guide(arrange=("square", "circle")))
    assert p.arrange == [[7], [3]] and p.relations == [None]  # named the other way: no relation between them
    assert plan(tiny_pipe.tokenizer, "a red circle", Guide(arrange="auto")).arrange == [[3]]
    with pytest.raises(ValueError, match="arrange word 'cat' is not in the prompt 'a red circle'"):
        plan(tiny_pipe.tokenizer, "a red circle", Guide(arrange=("cat", "circle")))


# -- guided sampling --

def test_without_guidance_images_and_captured_maps_are_bit_identical(tiny_pipe):
    with AttentionStore(tiny_pipe) as store:
        plain = tiny_pipe("a red circle", generator=seeded(0), **KW).images
    plain_maps = store.token_maps(0)
    assert np.array_equal(plain, generate(tiny_pipe, "a red circle", guide=Guide(), generator=seeded(0), **KW).images)
    # installed, but its steps never come: the images and the maps another controller captures are unchanged
    with AttentionStore(tiny_pipe) as store, AttentionGuide(tiny_pipe, Guide(excite=("circle",),
                                                                           steps=StepRange.steps(0, 0))) as g:
        same = tiny_pipe("a red circle", generator=seeded(0), **g.kwargs(), **KW).images
    assert np.array_equal(plain, same) and torch.equal(plain_maps, store.token_maps(0)) and g.losses == {}


def _share_inside(pipe, x, t, embeds, mask, word: str, region) -> float:
    """The share of `word`'s attention (among the words) that falls in `region`, from one UNet call."""
    with AttentionStore(pipe) as store:
        pipe.unet(x, t, encoder_hidden_states=embeds, encoder_attention_mask=mask)
    m = store.word_maps(0, prompt="a red circle", normalize="share")[word]
    return float(m[region].sum() / m.sum())


@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_a_gradient_step_moves_the_words_attention_into_its_box(tiny_pipe, guidance_scale):
    guide = Guide(boxes=(("circle", (0.0, 0.0, 0.5, 1.0)),), box_method="gradient", steps=StepRange.steps(0, 4),
                  step_size=0.5, refine=())
    with AttentionGuide(tiny_pipe, guide) as g:
        g.check(["a red circle"])
        tensors, t = step_inputs(tiny_pipe, g, 2, guidance_scale=guidance_scale, output_type="np")
        x = tensors["latents"]
        embeds, mask = g._text(tensors, 1)  # the conditional row, under guidance and without
        moved = g.callback(tiny_pipe, 1, t, tensors)["latents"]
        losses = [float(g._loss_and_grad(tiny_pipe, y, t, embeds, mask)[0]) for y in (x, moved)]
    shares = [_share_inside(tiny_pipe, y, t, embeds, mask, "circle", LEFT) for y in (x, moved)]
    assert losses[1] < losses[0] and shares[1] > shares[0], (losses, shares)
    assert embeds.shape[0] == 1
    # the step moves objects, never tints: each channel's mean over the image is unchanged
    torch.testing.assert_close(moved.mean((-2, -1)), x.mean((-2, -1)), atol=1e-5, rtol=0)
    assert float((moved - x).abs().max()) > 0.1


@pytest.mark.parametrize("shared", [False, True])
def test_a_move_step_rolls_each_boxed_object_to_its_box_as_its_map_places_it(tiny_pipe, shared):
    boxes = (("circle", (0.0, 0.0, 0.5, 0.5)), ("red", (0.5, 0.5, 1.0, 1.0)))
    guide = Guide(boxes=boxes, moves=(0.5,))  # step 2 of 4; no gradient (no loss: boxes by move)
    with AttentionGuide(tiny_pipe, guide, shared=shared) as g:
        g.check(["a red circle"])
        tensors, t = step_inputs(tiny_pipe, g, 2, guidance_scale=2.0, output_type="np", num_images_per_prompt=2)
        x = tensors["latents"]
        embeds, mask = g._text(tensors, 2)
        assert g.callback(tiny_pipe, 0, t, tensors) == {}  # not a move step
        moved = g.callback(tiny_pipe, 1, t, tensors)["latents"]
        expected, words = x, g.plans[0].boxes
        for positions, box in words:  # one word after the other, each located on the latents the last one left
            with torch.no_grad():
                maps = g._probe(tiny_pipe, expected[:1] if shared else expected, t, embeds, mask)
            centers = [object_center(text_maps(maps[0 if shared else r], g.plans[0].eos)[positions].mean(0))
                       for r in range(2)]
            expected = torch.stack([move_into_box(expected[r], centers[r], box) for r in range(2)])
    assert torch.equal(moved, expected) and not torch.equal(moved, x)
    for r in range(2):
        assert torch.equal(moved[r].flatten().sort().values, x[r].flatten().sort().values)


def test_a_move_carries_a_multistep_schedulers_stored_predictions_with_the_latents(tiny_pipe):
    from diffusers import DPMSolverMultistepScheduler

    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = DPMSolverMultistepScheduler.from_config(original.config, algorithm_type="dpmsolver++")
    try:
        with AttentionGuide(tiny_pipe, Guide(boxes=(("circle", (0.0, 0.0, 0.4, 0.4)),), moves=(0.5,))) as g:
            g.check(["a red circle"])
            tensors, t = step_inputs(tiny_pipe, g, 2, guidance_scale=2.0, output_type="np")
            x = tensors["latents"]
            tiny_pipe.scheduler.model_outputs = [None, x.clone(), 2 * x]  # what an earlier step stored, as the latents
            moved = g.callback(tiny_pipe, 1, t, tensors)["latents"]
        stored = tiny_pipe.scheduler.model_outputs
        assert not torch.equal(moved, x) and stored[0] is None
        assert torch.equal(stored[1], moved) and torch.equal(stored[2], 2 * moved)
    finally:
        tiny_pipe.scheduler = original


def test_refinement_repeats_a_step_until_the_loss_is_low(tiny_pipe):
    guide = Guide(excite=("circle",), steps=StepRange.steps(0, 4), step_size=0.3, iterations=4, refine=((0.5, 0.99),))
    with AttentionGuide(tiny_pipe, guide) as g:
        g.check(["a red circle"])
        tensors, t = step_inputs(tiny_pipe, g, 2, guidance_scale=2.0, output_type="np")
        x = tensors["latents"]
        embeds, mask = g._text(tensors, 1)
        out = g.callback(tiny_pipe, 1, t, tensors)["latents"]  # step 2 of 4 refines: up to 4 gradient steps
        losses = [float(g._loss_and_grad(tiny_pipe, y, t, embeds, mask)[0]) for y in (x, out)]
    assert losses[1] < losses[0]
    one = 0.3 * math.sqrt(1 - 2 / 8)  # the RMS change of one normalized gradient step at step 2 of 4
    assert 1.5 * one < float((out - x).pow(2).mean().sqrt()) <= 4 * one + 1e-5  # several steps, at most 4


@pytest.mark.parametrize("box_method", BOX_METHODS)
def test_guidance_on_stable_diffusion_with_and_without_classifier_free_guidance(sd_pipe, box_method):
    guide = Guide(excite=("circle",), boxes=(("red", (0.0, 0.0, 0.5, 0.5)),), steps=StepRange.steps(0, 3),
                  step_size=0.3, box_method=box_method)
    for scale in (1.0, 3.0):
        kw = dict(num_inference_steps=3, guidance_scale=scale, output_type="np")
        plain = sd_pipe("a red circle", generator=seeded(0), **kw).images
        guided = generate(sd_pipe, "a red circle", guide=guide, generator=seeded(0), **kw).images
        assert np.isfinite(guided).all() and not np.array_equal(plain, guided)
        again = sd_pipe("a red circle", generator=seeded(0), **kw).images
        assert np.array_equal(plain, again)  # processors and hooks restored


def test_edit_with_guidance_moves_source_and_edit_together(tiny_pipe):
    guide = Guide(boxes=(("circle", (0.0, 0.0, 0.5, 1.0)),), steps=StepRange.steps(0, 4), step_size=0.5)
    plain = edit(tiny_pipe, "a red circle", "a blue circle", output_type="np", guidance_scale=2.0)
    guided = edit(tiny_pipe, "a red circle", "a blue circle", guide=guide, output_type="np", guidance_scale=2.0)
    assert not np.array_equal(plain.source, guided.source) and not np.array_equal(plain.edited, guided.edited)
    with pytest.raises(ValueError, match="bind word 'green' is not in the prompt 'a red circle'"):
        edit(tiny_pipe, "a red circle", "a blue circle", guide=Guide(bind=(("green", "circle"),)))


TWO = "a red circle left of a blue square"


def _candidate(seed: int, k: int, shape=(1, 3, 16, 16)) -> torch.Tensor:
    """Candidate k of the image of generator seed `seed`: the seed's own noise, then seeds + 1000 k."""
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed + 1000 * k))[0]


def _layout_alone(pipe, prompt: str, noise: torch.Tensor, guide: Guide, steps: int, **kw) -> float:
    """The layout score of one starting noise, read in a run of it alone (not by `arrange`)."""
    found, read = {}, max(1, round(guide.arrange_at * steps))
    with AttentionGuide(pipe, guide) as g:
        def grab(pipe, i, t, tensors):
            if i + 1 == read:
                embeds, mask = g._text(tensors, 1)
                with torch.no_grad():
                    found["maps"] = g._probe(pipe, tensors["latents"], pipe.scheduler.timesteps[read], embeds, mask)[0]
            return {}

        pipe(prompt, latents=noise[None], num_inference_steps=steps, callback_on_step_end=grab,
             callback_on_step_end_tensor_inputs=g.tensor_inputs, **kw)
    p = plan(pipe.tokenizer, prompt, guide)
    text = text_maps(found["maps"], p.eos)
    return layout_score([text[w].mean(0) for w in p.arrange], p.relations)


def test_arrange_starts_each_image_from_its_best_candidate_by_the_early_layout(tiny_pipe):
    guide = Guide(arrange="auto", candidates=3, arrange_at=0.5)
    with AttentionGuide(tiny_pipe, guide) as g:
        picked = g.arrange(dict(prompt=TWO, num_images_per_prompt=2, generator=seeded(5, 2), num_inference_steps=4,
                                **KW, **g.kwargs()))
    assert g.layout.shape == (2, 3) and picked.shape == (2, 3, 16, 16)
    for b in range(2):
        scores = [_layout_alone(tiny_pipe, TWO, _candidate(5 + b, k), guide, 4, **KW) for k in range(3)]
        assert g.layout[b].tolist() == pytest.approx(scores, abs=1e-4)  # the maps of the run alone, up to batching
        assert torch.equal(picked[b], _candidate(5 + b, int(np.argmax(scores))))
    assert len(set(g.layout.flatten().tolist())) == 6  # the candidates' layouts differ: the pick is a real choice
    images = generate(tiny_pipe, TWO, guide=guide, num_images_per_prompt=2, generator=seeded(5, 2), **KW).images
    assert np.array_equal(images, tiny_pipe(TWO, latents=picked, num_images_per_prompt=2, **KW).images)
    with pytest.raises(ValueError, match="arrange picks the starting noise; it cannot start from given latents"):
        generate(tiny_pipe, TWO, guide=guide, latents=picked, **KW)


def test_arrange_keeps_the_seeds_own_noise_and_generator_when_it_scores_best(tiny_pipe, monkeypatch):
    import diffxattn.control.guided as guided
    from diffxattn.schedulers import make_scheduler

    original = tiny_pipe.scheduler
    tiny_pipe.scheduler = make_scheduler("euler-ancestral", config=original.config)  # draws noise at every step
    try:
        plain = generate(tiny_pipe, TWO, num_images_per_prompt=2, generator=seeded(3, 2), **KW).images
        monkeypatch.setattr(guided, "layout_score", lambda maps, relations: 0.0)  # a tie: the first candidate
        same = generate(tiny_pipe, TWO, guide=Guide(arrange="auto"), num_images_per_prompt=2, generator=seeded(3, 2),
                        **KW).images
    finally:
        tiny_pipe.scheduler = original
    assert np.array_equal(plain, same)  # the step noises too: the generators advanced as the plain call's


def test_arrange_leaves_a_one_object_prompt_alone_and_heatmaps_see_only_the_final_run(tiny_pipe):
    calls = []
    hook = tiny_pipe.unet.register_forward_hook(lambda *args: calls.append(1))
    try:
        plain = generate(tiny_pipe, "a red circle", generator=seeded(0), **KW).images
        n = len(calls)
        same = generate(tiny_pipe, "a red circle", guide=Guide(arrange="auto"), generator=seeded(0), **KW).images
    finally:
        hook.remove()
    assert np.array_equal(plain, same) and len(calls) == 2 * n  # no partial run: nothing to arrange
    guide = Guide(arrange="auto", candidates=2)
    with AttentionStore(tiny_pipe) as store:
        image = generate(tiny_pipe, TWO, guide=guide, generator=seeded(1), **KW).images
    with AttentionGuide(tiny_pipe, guide) as g:
        picked = g.arrange(dict(prompt=TWO, generator=seeded(1), **KW, **g.kwargs()))
    with AttentionStore(tiny_pipe) as alone:
        again = tiny_pipe(TWO, latents=picked, **KW).images
    assert np.array_equal(image, again) and torch.equal(store.token_maps(0), alone.token_maps(0))
    with pytest.raises(ValueError, match="arrange picks the starting noise of generate and heatmap"):
        edit(tiny_pipe, TWO, "a red circle left of a green square", guide=guide)


def test_arrange_under_word_weights_and_prompt_editing(tiny_pipe, monkeypatch):
    prompt = "a (red:1.5) circle left of a [blue:green:0.5] square"
    picks, original = [], AttentionGuide.arrange
    monkeypatch.setattr(AttentionGuide, "arrange", lambda self, call: picks.append(original(self, call)) or picks[-1])
    images = generate(tiny_pipe, prompt, guide=Guide(arrange="auto", candidates=3), generator=seeded(2), **KW).images
    assert picks[0].shape == (1, 3, 16, 16)  # the weights and the schedule ran in the partial run too
    assert np.array_equal(images, generate(tiny_pipe, prompt, latents=picks[0], **KW).images)


@pytest.mark.parametrize("scale", [1.0, 3.0])
def test_arrange_on_stable_diffusion(sd_pipe, scale):
    kw = dict(num_inference_steps=4, guidance_scale=scale, output_type="np")
    guide = Guide(arrange=("circle", "square"), candidates=2)  # words named: any prompt
    with AttentionGuide(sd_pipe, guide) as g:
        picked = g.arrange(dict(prompt=TWO, generator=seeded(0), **kw, **g.kwargs()))
    assert picked.shape == (1, 4, 8, 8) and g.layout.shape == (1, 2)  # 16x16 images: 8x8 latents
    assert g.plans[0].relations == ["left of"] and torch.equal(picked[0], _candidate(0, int(g.layout.argmax()),
                                                                                     (1, 4, 8, 8)))
    images = generate(sd_pipe, TWO, guide=guide, generator=seeded(0), **kw).images
    assert np.array_equal(images, sd_pipe(TWO, latents=picked, **kw).images)


# -- command line and eval --

def test_guidance_options_from_the_command_line(tiny_pipe, tmp_path, capsys):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    common = ["--pipeline", str(tmp_path / "pipe"), "--steps", "3"]
    assert main(["generate", "a red circle", *common, "--excite", "circle", "--box", "red=0,0,0.5,0.5",
                 "--guide-steps", "0:3", "-o", str(tmp_path / "g.png")]) == 0
    assert main(["generate", "a red circle", *common, "-o", str(tmp_path / "p.png")]) == 0
    assert (tmp_path / "g.png").read_bytes() != (tmp_path / "p.png").read_bytes()
    for method in ("gradient", "move"):  # a box alone, by each method: only the move steps differ from plain
        assert main(["generate", "a red circle", *common, "--box", "circle=0.5,0.5,1,1", "--box-method", method,
                     "--box-moves", "0.5", "-o", str(tmp_path / f"{method}.png")]) == 0
        assert (tmp_path / f"{method}.png").read_bytes() != (tmp_path / "p.png").read_bytes()
    assert main(["heatmap", "a red circle left of a blue square", "--pipeline", str(tmp_path / "pipe"),
                 "--num-steps", "3", "--bind", "-o", str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "index.html").is_file()
    assert main(["edit", "a red circle", "--to", "a blue circle", *common, "--excite", "circle",
                 "-o", str(tmp_path / "e.png")]) == 0
    assert main(["generate", TWO, *common, "--arrange", "--candidates", "3", "--arrange-at", "0.4",
                 "-o", str(tmp_path / "a.png")]) == 0
    with AttentionGuide(tiny_pipe, Guide(arrange="auto", candidates=3, arrange_at=0.4)) as g:
        picked = g.arrange(dict(prompt=TWO, generator=seeded(0), num_inference_steps=3, **g.kwargs()))
    expected = tiny_pipe(TWO, latents=picked, num_inference_steps=3, output_type="np").images[0]
    assert np.array_equal(np.asarray(Image.open(tmp_path / "a.png")), np.round(expected * 255).astype(np.uint8))
    assert main(["heatmap", TWO, "--pipeline", str(tmp_path / "pipe"), "--num-steps", "3", "--arrange",
                 "circle,square", "-o", str(tmp_path / "arranged")]) == 0
    assert (tmp_path / "arranged" / "index.html").is_file()
    capsys.readouterr()
    for args, message in [(["--excite", "square"], "excite word 'square' is not in the prompt 'a red circle'"),
                          (["--box", "circle=0,0,1.5,1"], "box of 'circle' 0,0,1.5,1: expected fractions"),
                          (["--bind-loss", "l2"], "argument --bind-loss: invalid choice: 'l2'"),
                          (["--box-method", "dense"], "argument --box-method: invalid choice: 'dense'"),
                          (["--arrange", "square"], "arrange word 'square' is not in the prompt 'a red circle'"),
                          (["--arrange", "--candidates", "1"], "candidates=1; expected a whole number >= 2"),
                          (["--box-moves", "0.4,1"], "argument --box-moves: expected comma-separated fractions of "
                                                     "the steps between 0 and 1, e.g. 0.4,0.6, got 0.4,1")]:
        assert _exit_code(["generate", "a red circle", *common, *args, "-o", str(tmp_path / "x.png")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert cli.BOX_METHODS == BOX_METHODS  # the CLI's copy (it starts without importing torch)
    assert _exit_code(["eval", "--guided", "excite,boxes"]) == 2
    assert "unknown method 'boxes'; expected comma-separated methods of excite, bind, box" in capsys.readouterr().err


def _exit_code(argv) -> int:
    """main's return code, or the code of the SystemExit argparse raises for a bad option."""
    try:
        return main(argv)
    except SystemExit as e:
        return e.code


def test_box_prompts_and_box_iou():
    items = box_prompts(64)
    assert len(items) == 64 and len({box for _, _, box in items}) == 64
    for prompt, word, (x0, y0, x1, y1) in items:
        assert word in prompt.split() and prompt.split()[1] in ("small", "large")
        side = {"small": 8 / 32, "large": 13 / 32}[prompt.split()[1]]
        assert math.isclose(x1 - x0, side) and math.isclose(y1 - y0, side)
        assert 1 / 32 <= x0 and x1 <= 31 / 32 + 1e-9 and 1 / 32 <= y0 and y1 <= 31 / 32 + 1e-9
    assert box_iou((0, 0, 4, 4), (0, 0, 4, 4)) == 1.0 and box_iou((0, 0, 4, 4), (4, 4, 8, 8)) == 0.0
    assert box_iou((0, 0, 4, 4), (2, 0, 6, 4)) == pytest.approx(8 / 24)


def test_object_box_iou_scores_the_prompts_object_not_the_first_detection():
    from PIL import Image, ImageDraw

    image = Image.new("RGB", (32, 32), "black")
    draw = ImageDraw.Draw(image)
    draw.ellipse([2, 2, 13, 13], fill=(40, 80, 230))  # a blue circle, upper left
    draw.rectangle([18, 18, 29, 29], fill=(220, 30, 30))  # a red square, lower right
    detections = detect(np.asarray(image))
    assert {(d.color, d.shape) for d in detections} == {("blue", "circle"), ("red", "square")}
    lower_right, upper_left = (18 / 32, 18 / 32, 30 / 32, 30 / 32), (2 / 32, 2 / 32, 14 / 32, 14 / 32)
    assert object_box_iou("a red square", detections, lower_right, 32) > 0.8
    assert object_box_iou("a blue circle", detections, lower_right, 32) == 0.0
    assert object_box_iou("a blue circle", detections, upper_left, 32) > 0.7
    assert object_box_iou("a red square", [], lower_right, 32) == 0.0


def test_eval_reports_guided_sets_and_box_scores(tiny_pipe):
    guide = Guide(excite="auto", bind="auto", steps=StepRange.steps(0, 2))
    report = evaluate(tiny_pipe, quick=True, sets=("two",), heatmaps=False, edits=False, guidance_scales=(2.0,),
                      steps=2, guide=guide, boxes=2)
    assert report["config"]["guide"]["excite"] == "auto" and report["config"]["guide"]["steps"] == "steps 0:2"
    assert report["sets"]["two"]["n"] == 4
    b = report["boxes"]
    assert b["n"] == 2 and 0 <= b["iou"] <= 1 and 0 <= b["color_shape"] <= 1
    plain = evaluate(tiny_pipe, quick=True, sets=("two",), heatmaps=False, edits=False, guidance_scales=(2.0,),
                     steps=2)
    assert plain["config"]["guide"] is None and plain["boxes"] is None


def test_eval_scores_arranged_sampling(tiny_pipe):
    kw = dict(quick=True, sets=("single", "two"), heatmaps=False, edits=False, guidance_scales=(2.0,), steps=2)
    report = evaluate(tiny_pipe, guide=Guide(arrange="auto", candidates=2), **kw)
    plain = evaluate(tiny_pipe, **kw)
    assert report["sets"]["single"] == plain["sets"]["single"]  # one object each: nothing to arrange
    assert report["config"]["guide"]["arrange"] == "auto" and report["sets"]["two"]["n"] == 4
    assert "arrange auto: best of 2 noises by the layout at 0.25 of the steps" in format_report(report)


def test_the_box_score_uses_the_given_settings_without_words(tiny_pipe, monkeypatch):
    import diffxattn.eval.run as run

    used = []
    monkeypatch.setattr(run, "AttentionGuide", lambda pipe, guide: used.append(guide) or AttentionGuide(pipe, guide))
    settings = parse_options(step_size=0.03, iterations=2)  # no words: a false Guide that holds the settings
    assert not settings
    evaluate(tiny_pipe, quick=True, sets=("single",), heatmaps=False, edits=False, guidance_scales=(1.0,), steps=2,
             guide=settings, boxes=1)
    assert [(g.step_size, g.iterations, len(g.boxes)) for g in used] == [(0.03, 2, 1)]
