"""Hypothesis fuzzing of what a user hands the project: command lines, small random edits of a pipeline folder,
and of an experiment config. Every run exits 0 with a valid image (or pipeline) or 2 with one error line, in
bounded time, and writes nothing outside its output path. A few examples run in the default suite; the slow
suite (`.ci/run`) runs many more, and real subprocesses of both entry points."""

import json
import os
from unittest import mock
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from accelerate.state import AcceleratorState, GradientState
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from PIL import Image

from diffxattn import DiffXAttnPipeline
from diffxattn import train as T
from diffxattn.cli import main

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs" / "tiny.yaml"
# per run, in CPU seconds of this process (wall time on a shared 2-core machine says more about the neighbours);
# generous: an unbounded run takes minutes or forever
CPU_LIMIT_S = 60
FEW = settings(max_examples=8, deadline=None, derandomize=True, database=None,
               suppress_health_check=list(HealthCheck))
MANY = settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))

# values a careless or hostile user types, for any option
NUMBERS = ["0", "-1", "1", "2", "3", "7", "16", "17", "24", "0.5", "1.5", "1e308", "-1e308", "inf", "-inf", "nan",
           "100", "101", "65536", "100000", str(2**63), str(2**70), "1_0", "0x10", "x", "", " ", "٣"]
OPTIONS = {
    "generate": {"--steps": NUMBERS, "--guidance": NUMBERS, "-n": NUMBERS, "--height": NUMBERS, "--width": NUMBERS,
                 "--scale": NUMBERS, "--seed": NUMBERS, "--scheduler": ["ddim", "euler", "heun", "dpm-solver++",
                                                                         "ddpm", "nope", ""],
                 "--weight-mode": ["attention", "embedding", "embedding-a1111", "x"], "--negative": None,
                 "--strict": "flag"},
    "heatmap": {"--num-steps": NUMBERS, "--guidance": NUMBERS, "--scale": NUMBERS, "--seed": NUMBERS,
                "--steps": ["0:1.0", "0:2", "1:0", "0.5:nan", "x", "0:1:2", "-1:1"], "--resolutions": ["16", "8", "3"],
                "--blocks": ["down", "up", "mid", "x"], "--layers": ["up", "nothing"], "--strict": "flag"},
}
# steps that keep the default run short: counts above are refused, accepted ones are small
SLOW_VALUES = {"--steps": ["65536", "100000", "100"], "--num-steps": ["65536", "100000", "100"],
               "-n": ["65536", "100000", "100"], "--height": ["65536", "100000"], "--width": ["65536", "100000"]}
PROMPT = st.text(alphabet=st.sampled_from(list("abc red circle()[]:+-\\0.5|") + ["\x00", "é", "\n"]), max_size=40)


@pytest.fixture(autouse=True)
def fresh_accelerate_state():
    yield
    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


@pytest.fixture(scope="module")
def pipe_dir(tiny_pipe, tmp_path_factory):
    folder = tmp_path_factory.mktemp("fuzz") / "pipe"
    tiny_pipe.save_pretrained(folder)
    return folder


def option_values(command: str, fast: bool):
    def values(item):
        name, choices = item
        if choices == "flag":
            return st.just([name])
        if choices is None:
            return PROMPT.map(lambda v: [name, v])
        choices = [c for c in choices if not (fast and c in SLOW_VALUES.get(name, ()))]
        return st.sampled_from(choices).map(lambda v: [name, v])
    return st.lists(st.sampled_from(sorted(OPTIONS[command].items())).flatmap(values), max_size=4).map(
        lambda pairs: [a for pair in pairs for a in pair])


def snapshot(folder: Path, skip: Path | None = None) -> dict[str, tuple[int, int]]:
    """(size, mtime) of every file under folder, except under `skip`."""
    return {str(p): (p.stat().st_size, p.stat().st_mtime_ns) for p in folder.rglob("*")
            if p.is_file() and not (skip and p.is_relative_to(skip))}


def run_in_process(argv: list[str], capsys) -> tuple[int, str, float]:
    """(exit code, stderr, CPU seconds) of `diffxattn ARGV` in this process."""
    capsys.readouterr()
    start = time.process_time()
    try:
        code = main(argv)
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err, time.process_time() - start


def assert_one_error_line(err: str, prog: str) -> None:
    """Exit code 2's stderr: one error line, last; a prompt syntax error adds the prompt and a caret under it."""
    lines = err.strip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith(f"{prog}: error: ")]
    assert len(starts) == 1 and "Traceback" not in err, err
    tail = lines[starts[0]:]
    assert len(tail) == 1 or (len(tail) == 3 and tail[2].strip() == "^" and "column" in tail[0]), err


def arg(argv: list[str], name: str, default: int) -> int:
    """The value an accepted run used for `name` (the last one given wins, as in argparse)."""
    values = [argv[i + 1] for i, a in enumerate(argv[:-1]) if a == name]
    return int(values[-1]) if values else default


def assert_valid_outputs(command: str, argv: list[str], out: Path) -> None:
    scale = arg(argv, "--scale", 1 if command == "generate" else 8)
    if command == "generate":
        n, height, width = arg(argv, "-n", 1), arg(argv, "--height", 16), arg(argv, "--width", 16)
        paths = [out] if n == 1 else [out.with_name(f"{out.stem}-{k}{out.suffix}") for k in range(n)]
        sizes = [(width * scale, height * scale)] * n
    else:
        paths, sizes = [out / "image.png", out / "grid.png"], [(16, 16), None]
        assert json.loads((out / "maps.json").read_text())["image_size"] == [16, 16]
    for path, size in zip(paths, sizes):
        with Image.open(path) as image:
            image.load()
            assert image.mode == "RGB" and (size is None or image.size == size), (path, image.size, size)
            assert len(set(image.getdata())) > 1, f"{path} is a single flat color"


def check_command(pipe: Path, command: str, prompt: str, options: list[str], capsys) -> int:
    """One fuzzed run in a fresh sandbox: the exit code, its output and every file around it."""
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        (root / "cwd").mkdir()
        (root / "cwd" / "keep.txt").write_text("user file")
        out = root / "out" / ("img.png" if command == "generate" else "maps")
        before, pipe_before = snapshot(root), snapshot(pipe)
        argv = [command, prompt, "--pipeline", str(pipe), *options, "-o", str(out)]
        cwd = os.getcwd()
        os.chdir(root / "cwd")
        try:
            code, err, seconds = run_in_process(argv, capsys)
        finally:
            os.chdir(cwd)
        assert code in (0, 2), (argv, code, err)
        assert seconds < CPU_LIMIT_S, (argv, seconds)
        if code == 0:
            assert_valid_outputs(command, argv, out)
        else:
            assert_one_error_line(err, f"diffxattn {command}")
        assert snapshot(root, skip=root / "out") == before and snapshot(pipe) == pipe_before, argv
    return code


@FEW
@given(st.data())
def test_fuzzed_command_lines_exit_0_with_an_image_or_2_with_one_line(pipe_dir, capsys, data):
    command = data.draw(st.sampled_from(sorted(OPTIONS)))
    check_command(pipe_dir, command, data.draw(PROMPT), ["--steps", "2"] * (command == "generate")
                  + data.draw(option_values(command, fast=True)), capsys)


@pytest.mark.slow
@MANY
@given(st.data())
def test_fuzzed_command_lines_at_length(pipe_dir, capsys, data):
    command = data.draw(st.sampled_from(sorted(OPTIONS)))
    check_command(pipe_dir, command, data.draw(PROMPT), data.draw(option_values(command, fast=False)), capsys)


# ---- pipeline folders --------------------------------------------------------------------------------------

CONFIGS = ["model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "text_encoder/config.json",
           "tokenizer/tokenizer_config.json"]
WEIGHTS = ["unet/diffusion_pytorch_model.safetensors", "text_encoder/model.safetensors", "tokenizer/tokenizer.json"]
JSON_VALUES = st.one_of(
    st.sampled_from([0, 1, -1, 2, 3, 7, 8, 16, 17, 32, 4096, 10**6, 10**9, 10**12, 2**63, 0.0, 0.5, 1e-9, 1.5,
                     1e308, -1e308, float("nan"), float("inf"), True, False, None, "", "x", "linear", "epsilon",
                     "sample", "leading", "trailing", "gelu", "CLIPTokenizer", "DDIMScheduler", [], [1], [16, 32],
                     [16, 32, 64], [[1]], {}, {"a": 1}, ["diffusers", "DDPMScheduler"], ["os", "system"]]),
    st.integers(-5, 40),
    st.floats(allow_nan=True, allow_infinity=True),
)


@st.composite
def folder_edits(draw, keys: dict[str, list[str]]):
    """1-2 edits: a config value set, deleted or added; a config or weight file cut or garbled."""
    edits = []
    for _ in range(draw(st.integers(1, 2))):
        kind = draw(st.sampled_from(["set", "set", "set", "delete", "add", "cut", "garble"]))
        if kind in ("cut", "garble"):
            edits.append((kind, draw(st.sampled_from(CONFIGS + WEIGHTS)), draw(st.integers(0, 2000))))
        else:
            file = draw(st.sampled_from(CONFIGS))
            key = draw(st.sampled_from(keys[file])) if kind != "add" else draw(st.sampled_from(["extra", "_x"]))
            edits.append((kind, file, key, draw(JSON_VALUES) if kind != "delete" else None))
    return edits


def apply_edits(folder: Path, edits) -> None:
    for kind, file, *rest in edits:
        path = folder / file
        if kind in ("cut", "garble"):
            data = path.read_bytes()
            at = rest[0] % max(len(data), 1)
            path.write_bytes(data[:at] if kind == "cut" else data[:at] + bytes([data[at] ^ 0x5A]) + data[at + 1:])
            continue
        try:
            config = json.loads(path.read_text())
        except ValueError:  # cut by an earlier edit
            continue
        if kind == "delete":
            config.pop(rest[0], None)
        else:
            config[rest[0]] = rest[1]
        path.write_text(json.dumps(config))


def check_edited_pipeline(pipe_dir: Path, data, capsys) -> None:
    keys = {f: sorted(json.loads((pipe_dir / f).read_text())) for f in CONFIGS}
    edits = data.draw(folder_edits(keys))
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "pipe"
        shutil.copytree(pipe_dir, folder)
        apply_edits(folder, edits)
        check_command(folder, "generate", "a red circle", ["--steps", "2"], capsys)


@FEW
@given(st.data())
def test_fuzzed_pipeline_folders_exit_0_with_an_image_or_2_with_one_line(pipe_dir, capsys, data):
    check_edited_pipeline(pipe_dir, data, capsys)


@pytest.mark.slow
@MANY
@given(st.data())
def test_fuzzed_pipeline_folders_at_length(pipe_dir, capsys, data):
    check_edited_pipeline(pipe_dir, data, capsys)


# ---- configs -------------------------------------------------------------------------------------------

YAML_VALUES = st.one_of(JSON_VALUES, st.sampled_from(["no", "fp16", "imagefolder", "diffusers", "[1, 2]", "~"]))
INTS = st.sampled_from([0, 1, 2, 3, 4, 7, 8, 16, 17, 24, 32, 64, 1000, 10**6, 10**9, 2**63, -1])
FLOATS = st.sampled_from([0.0, 1e-9, 0.5, 1.0, 2.0, 7.5, 1e308, -1.0, float("nan"), float("inf")])


def typed_values(default):
    """Values of the field's own type first (they get past the type check and reach the builders)."""
    if isinstance(default, bool):
        return st.booleans()
    if isinstance(default, int):
        return INTS
    if isinstance(default, float):
        return FLOATS
    if isinstance(default, str):
        return st.sampled_from([default, "", "x", "no", "fp16", "linear", "epsilon", "ddpm", "heun", "imagefolder",
                                "diffusers", "scaled_linear", "constant"])
    if isinstance(default, list):
        return st.lists(INTS if all(isinstance(v, int) for v in default) else st.sampled_from(["", "x", "a red"]),
                        max_size=4)
    return YAML_VALUES


@st.composite
def config_edits(draw):
    """1-2 edits of the tiny config: a field set to a value (mostly of its own type) or deleted, or an unknown
    key added."""
    from diffxattn.config import ExperimentConfig, to_dict

    defaults = to_dict(ExperimentConfig())
    fields = [(s, k) for s, section in defaults.items() for k in section]
    edits = []
    for _ in range(draw(st.integers(1, 2))):
        section, key = draw(st.sampled_from(fields + [("train", "nope"), ("nope", "x")]))
        default = defaults.get(section, {}).get(key)
        value = draw(st.one_of(typed_values(default), typed_values(default), YAML_VALUES))
        edits.append((section, key, value, draw(st.booleans())))
    return edits


def edited_config(path: Path, edits) -> dict:
    config = yaml.safe_load(TINY.read_text())
    for section, key, value, delete in edits:
        node = config.setdefault(section, {})
        if delete:
            node.pop(key, None)
        else:
            node[key] = value
    path.write_text(yaml.safe_dump(config, allow_unicode=True))
    return config


def check_config_build(data, capsys) -> None:
    edits = data.draw(config_edits())
    # a model at the default limit (1e9 parameters) is legal but needs more memory than a CI machine has: the
    # fuzz checks the limit's error at a size this machine can build and sample
    with tempfile.TemporaryDirectory() as tmp, mock.patch.dict(os.environ, {"DIFFXATTN_MAX_PARAMS": "50000000"}):
        root = Path(tmp)
        edited_config(root / "config.yaml", edits)
        before = snapshot(root)
        out = root / "out" / "pipe"
        code, err, seconds = run_in_process(["build", str(root / "config.yaml"), "-o", str(out)], capsys)
        assert code in (0, 2) and seconds < CPU_LIMIT_S, (edits, code, err)
        assert snapshot(root, skip=root / "out") == before
        if code == 2:
            assert_one_error_line(err, "diffxattn build")
            return
        assert isinstance(DiffXAttnPipeline.from_pretrained(out), DiffXAttnPipeline)
        # a built pipeline samples an image (the generate fuzz's checks, on this folder)
        assert check_command(out, "generate", "a red circle", ["--steps", "1"], capsys) == 0, edits


@FEW
@given(st.data())
def test_fuzzed_configs_build_a_working_pipeline_or_exit_2_with_one_line(capsys, data):
    check_config_build(data, capsys)


@pytest.mark.slow
@MANY
@given(st.data())
def test_fuzzed_configs_at_length(capsys, data):
    check_config_build(data, capsys)


@pytest.mark.slow
@settings(max_examples=25, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzzed_configs_train_or_exit_2_with_one_line(capsys, data):
    edits = data.draw(config_edits())
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        edited_config(root / "config.yaml", edits)
        capsys.readouterr()
        start = time.process_time()
        code = T.main([str(root / "config.yaml"), f"train.output_dir={root / 'run'}", "train.max_steps=1",
                       "train.checkpoint_every=1", "logging.validate_every=1", "logging.tensorboard=false",
                       "scheduler.steps=2"])
        err = capsys.readouterr().err
        assert code in (0, 2) and time.process_time() - start < 4 * CPU_LIMIT_S, (edits, code, err)
        if code == 2:
            assert_one_error_line(err, "diffxattn.train")
        else:
            assert DiffXAttnPipeline.from_pretrained(root / "run" / "pipeline")
        assert {p.name for p in root.iterdir()} <= {"config.yaml", "run"}


# ---- real processes of both entry points --------------------------------------------------------------

def run_process(module: str, *args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", module, *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=cwd)


@pytest.mark.slow
@settings(max_examples=3, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_fuzzed_command_lines_in_a_real_process(pipe_dir, data):
    command = data.draw(st.sampled_from(sorted(OPTIONS)))
    options = data.draw(option_values(command, fast=True))
    assume(not any("\x00" in o for o in options))  # an OS cannot pass a NUL byte in argv (the in-process runs do)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out" / ("img.png" if command == "generate" else "maps")
        (Path(tmp) / "cwd").mkdir()
        proc = run_process("diffxattn.cli", command, "a red circle", "--pipeline", str(pipe_dir), "--steps", "2",
                           *options, "-o", str(out), cwd=Path(tmp) / "cwd")
        assert proc.returncode in (0, 2), proc.stderr[-3000:]
        if proc.returncode == 2:
            assert_one_error_line(proc.stderr, f"diffxattn {command}")
        else:
            assert_valid_outputs(command, [*options], out)
        assert not any((Path(tmp) / "cwd").iterdir())


@pytest.mark.slow
@settings(max_examples=2, deadline=None, suppress_health_check=list(HealthCheck))
@given(config_edits())
def test_fuzzed_configs_in_a_real_trainer_process(edits):
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        edited_config(root / "config.yaml", edits)
        proc = run_process("diffxattn.train", str(root / "config.yaml"), f"train.output_dir={root / 'run'}",
                           "train.max_steps=1", "logging.tensorboard=false", "scheduler.steps=2", cwd=root)
        assert proc.returncode in (0, 2), proc.stderr[-3000:]
        if proc.returncode == 2:
            assert_one_error_line(proc.stderr, "diffxattn.train")
        else:
            assert (root / "run" / "pipeline" / "model_index.json").is_file()
