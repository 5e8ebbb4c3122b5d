"""Bad input, damaged files, untrusted prompts: clear errors, no lost data, nothing executed."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from diffxattn import DiffXAttnPipeline
from diffxattn.browser import SKIP_REASON, chromium_available, open_page
from diffxattn.control import AttentionStore
from diffxattn.heatmaps import export
from diffxattn.conditioning import PromptTooLongError
from conftest import seeded

LONG = "a red circle left of a blue square above a green triangle below a yellow diamond"


def cli(*args):
    return subprocess.run([sys.executable, "-m", "diffxattn.cli", *args], capture_output=True, text=True, timeout=300,
                          env={**os.environ, "HF_HUB_OFFLINE": "1"})


def test_too_long_prompt_warns_with_dropped_words_or_fails_when_strict(tiny_pipe):
    with pytest.warns(UserWarning, match="these words are dropped: yellow diamond"):
        tiny_pipe(LONG, num_inference_steps=1, generator=seeded(0))
    tiny_pipe.strict = True
    try:
        with pytest.raises(PromptTooLongError, match="16 tokens; these words are dropped: yellow diamond"):
            tiny_pipe(LONG, num_inference_steps=1)
    finally:
        tiny_pipe.strict = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        tiny_pipe("a red circle", num_inference_steps=1)  # a short prompt warns about nothing


def test_heatmaps_only_cover_kept_words(tiny_pipe):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with AttentionStore(tiny_pipe) as store:
            tiny_pipe(LONG, num_inference_steps=2, generator=seeded(0))
    words = [w for w, _ in store.words()]
    assert words[-2:] == ["below", "a"] and "yellow" not in words and "diamond" not in words


@pytest.mark.parametrize("prompt", ["", "ünïcödé 🎨 ✨", "\x00\x1b[31m\t\n red", "red " * 500, "<|endoftext|> red"])
def test_odd_prompts_generate_an_image(tiny_pipe, prompt):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = tiny_pipe(prompt, num_inference_steps=2, generator=seeded(0), output_type="np").images
    assert out.shape == (1, 16, 16, 3) and np.isfinite(out).all()


def test_untrusted_prompt_exports_safe_files_and_html(tiny_pipe, tmp_path):
    prompt = 'a </script><script>window.__pwned=1</script> "red" ../../etc/passwd CON nul <img src=x onerror="window.__pwned=1">'
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with AttentionStore(tiny_pipe) as store:
            image = tiny_pipe(prompt, num_inference_steps=2, generator=seeded(0)).images[0]
    out = tmp_path / "maps"
    export(out, store, image, prompt, seed=0)
    root = out.resolve()
    for path in tmp_path.rglob("*"):
        assert path.resolve().is_relative_to(root), path
    names = [p.name for p in out.iterdir()]
    assert all(n.startswith(("word-", "image", "prompt", "seed", "grid", "maps", "index")) for n in names)
    assert not any(n.split(".")[0].upper() in ("CON", "NUL") for n in names)
    html = (out / "index.html").read_text()
    assert "<script>window.__pwned" not in html and "<img src=x" not in html
    assert json.loads((out / "maps.json").read_text())["prompt"] == prompt
    if not chromium_available():
        pytest.skip(SKIP_REASON)
    with open_page(out / "index.html") as driver:
        assert driver.execute_script("return typeof window.__pwned") == "undefined"
        assert "</script>" in driver.execute_script("return document.body.textContent")


@pytest.fixture
def saved(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    return tmp_path / "pipe"


def test_damaged_pipeline_files_are_named(saved):
    weights = saved / "unet" / "diffusion_pytorch_model.safetensors"
    good = weights.read_bytes()
    weights.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match=f"{weights} is truncated or corrupted"):
        DiffXAttnPipeline.from_pretrained(saved)
    state = load_file(str(saved / "text_encoder" / "model.safetensors"))
    weights.write_bytes(good)
    tensors = load_file(str(weights))
    tensors["conv_in.bias"] = torch.zeros(3)
    save_file(tensors, str(weights))
    with pytest.raises(ValueError, match=f"{weights}: weight conv_in.bias has shape .*3.*expects .*16"):
        DiffXAttnPipeline.from_pretrained(saved)
    assert state  # the other component's file was untouched
    (saved / "model_index.json").unlink()
    r = cli("generate", "a red circle", "--pipeline", str(saved))
    assert r.returncode == 2 and "model_index.json is missing" in r.stderr and "Traceback" not in r.stderr


def test_cli_debug_shows_the_traceback(saved):
    r = cli("--debug", "generate", "a red circle", "--pipeline", str(saved), "--scheduler", "nope")
    assert r.returncode != 0 and "Traceback" in r.stderr
    r = cli("generate", "a (red circle", "--pipeline", str(saved), "--strict")
    assert r.returncode == 2 and "Traceback" not in r.stderr and "^" in r.stderr
    r = cli("generate", LONG, "--pipeline", str(saved), "--strict", "-o", str(saved / "x.png"))
    assert r.returncode == 2 and "dropped: yellow diamond" in r.stderr


@pytest.mark.parametrize("config,message", [
    ("model:\n  colour: 3\n", "unknown key 'model.colour'; allowed keys in model: kind, sample_size"),
    ("train:\n  batch_size: big\n", "train.batch_size: expected int, got 'big'"),
    ("train:\n  caption_dropout: 1.5\n", "train.caption_dropout=1.5 must be in [0, 1]"),
    ("scheduler:\n  sampler: fast\n", "scheduler.sampler='fast' is not allowed; choose one of"),
])
def test_bad_configs_give_one_clear_line(tmp_path, config, message):
    path = tmp_path / "bad.yaml"
    path.write_text(config)
    r = cli("build", str(path), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert message in r.stderr and len(r.stderr.strip().splitlines()) == 1
    r = cli("build", str(tmp_path / "missing.yaml"), "-o", str(tmp_path / "out"))
    assert r.returncode == 2 and "missing.yaml' does not exist" in r.stderr


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_sampling_on_cpu_works(tiny_pipe, dtype):
    tiny_pipe.to(dtype)
    try:
        out = tiny_pipe("a red circle", num_inference_steps=2, generator=seeded(0), output_type="np").images
    finally:
        tiny_pipe.to(torch.float32)
    ref = tiny_pipe("a red circle", num_inference_steps=2, generator=seeded(0), output_type="np").images
    assert np.isfinite(out).all() and np.abs(out - ref).max() < 0.1
