import subprocess
import sys

import numpy as np
import torch
from PIL import Image

from diffxattn import DiffXAttnPipeline
from diffxattn.cli import main


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "diffxattn.cli", *args], capture_output=True, text=True, timeout=300)


def test_build_then_generate_from_the_command_line(tmp_path, tiny_pipe):
    assert main(["build", "configs/tiny.yaml", "-o", str(tmp_path / "pipe"), "text.vocab_captions=200"]) == 0
    out = tmp_path / "img.png"
    assert main(["generate", "a red circle", "--pipeline", str(tmp_path / "pipe"), "--seed", "1", "--steps", "2",
                 "-o", str(out)]) == 0
    img = np.asarray(Image.open(out))
    assert img.shape == (16, 16, 3)
    assert main(["generate", "a red circle", "--pipeline", str(tmp_path / "pipe"), "--seed", "1", "--steps", "2",
                 "-n", "2", "--scale", "4", "-o", str(out)]) == 0
    first = np.asarray(Image.open(tmp_path / "img-0.png"))
    assert first.shape == (64, 64, 3)
    assert np.array_equal(first[::4, ::4], img)  # image 0 of a batch = the single image with the same seed


def test_cli_errors_are_one_line_without_traceback(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    r = run_cli("generate", "a red circle", "--pipeline", str(tmp_path / "pipe"), "--scheduler", "nope")
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "unknown scheduler 'nope'; known schedulers: ddpm, ddim" in r.stderr
    r = run_cli("generate", "a red circle", "--pipeline", str(tmp_path / "missing"))
    assert r.returncode == 2 and "pipeline folder" in r.stderr and "does not exist" in r.stderr
    r = run_cli("generate", "x", "--pipeline", str(tmp_path / "pipe"), "--height", "15")
    assert r.returncode == 2 and "height=15" in r.stderr


def test_edit_and_weighted_generate_from_the_command_line(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    pipe = str(tmp_path / "pipe")
    out = tmp_path / "edit.png"
    assert main(["edit", "a red circle", "--to", "a blue circle", "--pipeline", pipe, "--steps", "3",
                 "--local-blend", "red", "blue", "--heatmaps", str(tmp_path / "maps"), "-o", str(out)]) == 0
    pair = np.asarray(Image.open(out))
    assert pair.shape == (16, 32, 3) and not np.array_equal(pair[:, :16], pair[:, 16:])
    assert (tmp_path / "maps" / "edited" / "word-02-circle.png").is_file()
    assert (tmp_path / "maps" / "source" / "index.html").is_file()
    for mode in ("attention", "embedding"):
        assert main(["generate", "a (red:1.5) [circle:square:0.5]", "--pipeline", pipe, "--steps", "3",
                     "--weight-mode", mode, "-o", str(tmp_path / f"{mode}.png")]) == 0
    r = run_cli("generate", "a (red:1.5 circle", "--pipeline", pipe)
    assert r.returncode == 2 and "^" in r.stderr and "Traceback" not in r.stderr
    r = run_cli("edit", "a red circle", "--to", "a blue circle", "--pipeline", pipe, "--steps", "2",
                "--local-blend", "circle", "--blend-threshold", "1.5")
    assert r.returncode == 2 and "threshold 1.5 must be in [0, 1)" in r.stderr and "Traceback" not in r.stderr
    featured = tmp_path / "featured.png"
    assert main(["edit", "a red circle", "--to", "a blue circle", "--pipeline", pipe, "--steps", "3",
                 "--local-blend", "red", "blue", "--feature-replace", "0:2", "-o", str(featured)]) == 0
    both = np.asarray(Image.open(featured))
    assert np.array_equal(both[:, :16], pair[:, :16]) and not np.array_equal(both[:, 16:], pair[:, 16:])
    r = run_cli("edit", "a red circle", "--to", "a blue circle", "--pipeline", pipe, "--steps", "2",
                "--feature-replace", "0.5", "--feature-layers", "up_blocks.0.resnet")
    assert r.returncode == 2 and "feature layers ['up_blocks.0.resnet'] are not modules" in r.stderr


def test_build_starts_from_model_pretrained(tmp_path, tiny_pipe):
    tiny_pipe.save_pretrained(tmp_path / "saved")
    saved = str(tmp_path / "saved")
    assert main(["build", "configs/tiny.yaml", "-o", str(tmp_path / "built"), f"model.pretrained={saved}",
                 f"text.pretrained={saved}"]) == 0
    built = DiffXAttnPipeline.from_pretrained(tmp_path / "built")
    for name in ("unet", "text_encoder"):
        a, b = getattr(tiny_pipe, name).state_dict(), getattr(built, name).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_train_clip_then_build_with_that_text_encoder(tmp_path):
    from transformers import CLIPTextModel

    clip, built = str(tmp_path / "clip"), str(tmp_path / "built")
    assert main(["train-clip", "configs/tiny.yaml", "-o", clip, "--steps", "2", "--batch-size", "8",
                 "text.vocab_captions=200"]) == 0
    assert main(["build", "configs/tiny.yaml", "-o", built, f"text.pretrained={clip}"]) == 0
    pipe = DiffXAttnPipeline.from_pretrained(built)
    saved = CLIPTextModel.from_pretrained(clip).state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in pipe.text_encoder.state_dict().items())
    assert pipe.text_encoder.config.hidden_size == 32 and pipe.tokenizer.model_max_length == 16
