"""The rule-based detector reads rendered scenes back into their captions' clauses."""

import numpy as np
import pytest

from diffxattn.data import COLORS, POSITIONS, SHAPES, ShapesConfig, render, sample_scene, scene_from_spec
from diffxattn.eval.detector import Detection, detect, position_of, relation_holds, score_prompt

OPPOSITE = {"left": "right", "right": "left", "above": "below", "below": "above", "top": "bottom",
            "bottom": "top", "center": "left"}


def scored_scenes(per_config):
    """(scene, detections) over both splits, sizes 32 and 64, one and two objects."""
    out = []
    for size in (32, 64):
        for split in ("train", "test"):
            cfg = ShapesConfig(size=size, split=split, seed=11)
            for i in range(per_config):
                scene = sample_scene(cfg, i)
                out.append((scene, detect(render(scene)[0])))
    return out


@pytest.fixture(scope="module")
def ground_truth():
    return scored_scenes(130)  # 520 scenes


def test_detector_scores_ground_truth_renders_correct(ground_truth):
    results = [score_prompt(scene.caption, dets, scene.image_size) for scene, dets in ground_truth]
    assert {len(s.objects) for s, _ in ground_truth} == {1, 2}
    accuracy = np.mean([r["all"] for r in results])
    assert accuracy >= 0.99, accuracy


def test_detections_match_each_objects_attributes_and_mask(ground_truth):
    for scene, dets in ground_truth[:200]:
        _, masks = render(scene)
        assert len(dets) == len(scene.objects)
        for obj, mask in zip(scene.objects, masks):
            det = next(d for d in dets if d.color == obj.color)
            assert (det.shape, det.size) == (obj.shape, obj.size), scene.caption
            assert np.array_equal(det.mask, mask)  # half-brightness edge = the crisp >= 50% mask
            assert np.hypot(det.center[0] - obj.center[0], det.center[1] - obj.center[1]) <= 1.0


def _swap(scene, kind):
    """The scene's caption with one clause made false, or None if the caption lacks that clause."""
    words = scene.caption.split()
    for i, (word, k) in enumerate(zip(words, scene.word_objects)):
        if kind == "color" and word in COLORS:
            used = {o.color for o in scene.objects}
            words[i] = next(c for c in COLORS if c not in used)
            return " ".join(words)
        if kind == "shape" and word in SHAPES:
            words[i] = SHAPES[(SHAPES.index(word) + 1) % len(SHAPES)]
            return " ".join(words)
        if kind == "position" and word in POSITIONS and k == 0:
            words[i] = OPPOSITE[word]
            return " ".join(words)
        if kind == "relation" and k == -1 and word in OPPOSITE:
            words[i] = OPPOSITE[word]
            return " ".join(words)
    return None


@pytest.mark.parametrize("clause", ["color", "shape", "position", "relation"])
def test_a_false_clause_scores_false(ground_truth, clause):
    checked = 0
    for scene, dets in ground_truth:
        wrong = _swap(scene, clause)
        if wrong is not None:
            result = score_prompt(wrong, dets, scene.image_size)
            assert not result[clause] and not result["all"], (scene.caption, wrong)
            checked += 1
    assert checked >= 50


def test_count_and_size_clauses_catch_extra_objects_and_wrong_sizes():
    scene = scene_from_spec([{"color": "red", "shape": "circle", "size": "large"},
                             {"color": "blue", "shape": "square", "size": "small"}], "left of", 32)
    dets = detect(render(scene)[0])
    assert score_prompt("a large red circle left of a small blue square", dets, 32) == {
        "count": True, "color": True, "shape": True, "size": True, "relation": True, "all": True}
    assert not score_prompt("a red circle", dets, 32)["count"]
    assert not score_prompt("a small red circle left of a small blue square", dets, 32)["size"]
    assert not score_prompt("a red circle left of a blue square", dets[:1], 32)["all"]


def degrade(image, rng):
    """What a sampler gives: a little blur, dimmer colors, noisy background."""
    x = image.astype(np.float32)
    x = (x + np.roll(x, 1, 0) + np.roll(x, -1, 0)) / 3
    x = (x + np.roll(x, 1, 1) + np.roll(x, -1, 1)) / 3
    x = x * rng.uniform(0.7, 1.0) + rng.normal(0, 12, x.shape)
    return np.clip(x, 0, 255).astype(np.uint8)


def test_detector_tolerates_blur_dimming_and_noise():
    rng = np.random.default_rng(0)
    for size, needed in ((32, 0.85), (64, 0.97)):
        cfg = ShapesConfig(size=size, seed=5)
        results = []
        for i in range(100):
            scene = sample_scene(cfg, i)
            results.append(score_prompt(scene.caption, detect(degrade(render(scene)[0], rng)), size)["all"])
        assert np.mean(results) >= needed, (size, np.mean(results))


def test_blank_and_unknown_colored_images():
    assert detect(np.zeros((32, 32, 3), np.uint8)) == []
    image = np.zeros((32, 32, 3), np.uint8)
    image[8:20, 8:20] = 200  # gray: an object of no palette color
    (det,) = detect(image)
    assert det.color is None and det.shape == "square" and det.bbox == (8, 8, 20, 20)
    image[2, 30] = 255  # a one-pixel speck is not an object
    assert len(detect(image)) == 1


def _at(x, y):
    return Detection("red", "circle", "small", (x, y), (0, 0, 1, 1), np.zeros((1, 1), bool), 1)


def test_position_and_relation_geometry():
    assert [position_of(_at(x, y), 32) for x, y in [(8, 16), (24, 15), (16, 7), (17, 25), (15, 17)]] == \
        ["left", "right", "top", "bottom", "center"]
    a, b = _at(5, 10), _at(20, 14)
    assert relation_holds(a, b, "left of") and relation_holds(b, a, "right of")
    assert not relation_holds(a, b, "above") and not relation_holds(a, b, "right of")
    top, bottom = _at(10, 3), _at(12, 20)
    assert relation_holds(top, bottom, "above") and relation_holds(bottom, top, "below")
    with pytest.raises(ValueError, match="'beside'"):
        relation_holds(a, b, "beside")


def test_failure_names_the_first_failed_clause():
    from diffxattn.eval.detector import failure_of

    def det(color, shape, x, y=16.0, size="small"):
        return Detection(color=color, shape=shape, size=size, center=(x, y), bbox=(0, 0, 1, 1),
                         mask=np.zeros((32, 32), bool), area=40)

    prompt = "a red circle left of a blue square"
    assert failure_of(prompt, [det("red", "circle", 8), det("blue", "square", 24)], 32) is None
    assert failure_of(prompt, [det("red", "circle", 8)], 32) == "missing object"
    assert failure_of(prompt, [det("red", "circle", 8), det("blue", "square", 24), det("green", "circle", 16)],
                      32) == "extra object"
    assert failure_of(prompt, [det("red", "circle", 8), det("green", "square", 24)], 32) == "color missing"
    assert failure_of(prompt, [det("red", "square", 8), det("blue", "circle", 24)], 32) == "colors bound to swapped shapes"
    assert failure_of(prompt, [det("red", "circle", 8), det("blue", "triangle", 24)], 32) == "wrong shape"
    assert failure_of(prompt, [det("red", None, 8), det("blue", "square", 24)], 32) == "wrong shape"  # unclassified
    assert failure_of(prompt, [det("blue", "square", 8), det("red", "circle", 24)], 32) == "wrong relation"
    assert failure_of("a red circle at the left", [det("red", "circle", 24)], 32) == "wrong position"
