"""The trained pipeline shipped in pipelines/shapes-32: its attention points where the words say."""

import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from diffxattn import DiffXAttnPipeline
from diffxattn.control import AttentionStore

SHIPPED = Path(__file__).resolve().parent.parent / "pipelines" / "shapes-32"


@pytest.fixture(scope="module")
def shipped():
    pipe = DiffXAttnPipeline.from_pretrained(SHIPPED, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_circle_attention_peaks_where_the_prompt_puts_it(shipped):
    with AttentionStore(shipped) as store:
        image = shipped("a red circle at the left", generator=torch.Generator().manual_seed(0), output_type="np").images[0]
    circle = store.word_map("circle").numpy()  # (32, 32)
    y, x = np.unravel_index(circle.argmax(), circle.shape)
    assert x < 16  # the peak is in the left half
    drawn = image.max(-1) > 0.4  # the object's pixels (black background)
    assert drawn.any() and np.nonzero(drawn)[1].mean() < 16
    assert circle[drawn].mean() > 1.1 * circle[~drawn].mean()  # the word attends to its object


def test_shipped_pipeline_is_small_and_loads_with_plain_diffusers():
    from diffusers import DiffusionPipeline

    size = sum(f.stat().st_size for f in SHIPPED.rglob("*") if f.is_file())
    assert size < 20 * 2**20
    pipe = DiffusionPipeline.from_pretrained(SHIPPED)
    assert type(pipe) is DiffXAttnPipeline


def test_local_blend_mask_covers_the_object_and_keeps_the_rest(shipped):
    from diffxattn.eval import metrics
    from diffxattn.eval.detector import detect
    from diffxattn.generation import edit

    result = edit(shipped, "a red circle at the left", "a green circle at the left", local_blend=["circle"],
                  output_type="np")
    (src, tgt), mask = metrics.to_uint8(list(result)), result.mask.numpy()
    objects = detect(src)
    assert objects and objects[0].color == "red"
    assert mask.mean() < 0.9 and mask[objects[0].mask].mean() > 0.9  # a region around the object, not everything
    assert np.abs(src.astype(float) - tgt)[~mask].mean() < 2  # outside: the source's pixels (< 2 of 255 levels)
    edited = detect(tgt)
    assert edited and edited[0].color == "green"


def test_feature_injection_keeps_the_object_while_the_color_changes(shipped):
    from diffxattn.eval import metrics
    from diffxattn.generation import edit

    plain = metrics.to_uint8(list(edit(shipped, "a red circle at the left", "a blue circle at the left",
                                       output_type="np")))
    kept = metrics.to_uint8(list(edit(shipped, "a red circle at the left", "a blue circle at the left",
                                      feature_replace=(0, 0.8), output_type="np")))
    np.testing.assert_array_equal(kept[0], plain[0])  # the same source
    with_features, without = metrics.swap_scores(*kept, "blue"), metrics.swap_scores(*plain, "blue")
    assert with_features["target_color"] and with_features["shape_kept"] and with_features["position_kept"]
    assert with_features["mask_iou"] > 0.9 > without["mask_iou"]  # plain prompt-to-prompt shrinks this circle
    shape = metrics.swap_scores(*metrics.to_uint8(list(edit(
        shipped, "a red circle at the left", "a red square at the left", feature_replace=(0, 0.8), output_type="np"))),
        "square", "shape")
    assert not shape["target_shape"] and shape["color_kept"]  # features fix the shape: no shape swap with them


def test_shipped_defaults_are_what_the_model_card_says():
    from diffxattn.schedulers import scheduler_name

    card = (SHIPPED / "README.md").read_text()
    row = re.search(r"^\| sampling default \| (\S+) \(clip_sample (true|false)\), (\d+) steps, guidance ([\d.]+), "
                    r"guided steps ([\d.]+)-([\d.]+) \|$", card, re.M)
    assert row, "the model card has no parsable '| sampling default |' row"
    name, clip, steps, guidance, start, end = row.groups()
    pipe = DiffXAttnPipeline.from_pretrained(SHIPPED)
    assert scheduler_name(pipe.scheduler) == name
    assert pipe.scheduler.config.clip_sample is (clip == "true")
    assert pipe.config.default_steps == int(steps)
    assert pipe.config.default_guidance_scale == float(guidance)
    assert list(pipe.config.default_guidance_interval) == [float(start), float(end)]
    # ...and the eval report the card quotes was scored at exactly these settings
    report = json.loads((SHIPPED / "eval.json").read_text())["config"]
    assert (report["scheduler"], report["scheduler_config"]["clip_sample"], report["steps"], report["guidance_scale"],
            report["guidance_interval"], report["seeds"]) == (name, clip == "true", int(steps), float(guidance),
                                                              [float(start), float(end)], 2)
