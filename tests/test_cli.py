import re
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
    r = run_cli("generate", "a (red:1.5 circle", "--pipeline", pipe, "--strict")
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


def test_guidance_rescale_and_interval_from_the_command_line(tmp_path, tiny_pipe, capsys):
    """generate / heatmap pass --guidance-rescale and --guidance-interval to the pipeline: the saved PNG is the
    pipeline's image for the same arguments; out-of-range values are refused with the option named."""
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    pipe = DiffXAttnPipeline.from_pretrained(tmp_path / "pipe")
    common = ["--pipeline", str(tmp_path / "pipe"), "--steps", "4", "--guidance", "3", "--seed", "2"]
    for options, kwargs in ((["--guidance-interval", "0:0.5"], {"guidance_interval": (0.0, 0.5)}),
                            (["--guidance-rescale", "0.7"], {"guidance_rescale": 0.7}), ([], {})):
        out = tmp_path / f"{len(kwargs)}-{'-'.join(options)}.png"
        assert main(["generate", "a red circle", *common, *options, "-o", str(out)]) == 0
        expected = pipe("a red circle", num_inference_steps=4, guidance_scale=3.0,
                        generator=torch.Generator().manual_seed(2), **kwargs).images[0]
        assert np.array_equal(np.asarray(Image.open(out)), np.asarray(expected)), options
    files = sorted(tmp_path.glob("*.png"))
    assert len({np.asarray(Image.open(f)).tobytes() for f in files}) == 3  # each option changes the image
    assert main(["heatmap", "a red circle", *common[:2], "--num-steps", "2", "--guidance", "3",
                 "--guidance-interval", "0.5:1", "-o", str(tmp_path / "maps")]) == 0
    assert (tmp_path / "maps" / "word-01-red.png").is_file()
    capsys.readouterr()
    for option, value, message in (("--guidance-interval", "0.6:0.2", "must have 0 <= START < END <= 1"),
                                   ("--guidance-interval", "half", "expected START:END fractions of the steps"),
                                   ("--guidance-rescale", "1.5", "expected a number from 0 to 1, got 1.5"),
                                   ("--guidance-rescale", "nan", "expected a number from 0 to 1, got nan")):
        try:
            code = main(["generate", "a red circle", *common, option, value, "-o", str(tmp_path / "bad.png")])
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err
        assert code == 2 and f"argument {option}: " in err and message in err, (option, value, err)
    assert not (tmp_path / "bad.png").exists()


def test_pipeline_refuses_a_bad_guidance_rescale_or_interval(tiny_pipe):
    import pytest

    from diffxattn.limits import LimitError

    for kwargs, message in ((dict(guidance_rescale=float("nan")), "guidance_rescale=nan must be a number from 0 to 1"),
                            (dict(guidance_interval=(0.5, 0.5)), "must have 0 <= START < END <= 1"),
                            (dict(guidance_interval=(0.5,)), "must be two fractions (START, END)")):
        with pytest.raises(LimitError, match=re.escape(message)):
            tiny_pipe("a red circle", num_inference_steps=2, guidance_scale=2.0, **kwargs)


def test_an_unknown_argument_is_the_commands_one_line_error(capsys):
    for argv in (["heatmap", "-o", "maps", "-:"], ["generate", "a red circle", "-o", "x.png", "--no-such-option"]):
        try:
            code = main(argv)
        except SystemExit as e:
            code = e.code
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and len(err) == 1, err
        assert err[0].startswith(f"diffxattn {argv[0]}: error: unrecognized arguments: {argv[-1]}"), err
    assert "after --" in err[0]  # a prompt starting with '-' is the likely mistake
    try:  # a stray argument with a newline (the fuzzer's '-\n') is shown escaped, on the one line
        code = main(["heatmap", "-\n", "-o", "maps"])
    except SystemExit as e:
        code = e.code
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["diffxattn heatmap: error: unrecognized arguments: '-\\n' (a prompt that starts with "
                                 "'-' goes last, after --) (see diffxattn heatmap --help)"], err
