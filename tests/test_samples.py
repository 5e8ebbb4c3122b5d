import json

import numpy as np
from PIL import Image

from diffxattn.samples import EDITS, GALLERY, GUIDED, REWEIGHT, _ticks, guidance_curve, make_samples


def test_samples_command_writes_every_picture_the_readme_shows(tiny_pipe, tmp_path):
    curve = tmp_path / "curve.json"
    curve.write_text(json.dumps([{"step": s, "minutes": m, "single": a, "two": a / 2, "heldout": None}
                                 for s, m, a in ((300, 15.0, 0.2), (600, 30.0, 0.5), (900, 45.0, 0.6))]))
    reports = []
    for k, scheduler in enumerate(("ddim", "dpm-solver++")):
        reports.append(tmp_path / f"{scheduler}.json")
        reports[-1].write_text(json.dumps({"config": {"scheduler": scheduler, "steps": 30, "guidance_scale": 4.0},
                                           "sets": {"two": {"all": 0.55}},
                                           "guidance": {"1": {"two": 0.4}, "3": {"two": 0.5 + 0.1 * k}}}))
    written = make_samples(tiny_pipe, tmp_path / "samples", curve=curve, screenshot=False, guidance_reports=reports)
    names = {p.relative_to(tmp_path / "samples").as_posix() for p in written}
    assert names == {"gallery.png", "heatmaps/grid.png", "edits.png", "reweight.png", "accuracy.png", "guidance.png",
                     "inversion.png", "guided.png"}
    assert (tmp_path / "samples" / "heatmaps" / "index.html").is_file()
    sizes = {n: Image.open(tmp_path / "samples" / n).size for n in names}
    cell = 128
    assert sizes["gallery.png"][0] == 6 * cell and sizes["edits.png"][0] == 4 * cell
    rows = lambda n_cells, columns: -(-n_cells // columns)  # noqa: E731
    assert sizes["gallery.png"][1] > rows(len(GALLERY), 6) * cell
    assert sizes["edits.png"][1] > rows(2 * len(EDITS), 4) * cell  # source + edit per pair
    assert sizes["reweight.png"][0] == len(REWEIGHT[1]) * cell
    assert sizes["inversion.png"][0] == 3 * cell  # input, drawn again from its inversion, edited
    assert sizes["reweight.png"][1] > 2 * cell  # two rows: attention mode, then embedding mode
    assert sizes["guided.png"][0] == 4 * 160 and sizes["guided.png"][1] > rows(2 * len(GUIDED), 4) * 160
    chart = np.asarray(Image.open(tmp_path / "samples" / "accuracy.png").convert("RGB"))
    assert chart.shape == (360, 640, 3)
    chart = chart[:, :640 - 170]  # the plot area, without the legend
    blue, orange = np.array([31, 119, 180]), np.array([255, 127, 14])  # the "single" and "two" series
    assert (chart == blue).all(-1).sum() > 50 and (chart == orange).all(-1).sum() > 50
    assert not (chart == np.array([44, 160, 44])).all(-1).any()  # "heldout" had no points: no line

    guidance = np.asarray(Image.open(tmp_path / "samples" / "guidance.png").convert("RGB"))
    assert guidance.shape == (360, 640, 3)  # one panel: only the "two" set was scored
    plot = guidance[:, :640 - 170]
    assert (plot == blue).all(-1).sum() > 20 and (plot == orange).all(-1).sum() > 20  # one line per report


def test_chart_ticks_are_round_steps_from_zero():
    assert _ticks(57.2) == [0, 10, 20, 30, 40, 50]
    assert _ticks(5.0) == [0, 1, 2, 3, 4, 5] and _ticks(1.0) == [0, 0.2, 0.4, 0.6, 0.8, 1.0]
    assert _ticks(61.3) == [0, 20, 40, 60] and _ticks(0.3) == [0, 0.05, 0.1, 0.15, 0.2, 0.25, 0.3]


def test_guidance_curve_adds_the_reports_main_scale_in_order():
    report = {"config": {"guidance_scale": 4.0}, "sets": {"two": {"all": 0.59}},
              "guidance": {"5": {"two": 0.55}, "1": {"two": 0.44}, "3": {"two": 0.58}}}
    assert guidance_curve(report, "two") == [(1.0, 0.44), (3.0, 0.58), (4.0, 0.59), (5.0, 0.55)]
    report["guidance"]["4"] = {"two": 0.6}  # a scale in both: the curve's own point is kept
    assert guidance_curve(report, "two")[2] == (4.0, 0.6)


def test_guided_strip_shows_the_first_failing_seed_and_the_guided_image_of_that_seed(tiny_pipe, monkeypatch):
    from diffxattn import samples

    verdicts = iter([None, None, "missing object"] + [None] * 5 + ["extra object"])
    seen = []

    def fake_failure(image, prompt, boxes):
        seen.append((prompt, boxes))
        return next(verdicts)

    monkeypatch.setattr(samples, "GUIDED", [("a red circle at the left", "excite", dict(excite="auto"))])
    monkeypatch.setattr(samples, "_box_failure", fake_failure)
    labels = []
    monkeypatch.setattr(samples, "labelled_grid", lambda cells, **kw: labels.extend(label for label, _ in cells))
    samples.guided_strip(tiny_pipe, seed=5)
    assert len(seen) == samples.GUIDED_SEEDS + 1  # every plain seed, then the guided image
    assert labels == ["a red circle at the left, seed 7, plain: missing object", "excite: extra object"]


def test_box_failure_is_the_prompt_failure_or_the_object_off_its_box():
    from PIL import ImageDraw

    from diffxattn.samples import _box_failure

    image = Image.new("RGB", (32, 32), "black")
    ImageDraw.Draw(image).rectangle([16, 16, 27, 27], fill=(220, 30, 30))  # a red square, lower right
    assert _box_failure(image, "a red square", [("square", (0.45, 0.45, 0.95, 0.95))]) is None
    assert _box_failure(image, "a red square", [("square", (0.0, 0.0, 0.4, 0.4))]).startswith(
        "square off its box (IoU 0.00")
    assert _box_failure(image, "a blue square") == "color missing"
    # two boxed objects: each is scored against its own box (the object whose shape is the boxed word)
    ImageDraw.Draw(image).ellipse([2, 2, 13, 13], fill=(40, 80, 230))  # a blue circle, upper left
    prompt = "a blue circle above a red square"
    upper_left, lower_right = (0.0, 0.0, 0.45, 0.45), (0.45, 0.45, 0.95, 0.95)
    assert _box_failure(image, prompt, [("circle", upper_left), ("square", lower_right)]) is None
    assert _box_failure(image, prompt, [("circle", upper_left), ("square", upper_left)]).startswith(
        "square off its box (IoU 0.00")
