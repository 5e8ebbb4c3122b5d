"""`diffxattn` command line: a thin layer over the Python API.

    diffxattn generate "a red circle at the left" --seed 0 -o out.png
    diffxattn build configs/tiny.yaml -o pipelines/tiny-untrained
    diffxattn train configs/tiny.yaml train.max_steps=20 [--resume latest]
    diffxattn serve                       # a local web app at http://127.0.0.1:7860/

Importing this module loads no torch: each command imports what it needs, so `--help` answers at once.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import sys
import warnings
from pathlib import Path

from . import limits
from .errors import OneLineParser, arg_type, run

DEFAULT_PIPELINE = "pipelines/shapes-32"
MAX_SEED = 2**63 - 1


def default_pipeline() -> str:
    """The shipped pipeline: next to the package in a source checkout, else relative to the working directory."""
    here = Path(__file__).resolve().parent.parent / DEFAULT_PIPELINE
    return str(here) if here.is_dir() else DEFAULT_PIPELINE


def load_pipeline(path: str | None, scheduler: str | None = None, strict: bool = False,
                  scheduler_options: list[str] = ()):
    """Load a saved pipeline folder onto the best available device, optionally switching its scheduler and
    changing its settings (`scheduler_options`: "key=value" strings, e.g. "clip_sample=true")."""
    import torch

    from .pipeline import DiffXAttnPipeline
    from .schedulers import make_scheduler, scheduler_name

    from diffusers.utils import logging as diffusers_logging
    from transformers.utils import logging as transformers_logging

    diffusers_logging.disable_progress_bar()
    transformers_logging.disable_progress_bar()
    path = path or default_pipeline()
    if not Path(path).is_dir():
        raise FileNotFoundError(f"pipeline folder {path!r} does not exist (give --pipeline PATH)")
    if not (Path(path) / "model_index.json").is_file():
        raise FileNotFoundError(f"{path!r} is not a pipeline folder: {os.path.join(path, 'model_index.json')} is missing")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    # weights may be stored in fp16 (the shipped pipeline is); CPUs compute in fp32
    pipe = DiffXAttnPipeline.from_pretrained(path, dtype=torch.float32 if device == "cpu" else None)
    if scheduler or scheduler_options:
        config = {**pipe.scheduler.config, **scheduler_settings(pipe.scheduler, scheduler_options)}
        try:
            pipe.scheduler = make_scheduler(scheduler or scheduler_name(pipe.scheduler), config=config)
        except NotImplementedError as e:  # diffusers: this scheduler lacks the folder's beta_schedule
            raise ValueError(f"--scheduler {scheduler}: {e}") from None
    pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    pipe.strict = strict
    return pipe


def scheduler_settings(scheduler, options: list[str]) -> dict:
    """"key=value" strings -> {key: value} (values read as YAML: true, 0.5, "trailing"); keys must be settings
    of the pipeline's scheduler."""
    import yaml

    settings = {}
    for option in options:
        key, sep, value = option.partition("=")
        if not sep or key not in scheduler.config:
            known = ", ".join(k for k in scheduler.config if not k.startswith("_"))
            raise ValueError(f"--scheduler-option {option!r}: expected KEY=VALUE with KEY one of: {known}")
        settings[key] = yaml.safe_load(value)
    return settings


def generators(seed: int, n: int):
    """One generator per image (seed, seed+1, ...): image k is the same whatever the batch it is made in."""
    import torch

    return [torch.Generator().manual_seed(seed + k) for k in range(n)]


def output_paths(out: str, n: int) -> list[Path]:
    out = Path(out)
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}-{k}{out.suffix or '.png'}") for k in range(n)]


def check_scale(width: int, height: int, scale: int) -> None:
    """The saved PNG (the image enlarged `scale` times) within the pixel limit, before anything is sampled."""
    limits.check(limits.PIXELS, width * scale * height * scale, f"--scale {scale}: a PNG of {width * scale}x"
                 f"{height * scale} pixels")


def save_image(image, path: Path, scale: int = 1) -> None:
    """Write the PNG atomically: a failed write (a full disk) leaves an existing file as it was."""
    from .atomic import save_image as write

    check_scale(image.width, image.height, scale)
    if scale > 1:
        image = image.resize((image.width * scale, image.height * scale), resample=0)
    write(image, path)
    print(path)


def image_size(pipe, args) -> tuple[int, int]:
    """(height, width) the pipeline will sample: the arguments, or the UNet's sample size."""
    size = pipe.unet.config.sample_size
    return args.height or size, args.width or size


def cmd_generate(args) -> None:
    from .generation import generate

    pipe = load_pipeline(args.pipeline, args.scheduler, args.strict)
    height, width = image_size(pipe, args)
    limits.check_images(args.n, height, width)  # before one generator per image is made
    check_scale(width, height, args.scale)
    images = generate(pipe, args.prompt, **weight_options(args.weight_mode), negative_prompt=args.negative,
                      num_inference_steps=args.steps, guidance_scale=args.guidance, num_images_per_prompt=args.n,
                      generator=generators(args.seed, args.n), height=args.height, width=args.width,
                      guide=attention_guide(args), **guidance_options(args)).images
    for image, path in zip(images, output_paths(args.out, args.n)):
        save_image(image, path, args.scale)


STRICT_HELP = ("a prompt longer than the text encoder reads is an error, and so is one that Automatic1111 reads "
               "leniently (an unclosed '(' closed at the end, a stray ')' read as text), a warning otherwise")
A1111_EMPHASIS = {"original": "embedding-a1111", "no-norm": "embedding-a1111-no-norm", "ignore": "attention"}
WEIGHT_MODES = ("attention", "embedding", "embedding-a1111", "embedding-a1111-no-norm", *A1111_EMPHASIS)


def weight_options(mode: str) -> dict:
    """generate()'s keywords for --weight-mode: one of ours, or an Automatic1111 "emphasis" name: original
    (embedding-a1111: the token embeddings scaled, their mean restored), no-norm (embedding-a1111-no-norm: scaled
    only), ignore (weights parsed, then applied in no step)."""
    from .control.steps import StepRange

    if mode == "ignore":
        return {"weight_mode": "attention", "weight_steps": StepRange.fraction(0, 0)}
    return {"weight_mode": A1111_EMPHASIS.get(mode, mode)}


def weight_mode_name(text: str) -> str:
    """--weight-mode as typed: Automatic1111's "No norm" and "Original" are no-norm and original."""
    return text.strip().lower().replace(" ", "-")


def cmd_edit(args) -> None:
    from .control import AttentionStore, StepRange
    from .control.edits import FEATURE_LAYERS
    from .generation import edit
    from .heatmaps import export
    from .images import labelled_grid

    inversion, args.source = source_inversion(args, args.source, "source prompt")
    pipe = load_pipeline(args.pipeline, args.scheduler, args.strict)
    size = pipe.unet.config.sample_size
    check_scale(2 * size, size, args.scale)  # the source and the edit side by side
    cross = {"default": StepRange.parse(args.cross_replace)}
    for item in args.cross_replace_word or []:
        word, _, value = item.partition("=")
        if not value:
            raise ValueError(f"--cross-replace-word {item!r}: expected WORD=FRACTION or WORD=A:B")
        cross[word] = StepRange.parse(value)
    with AttentionStore(pipe) if args.heatmaps else contextlib.nullcontext() as store:
        source, edited = edit(pipe, args.source, args.to, cross_replace=cross, self_replace=StepRange.parse(args.self_replace),
                              feature_replace=StepRange.parse(args.feature_replace),
                              feature_layers=args.feature_layers or FEATURE_LAYERS,
                              local_blend=args.local_blend, blend_threshold=args.blend_threshold, seed=args.seed,
                              inversion=inversion, num_inference_steps=args.steps, guidance_scale=args.guidance,
                              guide=attention_guide(args), **guidance_options(args))
    pair = labelled_grid([("", source), ("", edited)], columns=2, cell=source.width)
    save_image(pair, Path(args.out), args.scale)
    if store:
        export(Path(args.heatmaps) / "source", store, source, args.source, seed=args.seed, index=0)
        export(Path(args.heatmaps) / "edited", store, edited, args.to, seed=args.seed, index=1)
        print(f"heatmaps: {args.heatmaps}/source, {args.heatmaps}/edited")


def cmd_heatmap(args) -> None:
    from .control import AttentionStore, StepRange
    from .generation import generate
    from .heatmaps import export
    from .prompts import clean_text

    inversion, args.prompt = source_inversion(args, args.prompt, "prompt")
    clean_text(args.prompt)  # the export reads the words with the weight syntax: a syntax error comes first
    guide = attention_guide(args)
    if guide and inversion is not None:
        raise ValueError("attention guidance cannot be used with --inversion: it would move the inverted image")
    pipe = load_pipeline(args.pipeline, args.scheduler, args.strict)
    kwargs = dict(num_inference_steps=args.num_steps, guidance_scale=args.guidance, generator=generators(args.seed, 1),
                  **guidance_options(args))
    with AttentionStore(pipe, resolutions=args.resolutions, layers=args.layers, blocks=args.blocks,
                        steps=StepRange.parse(args.steps), per_layer=True) as store:
        if inversion is None:
            image = generate(pipe, args.prompt, guide=guide, **kwargs).images[0]
        else:
            from .inversion import reconstruct

            image = reconstruct(pipe, inversion, **kwargs).images[0]
    meta = export(args.out, store, image, args.prompt, seed=args.seed, scale=args.scale)
    print(f"{args.out}: {len(meta['words'])} word maps ({', '.join(meta['words'])}); open {args.out}/index.html")


def source_inversion(args, prompt: str | None, what: str):
    """(the inversion of --inversion or None, the prompt): with an inversion the prompt is its own. The
    inversion is checked against `pipe` where it is used (`Inversion.apply`)."""
    if args.inversion is None:
        if prompt is None:
            raise ValueError(f"give the {what}, or --inversion DIR to work on an inverted image")
        return None, prompt
    from .inversion import Inversion

    inversion = Inversion.load(args.inversion)
    if prompt is not None and prompt != inversion.prompt:
        raise ValueError(f"the {what} {prompt!r} is not the one {args.inversion} was inverted with "
                         f"({inversion.prompt!r}); leave it out to use that one")
    return inversion, inversion.prompt


def open_image(path: str):
    """The image file as PIL, decoded (a file that is not an image is a one-line error naming it)."""
    from PIL import Image

    try:
        with Image.open(path) as image:
            image.load()
            return image.copy()
    except OSError as e:
        if isinstance(e, FileNotFoundError):
            raise FileNotFoundError(f"image {path!r} does not exist") from None
        raise ValueError(f"{path}: cannot be decoded as an image ({e})") from None


def cmd_invert(args) -> None:
    import numpy as np

    from .checkpoint import check_replaceable
    from .inversion import image_size as image_size_of
    from .inversion import invert, is_inversion_folder, prepare_image, psnr, reconstruct

    if not args.overwrite:  # before the minutes of work
        check_replaceable(Path(args.out), is_inversion_folder, "an inversion folder")
    pipe = load_pipeline(args.pipeline, args.scheduler, args.strict)
    image = prepare_image(open_image(args.image), *image_size_of(pipe))  # converted / resized with a warning

    def progress(done: int, total: int) -> None:
        print(f"\rinverting: step {done}/{total}", end="\n" if done == total else "", file=sys.stderr)

    inversion = invert(pipe, image, args.prompt, method=args.method, steps=args.steps, guidance=args.guidance,
                       guidance_interval=args.guidance_interval, callback=progress if sys.stderr.isatty() else None)
    again = reconstruct(pipe, inversion).images[0]
    inversion.save(args.out, overwrite=True, images={"input.png": image, "reconstruction.png": again})
    print(f"{args.out}: {inversion.method} inversion, {inversion.steps} steps, guidance {inversion.guidance:g}, "
          f"{inversion.seconds:.1f} s; drawn again at PSNR {psnr(np.asarray(again), np.asarray(image)):.1f} dB "
          f"({args.out}/reconstruction.png)")


def cmd_train_clip(args) -> None:
    from .clip_pretrain import train_clip
    from .config import load_config, overrides_from_argv

    cfg = load_config(args.config, overrides_from_argv(args.overrides))
    metrics = train_clip(cfg, args.out, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                         hard_negatives=args.hard_negatives)
    print(f"saved the CLIP text encoder to {args.out} ({metrics}); train with text.pretrained={args.out} text.train=false")


def cmd_samples(args) -> None:
    from .samples import make_samples

    pipe = load_pipeline(args.pipeline)
    for path in make_samples(pipe, args.out, seed=args.seed, curve=args.curve, screenshot=not args.no_screenshot,
                             guidance_reports=args.guidance_reports or []):
        print(path)


def cmd_serve(args) -> None:
    try:
        from .serve.app import serve
    except ImportError as e:
        raise SystemExit(f"diffxattn serve: error: {e.name or e} is not installed; pip install 'diffxattn[serve]'") from None
    serve(args.pipeline, host=args.host, port=args.port)


def cmd_build(args) -> None:
    from .build import build_pipeline
    from .checkpoint import check_replaceable, save_pipeline
    from .config import load_config, overrides_from_argv

    cfg = load_config(args.config, overrides_from_argv(args.overrides))
    if not args.overwrite:  # before the build
        check_replaceable(Path(args.out))
    pipe = build_pipeline(cfg)
    save_pipeline(pipe, args.out, overwrite=args.overwrite)
    n = sum(p.numel() for p in pipe.unet.parameters())
    unet = f"UNet weights from {cfg.model.pretrained}" if cfg.model.pretrained else "untrained UNet"
    print(f"saved a pipeline ({unet}, {n / 1e6:.2f}M parameters) to {args.out}")


def cmd_train(args) -> None:
    from .config import load_config, overrides_from_argv
    from .train import NonFiniteLoss, train

    cfg = load_config(args.config, overrides_from_argv(args.overrides))
    try:
        train(cfg, args.resume)
    except NonFiniteLoss as e:  # a RuntimeError, not bad input: exit 1 as `python -m diffxattn.train` does
        if args.debug:
            raise
        raise SystemExit(f"diffxattn train: error: {e}") from None


def cmd_eval(args) -> None:
    import json

    from .atomic import write_text
    from .eval.run import evaluate, format_report

    methods = args.guided or ()
    guide = attention_guide(args, **{m: "auto" for m in ("excite", "bind", "arrange") if m in methods})
    pipe = load_pipeline(args.pipeline, args.scheduler, scheduler_options=args.scheduler_option or [])
    report = evaluate(pipe, quick=args.quick, seeds=args.seeds, guidance_scales=args.guidance,
                      guidance_scale=args.main_guidance, **guidance_options(args),
                      steps=args.steps, sets=tuple(s.strip() for s in args.sets.split(",") if s.strip()),
                      heatmaps=not args.no_heatmaps, edits=not args.no_edits, edit_prompts=args.edit_prompts,
                      guide=guide, boxes=args.boxes if "box" in methods else 0,
                      pipeline=args.pipeline or default_pipeline(), progress=sys.stderr.isatty())
    print(format_report(report))
    write_text(args.out, json.dumps(report, indent=2))
    print(f"wrote {args.out}")


# argument types: bad values are refused while parsing, with argparse's one-line error naming the option
def _parse(text: str, kind: type):
    try:
        return kind(text)
    except ValueError:
        raise ValueError(f"expected a {'whole number' if kind is int else 'number'}, got {text!r}") from None


def count(text: str) -> int:
    """A whole number >= 1 (-n, --scale, --height, ...)."""
    value = _parse(text, int)
    if value < 1:
        raise ValueError(f"expected a whole number >= 1, got {text}")
    return value


def steps(text: str) -> int:
    return limits.steps(_parse(text, int), "steps")


def guidance(text: str) -> float:
    return limits.guidance(_parse(text, float), "guidance")


def fraction(text: str) -> float:
    """A number from 0 to 1 (--guidance-rescale)."""
    value = _parse(text, float)
    if not 0 <= value <= 1:  # NaN fails too
        raise ValueError(f"expected a number from 0 to 1, got {text}")
    return value


def interval(text: str) -> tuple[float, float]:
    """'A:B' fractions of the steps, 0 <= A < B <= 1 (--guidance-interval)."""
    start, sep, end = text.partition(":")
    if not sep:
        raise ValueError(f"expected START:END fractions of the steps, e.g. 0:0.6, got {text!r}")
    return limits.interval((_parse(start, float), _parse(end, float)), "START:END")


def fractions(text: str) -> tuple[float, ...]:
    """'F,...' step fractions strictly between 0 and 1 (--box-moves)."""
    values = tuple(_parse(v.strip(), float) for v in text.split(","))
    if not all(0 < v < 1 for v in values):  # NaN fails too
        raise ValueError(f"expected comma-separated fractions of the steps between 0 and 1, e.g. 0.4,0.6, got {text}")
    return values


def seed(text: str) -> int:
    value = _parse(text, int)
    if not 0 <= value <= MAX_SEED:
        raise ValueError(f"expected a seed from 0 to 2**63 - 1, got {text}")
    return value


def rate(text: str) -> float:
    value = _parse(text, float)
    if not (math.isfinite(value) and value > 0):
        raise ValueError(f"expected a finite number > 0, got {text}")
    return value


def port(text: str) -> int:
    value = _parse(text, int)
    if not 0 <= value <= 65535:
        raise ValueError(f"expected a port from 0 to 65535, got {text}")
    return value


COUNT, STEPS, GUIDANCE, FRACTION, FRACTIONS, INTERVAL, SEED, RATE, PORT = (arg_type(f) for f in (
    count, steps, guidance, fraction, fractions, interval, seed, rate, port))
BOX_METHODS = ("move", "gradient")  # control.guided.BOX_METHODS (not imported: the CLI starts without torch)


def add_guidance_options(p: argparse.ArgumentParser) -> None:
    """--guidance-rescale and --guidance-interval, read by `guidance_options`."""
    p.add_argument("--guidance-rescale", type=FRACTION, default=0.0,
                   help="rescale the guided prediction towards the conditional one's spread, 0..1 (0: off)")
    p.add_argument("--guidance-interval", type=INTERVAL, metavar="A:B",
                   help="guide only in this fraction of the steps, e.g. 0:0.5 (default: the pipeline's)")


def guidance_options(args) -> dict:
    return {"guidance_rescale": args.guidance_rescale, "guidance_interval": args.guidance_interval}


def add_attention_guide_options(p: argparse.ArgumentParser, words: bool = True) -> None:
    """--excite, --bind, --box (with `words`) and the guide's settings, read by `attention_guide`."""
    a = p.add_argument_group("attention-guided sampling (steer the latents by the words' cross-attention maps)")
    if words:
        a.add_argument("--excite", metavar="WORD,...", help="each word gets a strong peak in its attention map, so "
                       "its object is drawn (Attend-and-Excite); words as heatmaps name them: circle, circle#2")
        a.add_argument("--bind", nargs="?", const="auto", metavar="ATTRIBUTE=NOUN,...",
                       help="each attribute word attends where its noun does, not on the other nouns (Divide & Bind); "
                       "without a value: every color and size word to its shape (prompts in the shapes grammar)")
        a.add_argument("--box", nargs="+", metavar="WORD=X0,Y0,X1,Y1",
                       help="the word's object is drawn in the box, in fractions of the image (see --box-method)")
        a.add_argument("--arrange", nargs="?", const="auto", metavar="WORD,...",
                       help="start from the best of --candidates noises by the layout the objects' maps show early "
                       "(apart, each in one place, as a relation between them says: left of, right of, above, below); "
                       "without a value: every shape word (prompts in the shapes grammar)")
    a.add_argument("--guide-steps", metavar="A:B", help="the guided steps (default 0:0.5, the first half)")
    a.add_argument("--guide-step-size", type=RATE, help="RMS change of the latents per gradient step (default 0.1)")
    a.add_argument("--guide-iterations", type=COUNT, help="most gradient steps at a refinement step (default 5)")
    a.add_argument("--bind-loss", choices=("jsd", "syngen"), help="jsd (Divide & Bind, default) or syngen (SynGen)")
    a.add_argument("--box-method", choices=BOX_METHODS, help="move (default: the word's map locates its object, "
                   "which is carried into the box at --box-moves) or gradient (BoxDiff's losses over --guide-steps)")
    a.add_argument("--box-moves", type=FRACTIONS, metavar="F,...",
                   help="step fractions at which --box-method move places the objects (default 0.4,0.6)")
    a.add_argument("--candidates", type=COUNT, help="starting noises --arrange tries per image (default 4; the "
                   "first is the seed's own, the others seeds + 1000, + 2000, ...)")
    a.add_argument("--arrange-at", type=FRACTION, metavar="F",
                   help="the step fraction at which --arrange reads the layout (default 0.25)")


def attention_guide(args, excite=None, bind=None, boxes=None, arrange=None):
    """The Guide the options ask for (the word options given here, for eval); false when it names no word."""
    from .control.guided import parse_options

    return parse_options(getattr(args, "excite", excite), getattr(args, "bind", bind), getattr(args, "box", boxes),
                         getattr(args, "arrange", arrange), steps=args.guide_steps, step_size=args.guide_step_size,
                         iterations=args.guide_iterations, bind_loss=args.bind_loss, box_method=args.box_method,
                         moves=args.box_moves, candidates=args.candidates, arrange_at=args.arrange_at)


def guided_methods(text: str) -> tuple[str, ...]:
    """--guided: comma-separated methods of excite, bind, box, arrange."""
    methods = tuple(m.strip() for m in text.split(","))
    unknown = [m for m in methods if m not in GUIDED_METHODS]
    if unknown or not methods:
        raise ValueError(f"unknown method {', '.join(map(repr, unknown or [text]))}; expected comma-separated "
                         f"methods of {', '.join(GUIDED_METHODS)}")
    return methods


GUIDED_METHODS = ("excite", "bind", "box", "arrange")
GUIDED = arg_type(guided_methods)


def parser() -> argparse.ArgumentParser:
    p = OneLineParser(prog="diffxattn", description=__doc__.split("\n")[0])
    p.add_argument("--debug", action="store_true", help="show full tracebacks")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate images from a prompt")
    g.add_argument("prompt")
    g.add_argument("--pipeline", help=f"pipeline folder (default: {DEFAULT_PIPELINE})")
    g.add_argument("--seed", type=SEED, default=0)
    g.add_argument("--steps", type=STEPS, help="denoising steps (default: the pipeline's)")
    g.add_argument("--guidance", type=GUIDANCE,
                   help="classifier-free guidance scale, 1 to 100; 1 = none (default: the pipeline's)")
    g.add_argument("--scheduler", help="ddpm, ddim, dpm-solver++, euler, euler-ancestral, heun, unipc")
    g.add_argument("--strict", action="store_true", help=STRICT_HELP)
    g.add_argument("--negative", help="negative prompt")
    g.add_argument("-n", type=COUNT, default=1, help="number of images (seeds seed, seed+1, ...)")
    g.add_argument("--height", type=COUNT)
    g.add_argument("--width", type=COUNT)
    g.add_argument("--scale", type=COUNT, default=1, help="enlarge the saved PNG by this factor (nearest)")
    add_guidance_options(g)
    add_attention_guide_options(g)
    g.add_argument("--weight-mode", default="attention", type=weight_mode_name, choices=WEIGHT_MODES,
                   help="how (word:1.5) / word++ weights act: on cross-attention or on token embeddings; "
                   "Automatic1111's emphasis: original (= embedding-a1111), no-norm, ignore")
    g.add_argument("-o", "--out", default="out.png")
    g.set_defaults(func=cmd_generate)

    e = sub.add_parser("edit", help="prompt-to-prompt: edit an image by editing its prompt, keeping the layout")
    e.add_argument("source", nargs="?", help="the source prompt (with --inversion: the inversion's)")
    e.add_argument("--inversion", metavar="DIR", help="edit an inverted image (`diffxattn invert`) instead of one "
                   "drawn from --seed")
    e.add_argument("--to", required=True, help="the edited prompt (weights like (red:1.5) reweight shared words)")
    e.add_argument("--pipeline", help=f"pipeline folder (default: {DEFAULT_PIPELINE})")
    e.add_argument("--seed", type=SEED, default=0)
    e.add_argument("--steps", type=STEPS)
    e.add_argument("--guidance", type=GUIDANCE)
    e.add_argument("--scheduler")
    add_guidance_options(e)
    add_attention_guide_options(e)
    e.add_argument("--strict", action="store_true", help=STRICT_HELP)
    e.add_argument("--cross-replace", default="0.8", help="fraction of steps (0.8) or step range A:B")
    e.add_argument("--cross-replace-word", nargs="+", metavar="WORD=RANGE", help="per-word cross-replace, e.g. blue=0.3")
    e.add_argument("--self-replace", default="0.4", help="fraction of steps or A:B for self-attention maps")
    e.add_argument("--feature-replace", default="0",
                   help="fraction of steps or A:B in which the edit takes the source's decoder features: keeps shape "
                        "and position exactly, for attribute (color) edits; 0.8 is a good value (default 0: off)")
    e.add_argument("--feature-layers", nargs="+", metavar="MODULE",
                   help="UNet ResBlocks whose features --feature-replace injects (default: the decoder's first, "
                        "up_blocks.0.resnets.0)")
    e.add_argument("--local-blend", nargs="+", metavar="WORD", help="edit only where these words attend")
    e.add_argument("--blend-threshold", type=float, default=0.3,
                   help="local blend mask: where the words' min-max scaled maps exceed this (0..1)")
    e.add_argument("--heatmaps", metavar="DIR", help="also export both heatmap sets into DIR/source, DIR/edited")
    e.add_argument("--scale", type=COUNT, default=1)
    e.add_argument("-o", "--out", default="edit.png")
    e.set_defaults(func=cmd_edit)

    h = sub.add_parser("heatmap", help="per-word cross-attention heatmaps: PNGs, raw maps, an HTML viewer")
    h.add_argument("prompt", nargs="?", help="the prompt (with --inversion: the inversion's)")
    h.add_argument("--inversion", metavar="DIR", help="the maps of an inverted image (`diffxattn invert`)")
    h.add_argument("--pipeline", help=f"pipeline folder (default: {DEFAULT_PIPELINE})")
    h.add_argument("--seed", type=SEED, default=0)
    h.add_argument("--num-steps", type=STEPS, help="denoising steps (default: the pipeline's)")
    h.add_argument("--guidance", type=GUIDANCE)
    h.add_argument("--scheduler")
    add_guidance_options(h)
    add_attention_guide_options(h)
    h.add_argument("--strict", action="store_true", help=STRICT_HELP)
    h.add_argument("--steps", default="0:1.0", help="steps to aggregate: START:END, step indices (0:10) or "
                   "fractions of the run (0.2:1.0)")
    h.add_argument("--resolutions", type=int, nargs="+", help="map resolutions to use, e.g. 16 8 (default: all)")
    h.add_argument("--layers", nargs="+", help="keep layers whose name contains one of these, e.g. up_blocks")
    h.add_argument("--blocks", nargs="+", choices=("down", "mid", "up"))
    h.add_argument("--scale", type=COUNT, default=8, help="enlargement of the overlay PNGs")
    h.add_argument("-o", "--out", required=True)
    h.set_defaults(func=cmd_heatmap)

    i = sub.add_parser("invert", help="invert an image: the noise (and null-text embeddings) from which the "
                                      "pipeline draws it again, for heatmaps and edits of that image")
    i.add_argument("image", help="an image file; converted to RGB and resized to the pipeline's size, with a warning")
    i.add_argument("--prompt", required=True, help="what the image shows, as you would prompt for it")
    i.add_argument("--method", default="null-text", choices=("null-text", "fixed-point", "ddim"),
                   help="null-text (default): exact under guidance; fixed-point: exact without guidance; "
                        "ddim: fast, approximate (bench/results/inversion.md)")
    i.add_argument("--pipeline", help=f"pipeline folder (default: {DEFAULT_PIPELINE})")
    i.add_argument("--steps", type=STEPS, help="the sampler's steps the inversion is for (default: the pipeline's)")
    i.add_argument("--guidance", type=GUIDANCE, help="the guidance scale it is for (default: the pipeline's)")
    i.add_argument("--guidance-interval", type=INTERVAL, metavar="A:B",
                   help="the fraction of the steps guided (default: the pipeline's)")
    i.add_argument("--scheduler", help="the sampler (inversion supports ddim)")
    i.add_argument("--strict", action="store_true", help=STRICT_HELP)
    i.add_argument("--overwrite", action="store_true", help="replace OUT even if it is not an inversion folder")
    i.add_argument("-o", "--out", required=True, help="folder for inversion.safetensors/.json, input.png and "
                   "reconstruction.png")
    i.set_defaults(func=cmd_invert)

    v = sub.add_parser("eval", help="score a pipeline: accuracy, guidance curve, heatmap IoU, edit metrics")
    v.add_argument("pipeline", nargs="?", help=f"pipeline folder (default: {DEFAULT_PIPELINE})")
    v.add_argument("-o", "--out", default="report.json", help="where to write the JSON report")
    v.add_argument("--quick", action="store_true", help="a handful of prompts per set, 1 seed, few steps")
    v.add_argument("--seeds", type=COUNT, help="images per prompt (default 4; quick 1)")
    v.add_argument("--guidance", type=GUIDANCE, nargs="+",
                   help="guidance scales of the curve (default 1 2 3 5; quick 1 3)")
    v.add_argument("--main-guidance", type=GUIDANCE,
                   help="guidance scale of the per-set table, heatmaps and edits (default: the pipeline's)")
    v.add_argument("--steps", type=STEPS, help="denoising steps (default: the pipeline's; quick at most 10)")
    v.add_argument("--scheduler", help="sample with this scheduler instead of the pipeline's (its settings kept)")
    v.add_argument("--scheduler-option", nargs="+", metavar="KEY=VALUE",
                   help="change scheduler settings, e.g. clip_sample=true timestep_spacing=trailing")
    add_guidance_options(v)
    v.add_argument("--sets", default="single,two,heldout", help="comma-separated prompt sets")
    v.add_argument("--no-heatmaps", action="store_true", help="skip heatmap IoU")
    v.add_argument("--no-edits", action="store_true", help="skip the edit metrics")
    v.add_argument("--guided", type=GUIDED, metavar="METHOD,...",
                   help="attention-guided sampling: excite (every shape word), bind (every color and size word to its "
                   "shape), box (also score --boxes prompts drawn into random boxes), arrange (every shape word); "
                   "e.g. excite,bind")
    v.add_argument("--boxes", type=COUNT, default=64, help="prompts of the box score (with --guided box; default 64)")
    add_attention_guide_options(v, words=False)
    v.add_argument("--edit-prompts", type=COUNT, help="single-object prompts edited (the set's first N; default 8, quick 2)")
    v.set_defaults(func=cmd_eval)

    c = sub.add_parser("train-clip", help="pre-train a CLIP text encoder contrastively on the config's data")
    c.add_argument("config")
    c.add_argument("-o", "--out", required=True)
    c.add_argument("--steps", type=COUNT, default=3000)
    c.add_argument("--batch-size", type=COUNT, default=256)
    c.add_argument("--lr", type=RATE, default=1e-3)
    c.add_argument("--hard-negatives", action="store_true",
                   help="NegCLIP: each image also competes with its caption's colors/shapes swapped or relation mirrored")
    c.set_defaults(func=cmd_train_clip)

    sm = sub.add_parser("samples", help="regenerate the sample images (gallery, heatmaps, edits, reweighting)")
    sm.add_argument("--pipeline", help=f"pipeline folder (default: {DEFAULT_PIPELINE})")
    sm.add_argument("--seed", type=SEED, default=0)
    sm.add_argument("--curve", help="accuracy-vs-training-time JSON (from the run's checkpoints) to plot")
    sm.add_argument("--no-screenshot", action="store_true", help="skip the headless-Chromium viewer screenshot")
    sm.add_argument("--guidance-reports", nargs="+", metavar="EVAL.json",
                    help="`diffxattn eval` reports whose guidance curves to plot in guidance.png (one line each)")
    sm.add_argument("-o", "--out", default="samples")
    sm.set_defaults(func=cmd_samples)

    sv = sub.add_parser("serve", help="a local web app: generate, see each word's heatmap, reweight and edit, live")
    sv.add_argument("--pipeline", help=f"pipeline folder (default: {DEFAULT_PIPELINE})")
    sv.add_argument("--host", default="127.0.0.1",
                    help="address to listen on (default 127.0.0.1: this machine only; others get a warning)")
    sv.add_argument("--port", type=PORT, default=7860, help="port (default 7860; 0: any free port)")
    sv.set_defaults(func=cmd_serve)

    b = sub.add_parser("build", help="build and save a pipeline from a YAML config (untrained, except for what "
                                     "model.pretrained and text.pretrained load)")
    b.add_argument("config")
    b.add_argument("-o", "--out", required=True)
    b.add_argument("--overwrite", action="store_true",
                   help="replace OUT even if it holds other files than a pipeline diffxattn wrote")
    b.epilog = "Any config field can be overridden: --text.hidden_size 64 or text.hidden_size=64"
    b.set_defaults(func=cmd_build)

    t = sub.add_parser("train", help="train a model from a YAML config (one process; `accelerate launch -m "
                                     "diffxattn.train` for several)")
    t.add_argument("config")
    t.add_argument("--resume", help="'latest' (the newest complete checkpoint) or a checkpoint folder")
    t.epilog = "Any config field can be overridden: --train.max_steps 2000 or train.max_steps=2000"
    t.set_defaults(func=cmd_train)
    return p


def main(argv: list[str] | None = None) -> int:
    """Exit code 0, or 2 with one line on stderr for bad input (`errors.run`; --debug: the traceback)."""
    p = parser()
    args, extra = p.parse_known_args(argv)
    if extra and args.command not in ("build", "train", "train-clip"):
        dash = " (a prompt that starts with '-' goes last, after --)" if any(e.startswith("-") for e in extra) else ""
        shown = " ".join(e if e.isprintable() else repr(e) for e in extra)  # a newline in one would end the line
        OneLineParser(prog=f"diffxattn {args.command}").error(f"unrecognized arguments: {shown}{dash}")
    args.overrides = extra
    return run(f"diffxattn {args.command}", lambda: with_prompt_warnings(args), args.debug)


def with_prompt_warnings(args):
    """Run the command; a prompt read leniently, as Automatic1111 reads it (an unclosed '(' closed at the end: a
    PromptSyntaxWarning), is said once on stderr in three lines (problem, prompt, caret); with --strict it is
    the error it warns of."""
    from .prompt_syntax import PromptSyntaxError, PromptSyntaxWarning

    shown = set()
    with warnings.catch_warnings():
        default = warnings.showwarning

        def show(message, category, *rest):
            if not issubclass(category, PromptSyntaxWarning):
                return default(message, category, *rest)
            if str(message) not in shown:  # the prompt is parsed more than once (schedule, words, heatmaps)
                shown.add(str(message))
                print(f"diffxattn {args.command}: warning: {message}", file=sys.stderr)

        warnings.showwarning = show
        warnings.simplefilter("error" if getattr(args, "strict", False) else "always", PromptSyntaxWarning)
        try:
            return args.func(args)
        except PromptSyntaxWarning as w:
            raise PromptSyntaxError(w.prompt, w.column, w.problem) from None


if __name__ == "__main__":
    sys.exit(main())
