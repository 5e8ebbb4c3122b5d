import json

import numpy as np
from PIL import Image

from diffxattn.samples import EDITS, GALLERY, REWEIGHT, guidance_curve, make_samples


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
                     "inversion.png"}
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


def test_guidance_curve_adds_the_reports_main_scale_in_order():
    report = {"config": {"guidance_scale": 4.0}, "sets": {"two": {"all": 0.59}},
              "guidance": {"5": {"two": 0.55}, "1": {"two": 0.44}, "3": {"two": 0.58}}}
    assert guidance_curve(report, "two") == [(1.0, 0.44), (3.0, 0.58), (4.0, 0.59), (5.0, 0.55)]
    report["guidance"]["4"] = {"two": 0.6}  # a scale in both: the curve's own point is kept
    assert guidance_curve(report, "two")[2] == (4.0, 0.6)
