"""The benchmark scripts run end to end (`--quick`: tiny sizes) and write results in the documented schema.

Speed is not checked here (the machine is shared); the numbers must be positive and every ratio must be
other / ours of the reported medians.
"""

import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.slow  # ~20-45 s per script on 2 loaded cores


def run_quick(script: str, out: Path, *extra: str) -> dict:
    name = script.removeprefix("bench_")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    # one thread: the quick runs only check the plumbing, and 2 threads on a loaded 2-core machine crawl
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "bench" / f"{script}.py"),
            "--quick",
            "--threads",
            "1",
            "--out",
            str(out),
            *extra,
        ],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads((out / f"{name}.json").read_text())
    md = (out / f"{name}.md").read_text()
    assert md.startswith("# ") and "Machine:" in md
    assert name in ("quality", "arrange") or "| ratio" in md.replace("peak ratio", "| ratio")  # arrange: no timing
    return data


def check_common(data: dict, benchmark: str) -> None:
    assert data["benchmark"] == benchmark and data["quick"] is True
    m = data["machine"]
    assert m["nproc"] >= 1 and m["threads"] == 1 and m["cpu"] and m["torch"]
    assert data["comparisons"]
    for row in data["comparisons"]:
        assert {
            "metric",
            "ours",
            "other",
            "unit",
            "ours_value",
            "other_value",
            "ratio",
            "samples",
        } <= row.keys()
        assert row["ours_value"] > 0 and row["other_value"] > 0
        assert row["ratio"] == pytest.approx(row["other_value"] / row["ours_value"], rel=1e-9)
        samples = row["samples"]
        assert all(x > 0 for x in samples["ours"] + samples["other"])
        medians = statistics.median(samples["other"]) / statistics.median(samples["ours"])
        assert row["ratio"] == pytest.approx(medians, rel=1e-9)
        pairs = zip(
            samples["ours"], samples["other"], strict=True
        )  # one sample per side per interleaved round
        assert row["round_ratios"] == pytest.approx([t / o for o, t in pairs], rel=1e-9)
        if "target" in row:
            op, value = row["target"].split()
            expected = {
                ">=": row["ratio"] >= float(value),
                "<=": row["ratio"] <= float(value),
                "==": row["ratio"] == pytest.approx(float(value)),
            }[op]
            assert row["met"] == expected


def test_speed_compares_ours_with_two_diffusers_unets_of_matched_size(tmp_path):
    data = run_quick("bench_speed", tmp_path)
    check_common(data, "speed")
    params = {name: d["params"] for name, d in data["models"].items()}
    assert set(params) == {"ours", "diffusers-all", "diffusers-low"}
    assert all(abs(n / params["ours"] - 1) <= 0.10 for n in params.values())
    s = data["settings"]
    pairs = {(r["metric"], r["other"]) for r in data["comparisons"]}
    assert pairs == {
        (m, o) for m in ("train", "sample", "forward") for o in ("diffusers-all", "diffusers-low")
    }
    repeats = {"train": s["train_repeats"], "sample": s["sample_repeats"], "forward": s["forward_repeats"]}
    for r in data["comparisons"]:
        assert len(r["samples"]["ours"]) == len(r["samples"]["other"]) == repeats[r["metric"]]
        assert ("target" in r) == (r["metric"] != "forward")  # forward rows only explain the sampling ratio
    for p in data["profiles"]:  # only for missed targets; quick sizes usually miss them
        assert len(p["top"]) == 10 and all(t["self_cpu_ms"] >= 0 for t in p["top"])
    peak = data["matmul_peak_gflop_per_s"]
    assert peak > 0
    assert {(e["loop"], e["model"]) for e in data["efficiency"]} == {
        (loop, m) for loop in ("train", "sample") for m in params
    }
    for e in data["efficiency"]:
        assert e["gflop_per_image"] > 0 and e["share_of_peak"] == pytest.approx(e["gflop_per_s"] / peak)
        assert ("met" in e) == (e["loop"] == "train" and e["model"] == "ours")
    flops = {(e["loop"], e["model"]): e["gflop_per_image"] for e in data["efficiency"]}
    # a training image is a forward and a backward (about 3 forwards); a sampled one 2 rows x steps forwards
    assert flops["train", "ours"] / flops["sample", "ours"] == pytest.approx(3 / (2 * s["sample_steps"]), rel=0.2)
    assert "| train | ours |" in (tmp_path / "speed.md").read_text()


def test_speed_compares_another_config_with_diffusers_unets_matched_to_it():
    sys.path.insert(0, str(ROOT / "bench"))
    import common

    try:
        assert common.diffusers_layers_per_block() == (2, 2, 1)  # the shipped layout's documented match
        common.use_config(ROOT / "configs" / "shapes-32-cpu.yaml")
        assert common.diffusers_layers_per_block() == (2, 1, 1)  # 2x2 patch stem, channels 64/96/128
        assert common.MODELS["ours"].startswith("XAttnUNet (configs/shapes-32-cpu.yaml): 2x2 patch stem;")
        params = {n: common.num_params(common.build_model(n)) for n in ("ours", "diffusers-all", "diffusers-low")}
        common.check_param_match(params)
        assert tuple(common.model_config("diffusers-low").block_out_channels) == (64, 96, 128)
    finally:
        common.use_config(ROOT / "configs" / "shapes-32.yaml")
        sys.path.remove(str(ROOT / "bench"))


def test_attention_tools_measures_capture_edit_guided_box_and_store_memory(tmp_path):
    data = run_quick("bench_attention_tools", tmp_path)
    check_common(data, "attention_tools")
    rows = {r["metric"]: r for r in data["comparisons"]}
    assert set(rows) == {"capture", "edit", "guided", "box", "arrange", "store memory"}
    # their ratios are timings: quick sizes check the plumbing, not the speed
    assert rows["guided"]["target"] == rows["box"]["target"] == rows["arrange"]["target"] == "<= 3"
    assert rows["store memory"]["ratio"] == 1.0 and rows["store memory"]["met"]  # summed maps: no growth


def test_memory_measures_each_loop_in_a_fresh_process(tmp_path):
    data = run_quick("bench_memory", tmp_path)
    check_common(data, "memory")
    assert {(r["metric"], r["other"]) for r in data["comparisons"]} == {
        (m, o) for m in ("train", "sample") for o in ("diffusers-all", "diffusers-low")
    }
    for r in data["comparisons"]:
        assert r["unit"] == "MiB"
        assert 0 < r["base"]["ours"] < r["ours_value"] and 0 < r["base"]["other"] < r["other_value"]


def test_quality_trains_every_variant_for_the_same_time_and_scores_it(tmp_path):
    runs = tmp_path / "runs"
    data = run_quick("bench_quality", tmp_path, "--set", "train.caption_dropout=0.5", "--keep", str(runs))
    assert data["settings"]["overrides"] == ["train.caption_dropout=0.5"]
    for name in data["variants"]:  # --keep: each variant's run stays, trained with the override
        assert (runs / name / "pipeline" / "model_index.json").is_file()
        config = next((runs / name / "checkpoints").glob("checkpoint-*/config.yaml")).read_text()
        assert "caption_dropout: 0.5" in config
    assert data["benchmark"] == "quality" and data["quick"] is True and data["machine"]["threads"] == 1
    variants = data["variants"]
    assert set(variants) == {"ours", "diffusers-all", "diffusers-low", "cross-8", "cross-all", "self-all"}
    s = data["settings"]
    for name, v in variants.items():
        assert v["images_per_s"] > 0 and v["sample_s_per_image"] > 0 and v["params"] > 0
        assert v["steps"] == max(s["min_steps"], int(s["minutes"] * 60 * v["images_per_s"] / s["batch"]))
        assert set(v["all"]) == {"single", "two", "heldout"} and all(0 <= a <= 1 for a in v["all"].values())
        assert v["final_loss"] > 0 and 0 <= v["mean_attribute"] <= 1
        assert set(v["iou_by_resolution"]) <= {"32", "16", "8"}
        assert all(set(kinds) == {"shape", "color"} for kinds in v["iou_by_resolution"].values())
        accuracies = [a for acc in v["attributes"].values() for a in acc.values() if a is not None]
        assert v["mean_attribute"] == pytest.approx(sum(accuracies) / len(accuracies))
    params = {n: v["params"] for n, v in variants.items()}
    assert params["cross-8"] < params["ours"] < params["cross-all"]  # fewer / more cross-attention layers
    assert all(abs(params[n] / params["ours"] - 1) <= 0.10 for n in ("diffusers-all", "diffusers-low"))
    assert set(data["checks"]) == {f"ours >= {o}{k}" for o in ("diffusers-all", "diffusers-low")
                                   for k in (", mean all-correct accuracy", ", mean attribute accuracy")}
    md = (tmp_path / "quality.md").read_text()
    assert "## Equal training time" in md and "## Where cross- and self-attention live" in md
    assert "| shape IoU | shape IoU 32/16/8 | color IoU | color IoU 32/16/8 |" in md
    assert "Trainer overrides for every variant: `train.caption_dropout=0.5`." in md


def test_quality_scores_only_the_chosen_prompt_sets(tmp_path):
    data = run_quick("bench_quality", tmp_path, "--variants", "ours", "--sets", "single", "heldout",
                     "--set", "data.max_objects=1")
    assert data["settings"]["sizes"] == {"single": 1, "heldout": 1}
    ours = data["variants"]["ours"]
    assert set(ours["all"]) == set(ours["attributes"]) == {"single", "heldout"}
    row = next(line for line in (tmp_path / "quality.md").read_text().splitlines() if line.startswith("| ours"))
    cells = [c.strip() for c in row.strip("|").split("|")]
    assert cells[7] == "-" and cells[6] != "-" and cells[8] != "-"  # single, two (not scored), held-out


def test_trainer_bench_compares_the_readme_command_with_a_bare_loop(tmp_path):
    """bench_trainer: the in-process overhead row, and the README's `accelerate launch` command (a subprocess with
    the user's environment) against the bare loop with the bench's threads."""
    data = run_quick("bench_trainer", tmp_path)
    assert data["benchmark"] == "trainer" and data["machine"]["threads"] == 1
    assert data["trainer_images_per_s"] > 0 and data["bare_images_per_s"] > 0
    assert data["readme_command_images_per_s"] > 0 and data["bare_around_it_images_per_s"] > 0
    assert data["readme_vs_bare"] == pytest.approx(data["readme_command_images_per_s"]
                                                   / data["bare_around_it_images_per_s"])
    md = (tmp_path / "trainer.md").read_text()
    assert "`accelerate launch -m diffxattn.train configs/shapes-32.yaml` (README)" in md and ">= 0.9x" in md


def test_layouts_bench_compares_the_shipped_and_the_cpu_layout(tmp_path):
    """bench_layouts: per config its parameters, FLOP per image of a training step, images/s; ratios against the
    first config. The FLOP counts do not depend on the machine: the 2x2 patch stem costs less per image."""
    data = run_quick("bench_layouts", tmp_path)
    shipped, cpu = data["layouts"]["shapes-32"], data["layouts"]["shapes-32-cpu"]
    assert data["reference"] == "shapes-32" and cpu["config"] == "configs/shapes-32-cpu.yaml"
    assert shipped["parameters"] == 3_296_835 and cpu["parameters"] > shipped["parameters"]
    assert 0.5 < cpu["gflop_per_image"] / shipped["gflop_per_image"] < 0.8
    for v in (shipped, cpu):
        assert v["images_per_s"] > 0 and v["gflop_per_s"] == pytest.approx(v["gflop_per_image"] * v["images_per_s"])
    (row,) = data["rows"]
    assert (row["ours"], row["other"]) == ("shapes-32-cpu", "shapes-32")
    assert row["ratio"] == pytest.approx(cpu["images_per_s"] / shipped["images_per_s"], rel=1e-9)


def test_arrange_bench_samples_every_candidate_and_scores_the_picking_rules(tmp_path):
    data = run_quick("bench_arrange", tmp_path)
    assert data["benchmark"] == "arrange" and data["quick"] is True
    records, rows = data["records"], {r["rule"]: r for r in data["rows"]}
    assert len(records) == 2 and all(len(r["outcomes"]) == 2 for r in records)
    plain = np.mean([r["outcomes"][0]["all"] for r in records])
    assert rows["plain (the seed's own noise)"]["all"] == pytest.approx(plain)
    picked = [r["outcomes"][int(np.argmax(r["scores"]["4.0"]))]["all"] for r in records]
    assert rows["2 candidates, spread weight 4"]["all"] == pytest.approx(np.mean(picked))
    assert all(rows["2 candidates, oracle (a right one if any)"]["all"] >= r["all"] for r in data["rows"])
    assert "| 2 candidates, spread weight 4 |" in (tmp_path / "arrange.md").read_text()
