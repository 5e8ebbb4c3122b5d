"""bench/accuracy_curve.py: each checkpoint's all-correct accuracy at the run's logged training time."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from conftest import tiny_pipeline

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def curve_module():
    spec = importlib.util.spec_from_file_location("accuracy_curve", ROOT / "bench" / "accuracy_curve.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_seconds_at_reads_the_logged_wall_clock_or_sums_the_steps_time(tmp_path, curve_module):
    new, old = tmp_path / "new.jsonl", tmp_path / "old.jsonl"
    new.write_text('{"step": 10, "wall_s": 12.5}\n{"step": 20, "wall_s": 30.0}\n')
    old.write_text('{"step": 10, "images_per_s": 64}\n{"step": 20, "images_per_s": 32}\n')
    assert curve_module.seconds_at(new, batch=64) == {0: 0.0, 10: 12.5, 20: 30.0}
    assert curve_module.seconds_at(old, batch=64) == {0: 0.0, 10: 10.0, 20: 30.0}


@pytest.mark.parametrize("arrange", [False, True])
def test_each_checkpoint_is_scored_at_its_logged_minutes_with_or_without_arrange(tmp_path, tiny_text, curve_module,
                                                                                  monkeypatch, arrange):
    folder = tmp_path / "pipe"
    tiny_pipeline(tiny_text, default_guidance_scale=2.0).save_pretrained(folder)
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text('{"step": 100, "wall_s": 60.0}\n{"step": 200, "wall_s": 150.0}\n')
    guides = []
    evaluate = curve_module.evaluate

    def spy(pipe, **kw):
        guides.append(kw["guide"])
        return evaluate(pipe, **kw)

    monkeypatch.setattr(curve_module, "evaluate", spy)
    out = tmp_path / "curve.json"
    argv = ["accuracy_curve.py", "--metrics", str(metrics), "--batch", "8", "--prompts", "1", "-o", str(out),
            f"190:{folder}", *(["--arrange"] if arrange else [])]
    monkeypatch.setattr(sys, "argv", argv)
    curve_module.main()
    (point,) = json.loads(out.read_text())
    assert point["step"] == 190 and point["minutes"] == pytest.approx(2.5)  # the nearest logged step, 200
    assert point["guidance"] == 2.0 and point["arrange"] is arrange
    assert {"single", "two", "heldout"} <= point.keys()
    assert all(0.0 <= point[k] <= 1.0 for k in ("single", "two", "heldout"))
    (guide,) = guides
    assert (guide is not None and guide.arrange == "auto") if arrange else guide is None
