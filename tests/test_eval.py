import json
from pathlib import Path

import numpy as np
import pytest
import torch

from diffxattn.cli import main
from diffxattn.control.store import word_keys
from diffxattn.data import ShapesConfig, parse_caption, parse_caption_words, render, scene_from_caption
from diffxattn.generation import edit
from diffxattn.eval import metrics
from diffxattn.eval.detector import detect
from diffxattn.eval.prompts import (FULL_SIZES, QUICK_SIZES, color_swap, first_object, prompt_sets, reweighted,
                                    shape_swap)
from diffxattn.eval.run import _HeatmapTally, evaluate

SHIPPED = Path(__file__).resolve().parent.parent / "pipelines" / "shapes-32"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    # Two OpenMP threads on two shared cores run these tiny models ~10x slower than one.
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pairs_of(prompt: str) -> list[tuple[str, str]]:
    return [(o["color"], o["shape"]) for o in parse_caption(prompt)["objects"]]


def test_prompt_sets_are_fixed_sized_and_quick_is_a_prefix():
    full, again, quick = prompt_sets(), prompt_sets(), prompt_sets(quick=True)
    assert full == again
    assert {k: len(v) for k, v in full.items()} == FULL_SIZES == {"single": 64, "two": 64, "heldout": 32}
    assert {k: len(v) for k, v in quick.items()} == QUICK_SIZES
    for name in full:
        assert quick[name] == full[name][:len(quick[name])]
        assert len(set(full[name])) == len(full[name])  # no duplicates
    assert [len(parse_caption(p)["objects"]) for p in full["two"]] == [2] * 64
    assert all(parse_caption(p)["relation"] for p in full["two"])
    assert all(parse_caption(p)["position"] for p in full["single"] + full["heldout"])
    assert any(parse_caption(p)["objects"][0]["size"] for p in full["single"])  # some name a size
    assert len(prompt_sets(["single"], sizes={"single": 10})["single"]) == 10


def test_held_out_pairs_appear_only_in_the_heldout_set():
    holdout = set(ShapesConfig().holdout)
    sets = prompt_sets()
    assert all(p not in holdout for text in sets["single"] + sets["two"] for p in pairs_of(text))
    assert all(set(pairs_of(text)) <= holdout for text in sets["heldout"])
    assert {p for text in sets["heldout"] for p in pairs_of(text)} == holdout  # every held-out pair is tested


def test_swap_and_reweight_prompts():
    assert color_swap("a red circle at the left") == "an orange circle at the left"
    # the next color making a training pair: yellow square and green diamond are held out
    assert color_swap("a small orange square at the top") == "a small green square at the top"
    assert color_swap("a yellow diamond at the right") == "a blue diamond at the right"
    assert shape_swap("a red circle at the left") == "a red square at the left"
    assert shape_swap("a yellow circle at the top") == "a yellow triangle at the top"  # yellow square: held out
    assert shape_swap("a small orange diamond left of a red circle") == "a small orange circle left of a red circle"
    assert reweighted("a small red circle at the left", 1.5) == "a small (red:1.5) circle at the left"
    assert first_object("a small red circle left of a blue square") == (2, "red", "circle")


@pytest.mark.parametrize("size", [16, 32])
def test_ground_truth_renders_score_all_correct(size):
    prompts = [p for texts in prompt_sets().values() for p in texts]
    images = [render(scene_from_caption(p, size))[0] for p in prompts]
    summary = metrics.summarize(metrics.score_images(prompts, images))
    assert summary["n"] == 160 and summary["all"] == 1.0
    assert summary["accuracy"] == dict.fromkeys(metrics.ATTRIBUTES, 1.0)
    black = metrics.summarize(metrics.score_images(prompts[:4], np.zeros((4, size, size, 3), np.uint8)))
    assert black["all"] == 0.0 and black["accuracy"]["count"] == 0.0


def test_heatmap_iou_of_perfect_inverted_and_half_maps():
    _, masks = render(scene_from_caption("a red circle left of a blue square", 32))
    mask = masks[0]
    np.testing.assert_array_equal(metrics.threshold_ious(mask.astype(float), mask), np.ones(9))
    np.testing.assert_array_equal(metrics.threshold_ious(1.0 - mask, mask), np.zeros(9))
    half = metrics.threshold_ious(0.45 * mask, mask)  # above tau only for tau < 0.45
    np.testing.assert_array_equal(half, [1, 1, 1, 1, 0, 0, 0, 0, 0])
    summary = metrics.summarize_ious([half, np.ones(9)])
    assert summary == {"n": 2, "iou@0.4": 1.0, "best_tau": 0.1, "iou@best": 1.0}
    assert metrics.summarize_ious([])["iou@0.4"] is None


class _MapStore:
    """Stands in for an AttentionStore: every word's map is the ground-truth mask of its object; at the
    16x16 layers too, while at the 8x8 layers every word looks at the other object."""

    captured_resolutions = [16, 8]

    def __init__(self, caption, masks):
        owners = parse_caption_words(caption)[1]
        keys = word_keys(caption.split())

        def maps(masks):
            return {k: torch.tensor(masks[o] if o >= 0 else np.zeros_like(masks[0]), dtype=torch.float32)
                    for k, o in zip(keys, owners)}

        self.maps = {None: maps(masks), 16: maps(masks), 8: maps(masks[::-1])}

    def word_maps(self, index, prompt, normalize, resolution=None):
        return self.maps[resolution]


def test_heatmap_tally_matches_each_word_to_its_detected_object():
    caption = "a red circle left of a blue circle"  # a repeated word: "circle", "circle#2"
    image, masks = render(scene_from_caption(caption, 32))
    detections = detect(image)
    found = metrics.word_masks(caption, detections)
    assert [(i, kind) for i, kind, _ in found] == [(1, "color"), (2, "shape"), (6, "color"), (7, "shape")]
    assert all(metrics.iou(m, masks[0 if i < 3 else 1]) > 0.9 for i, _, m in found)
    tally = _HeatmapTally(metrics.THRESHOLDS)
    tally.add(_MapStore(caption, masks), 0, caption, detections)
    summary = tally.summary()
    assert summary["color"]["n"] == summary["shape"]["n"] == 2
    assert summary["color"]["iou@best"] > 0.9 and summary["shape"]["iou@best"] > 0.9
    by_res = summary["by_resolution"]
    assert list(by_res) == ["16", "8"] and by_res["16"] == {k: summary[k] for k in ("color", "shape")}
    assert by_res["8"]["color"]["n"] == 2 and by_res["8"]["color"]["iou@best"] == by_res["8"]["shape"]["iou@best"] == 0
    swapped = _MapStore(caption, masks[::-1])  # every word looks at the other object
    tally = _HeatmapTally(metrics.THRESHOLDS)
    tally.add(swapped, 0, caption, detections)
    assert tally.summary()["shape"]["iou@best"] == 0.0
    tally = _HeatmapTally(metrics.THRESHOLDS)
    tally.add(_MapStore(caption, masks), 0, caption, detect(np.zeros_like(image)))
    assert tally.summary() == {**{k: metrics.summarize_ious([]) for k in ("color", "shape")}, "by_resolution": {}}
    assert metrics.word_masks(caption, detect(np.zeros_like(image))) == []  # nothing detected: nothing scored


def test_spearman_of_monotone_reversed_tied_and_constant_sequences():
    w = [0.5, 0.75, 1.0, 1.5, 2.0]
    assert metrics.spearman(w, [0.1, 0.2, 0.25, 0.7, 0.9]) == pytest.approx(1.0)
    assert metrics.spearman(w, [5, 4, 3, 2, 1]) == pytest.approx(-1.0)
    assert metrics.rank([3, 1, 3, 2]).tolist() == [3.5, 1.0, 3.5, 2.0]
    assert np.isnan(metrics.spearman(w, [1, 1, 1, 1, 1]))
    stats = pytest.importorskip("scipy.stats")
    y = [0.3, 0.1, 0.3, 0.8, 0.2]
    assert metrics.spearman(w, y) == pytest.approx(stats.spearmanr(w, y).statistic)


def test_color_strength_is_highest_for_the_named_saturated_color():
    image, _ = render(scene_from_caption("a red circle at the left", 32))
    assert metrics.color_strength(image, "red") == pytest.approx(1.0)
    assert metrics.color_strength(image, "orange") < metrics.color_strength(image, "red")
    washed = (0.6 * image + 0.4 * 255 * (image.max(-1, keepdims=True) > 0)).astype(np.uint8)  # towards white
    assert metrics.color_strength(washed, "red") < 0.95
    assert metrics.color_strength(np.zeros_like(image), "red") is None


def test_swap_scores_on_ground_truth_pair():
    src, _ = render(scene_from_caption("a red circle at the left", 32))
    tgt, _ = render(scene_from_caption("a blue circle at the left", 32))
    moved, _ = render(scene_from_caption("a blue square at the right", 32))
    assert metrics.swap_scores(src, tgt, "blue") == {"target_color": True, "shape_kept": True,
                                                     "position_kept": True, "mask_iou": 1.0}
    bad = metrics.swap_scores(src, moved, "green")
    assert bad == {"target_color": False, "shape_kept": False, "position_kept": False, "mask_iou": 0.0}
    square, _ = render(scene_from_caption("a red square at the left", 32))
    shape = metrics.swap_scores(src, square, "square", "shape")
    assert {k: shape[k] for k in ("target_shape", "color_kept", "position_kept")} == {
        "target_shape": True, "color_kept": True, "position_kept": True}
    assert 0.5 < shape["mask_iou"] < 1
    assert metrics.swap_scores(src, tgt, "square", "shape") == {"target_shape": False, "color_kept": False,
                                                                "position_kept": True, "mask_iou": 1.0}


def test_edit_returns_the_blend_mask_that_kept_the_source_outside(tiny_pipe):
    kw = dict(num_inference_steps=3, guidance_scale=1.0, output_type="np")
    source, target = "a red circle at the left", "a blue circle at the left"
    src, tgt = edit(tiny_pipe, source, target, local_blend=["red", "blue"], blend_threshold=0.9, seed=3, **kw)
    result = edit(tiny_pipe, source, target, local_blend=["red", "blue"], blend_threshold=0.9, seed=3, **kw)
    np.testing.assert_array_equal(result.source, src)
    np.testing.assert_array_equal(result.edited, tgt)
    mask = result.mask.numpy()
    assert mask.shape == (16, 16) and mask.dtype == bool and mask.any() and not mask.all()
    assert np.abs(src - tgt)[~mask].max() < 1 / 255 < np.abs(src - tgt)[mask].max()  # the edit shows only inside
    assert edit(tiny_pipe, source, target, seed=3, **kw).mask is None  # no local blend, no mask


def _numbers(tree):
    if isinstance(tree, dict):
        for v in tree.values():
            yield from _numbers(v)
    elif isinstance(tree, list):
        for v in tree:
            yield from _numbers(v)
    else:
        yield tree


def test_quick_evaluate_report_has_every_key_with_scores_in_range(tiny_pipe):
    report = evaluate(tiny_pipe, quick=True)
    json.dumps(report)  # JSON-ready
    assert set(report) == {"pipeline", "config", "sets", "guidance", "heatmap_iou", "edits", "boxes", "seconds"}
    assert report["boxes"] is None and report["config"]["guide"] is None  # no --boxes, no guidance
    assert report["config"]["steps"] == 4 and report["config"]["seeds"] == 1
    assert set(report["sets"]) == {"single", "two", "heldout"}
    for name, s in report["sets"].items():
        assert s["n"] == 4
        assert set(s["accuracy"]) >= {"count", "color", "shape", "position" if name != "two" else "relation"}
        assert all(0 <= v <= 1 for v in [*s["accuracy"].values(), s["all"]])
    assert set(report["guidance"]) == {"1", "3"}
    assert report["guidance"]["1"] == {k: v["all"] for k, v in report["sets"].items()}  # main scale: reused
    for g in report["guidance"].values():
        assert set(g) == {"single", "two", "heldout"} and all(0 <= v <= 1 for v in g.values())
    assert set(report["heatmap_iou"]) == {"color", "shape", "by_resolution"}
    assert set(report["heatmap_iou"]["by_resolution"]) <= {"16", "8"}  # the tiny UNet's cross-attention heights
    for kinds in (report["heatmap_iou"], *report["heatmap_iou"]["by_resolution"].values()):
        for kind in ("color", "shape"):
            h = kinds[kind]
            assert set(h) == {"n", "iou@0.4", "best_tau", "iou@best"} and isinstance(h["n"], int)
            assert all(v is None or 0 <= v <= 1 for v in h.values() if not isinstance(v, int))
    edits = report["edits"]
    for name in ("color_swap", "color_swap_features"):
        assert set(edits[name]) == {"n", "target_color", "shape_kept", "position_kept", "mask_iou", "mask_iou_n"}
    for name in ("shape_swap", "shape_swap_features"):
        assert set(edits[name]) == {"n", "target_shape", "color_kept", "position_kept", "mask_iou", "mask_iou_n"}
    assert edits["swap_feature_replace"] == [0, 0.8]
    assert set(edits["reweight"]) == {"attention", "embedding"}
    for r in edits["reweight"].values():
        assert set(r) == {"n", "weights", "spearman", "spearman_per_image", "strength"}
        assert r["n"] == 2 and set(r["strength"]) == {f"{w:g}" for w in r["weights"]}
        assert all(x is None or -1 <= x <= 1 for x in (r["spearman"], r["spearman_per_image"]))
    assert set(edits["local_blend"]) == {"n", "outside", "outside_no_blend", "inside", "mask_fraction"}
    assert edits["color_swap"]["n"] == edits["shape_swap_features"]["n"] == edits["local_blend"]["n"] == 2
    swaps = [edits[f"{a}_swap{f}"] for a in ("color", "shape") for f in ("", "_features")]
    for section in (*swaps, edits["local_blend"], *(r["strength"] for r in edits["reweight"].values())):
        assert all(v is None or 0 <= v <= 1 for k, v in section.items() if k not in ("n", "mask_iou_n"))
    assert all(isinstance(v, (int, float, str, bool, type(None))) for v in _numbers(report))
    assert report["seconds"] > 0


def test_cli_eval_writes_the_report(tmp_path, tiny_pipe, capsys):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    out = tmp_path / "report.json"
    assert main(["eval", str(tmp_path / "pipe"), "--quick", "-o", str(out), "--sets", "single,heldout",
                 "--guidance", "2", "--no-edits", "--no-heatmaps"]) == 0
    report = json.loads(out.read_text())
    assert report["pipeline"] == str(tmp_path / "pipe")
    assert list(report["sets"]) == ["single", "heldout"] and list(report["guidance"]) == ["2"]
    assert report["edits"] is None and report["heatmap_iou"] is None
    printed = capsys.readouterr().out
    assert "single" in printed and "heldout" in printed and str(out) in printed
    assert main(["eval", str(tmp_path / "pipe"), "--quick", "--sets", "single,nope", "-o", str(out)]) == 2
    assert main(["eval", str(tmp_path / "pipe"), "--quick", "--sets", "single", "--guidance", "1", "--no-heatmaps",
                 "--edit-prompts", "1", "-o", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["config"]["edit_prompts"] == 1 and report["edits"]["color_swap_features"]["n"] == 1
    with pytest.raises(SystemExit) as exit_:  # argparse checks the count
        main(["eval", str(tmp_path / "pipe"), "--quick", "--edit-prompts", "0", "-o", str(out)])
    assert exit_.value.code == 2
    assert "--edit-prompts: expected a whole number >= 1, got 0" in capsys.readouterr().err


@pytest.mark.skipif(not (SHIPPED / "model_index.json").is_file(), reason="no pipeline in pipelines/shapes-32")
def test_shipped_pipeline_draws_single_objects_correctly():
    from diffxattn.cli import load_pipeline

    pipe = load_pipeline(str(SHIPPED))
    report = evaluate(pipe, quick=True, sets=("single",), sizes={"single": 16}, heatmaps=False, edits=False,
                      guidance_scales=(pipe.config.default_guidance_scale,))
    # chance of all clauses right by luck is < 1% (6 colors x 4 shapes x 5 positions); the model card has the numbers
    assert report["sets"]["single"]["all"] >= 0.3
