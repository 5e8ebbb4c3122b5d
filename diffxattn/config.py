"""Experiment config: one YAML file -> small dataclasses. Unknown keys and wrong types are errors.

    model:     the UNet (XAttnUNet arguments, or `kind: diffusers` for a UNet2DConditionModel)
    text:      the text encoder: a CLIP folder / hub id, or a small one built from the captions
    scheduler: noise schedule, prediction type, and the sampling defaults saved with the pipeline
    data:      shapes scenes or an image folder
    optim:     AdamW + learning-rate schedule
    train:     batch, steps, precision, EMA, guidance dropout, checkpoints
    logging:   validation images, TensorBoard

Override any field from the command line: `--train.lr 3e-4` style, as `section.field=value` strings.
"""

from __future__ import annotations

import dataclasses
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import limits
from .errors import short_repr

MAX_YAML_VALUES = 100_000  # a config expands to at most this many values, counting an alias each time it is used


class _Loader(yaml.SafeLoader):
    """YAML 1.2 booleans: only true/false, so `mixed_precision: no` stays the string "no"."""


_Loader.yaml_implicit_resolvers = {
    k: [(tag, rx) for tag, rx in v if tag != "tag:yaml.org,2002:bool"] for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


class ConfigError(ValueError):
    """A config key, type or value is not allowed; the message names it and what is allowed."""


def _yaml(text: str):
    """Parse YAML, refusing documents whose aliases expand to more than MAX_YAML_VALUES values (a 433-byte
    "billion laughs" file) or refer to themselves, before anything is built from them."""
    loader = _Loader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _expanded_size(node, {}, set())
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _expanded_size(node: yaml.Node, sizes: dict, open_: set) -> int:
    """How many values `node` stands for once every alias is expanded (memoised: linear in the file)."""
    if id(node) in sizes:
        return sizes[id(node)]
    if id(node) in open_:
        raise ConfigError(f"YAML alias at line {node.start_mark.line + 1} refers to itself")
    open_.add(id(node))
    children = node.value if isinstance(node, yaml.SequenceNode) else \
        [n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode) else []
    size = 1 + sum(_expanded_size(child, sizes, open_) for child in children)
    open_.discard(id(node))
    if size > MAX_YAML_VALUES:
        raise ConfigError(f"YAML at line {node.start_mark.line + 1} expands to more than {MAX_YAML_VALUES:,} "
                          "values (aliases repeated inside aliases); write the values out")
    sizes[id(node)] = size
    return size


@dataclass
class ModelConfig:
    kind: str = "xattn"  # "xattn" (XAttnUNet) or "diffusers" (UNet2DConditionModel, for comparisons)
    sample_size: int = 32
    block_out_channels: tuple[int, ...] = (32, 64, 96)
    layers_per_block: int | tuple[int, ...] = 2  # ResBlocks per level: one for all, or one per level
    cross_attention_resolutions: tuple[int, ...] = (16, 8)
    self_attention_resolutions: tuple[int, ...] = (8,)
    num_heads: int = 4
    gated_cross_attention: bool = False
    query_pos_embed: bool = True
    ff_mult: int = 2
    patch_size: int = 1  # p > 1: a p x p patch stem, the first level at 1/p of the image's resolution
    # diffusers UNet2DConditionModel only: which levels get attention blocks (CrossAttn* vs plain blocks)
    diffusers_attention_levels: tuple[int, ...] | None = None
    # fine-tuning: start from this UNet's weights (a pipeline folder with unet/, or a UNet folder); the
    # fields above must describe the same architecture
    pretrained: str | None = None


@dataclass
class TextConfig:
    pretrained: str | None = None  # CLIP folder, pipeline folder or hub id; None = build a small CLIP from the captions
    train: bool = True  # train jointly with the UNet (False = frozen)
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    max_length: int = 24
    vocab_captions: int = 20000  # captions sampled from the dataset to learn the BPE vocabulary


@dataclass
class SchedulerConfig:
    prediction_type: str = "v_prediction"
    beta_schedule: str = "squaredcos_cap_v2"
    num_train_timesteps: int = 1000
    sampler: str = "ddim"  # scheduler saved with the pipeline, used for validation and by default
    steps: int = 30
    guidance_scale: float = 1.0
    guidance_interval: tuple[float, float] = (0.0, 1.0)  # fractions of the steps that are guided


@dataclass
class DataConfig:
    kind: str = "shapes"  # "shapes" or "imagefolder"
    root: str | None = None  # imagefolder: folder with metadata.jsonl
    size: int = 32
    min_objects: int = 1
    max_objects: int = 2
    two_object_prob: float = 0.5
    holdout: tuple[tuple[str, str], ...] | None = None  # None = the dataset's default held-out pairs
    seed: int = 0
    length: int = 100_000  # shapes: how many distinct scenes an epoch has (generated on demand)
    num_workers: int = 0


@dataclass
class OptimConfig:
    lr: float = 5e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 100
    lr_schedule: str = "cosine"  # "cosine" or "constant"
    max_grad_norm: float = 1.0


@dataclass
class TrainConfig:
    output_dir: str = "runs/shapes-32"
    batch_size: int = 64  # per process, per micro-step
    max_steps: int = 4000  # optimizer steps
    gradient_accumulation_steps: int = 1
    mixed_precision: str | None = None  # None = whatever `accelerate launch` was told; or "no", "bf16", "fp16"
    ema: bool = True
    ema_decay: float = 0.999
    caption_dropout: float = 0.1
    snr_gamma: float | None = 5.0  # min-SNR-gamma loss weighting; None = plain MSE
    seed: int = 0
    checkpoint_every: int = 500
    checkpoints_total_limit: int | None = 3
    stop_at_step: int | None = None  # end this invocation early (checkpointed); the LR schedule still spans max_steps
    debug_nan_at_step: int | None = None  # debugging/tests: the loss of this optimizer step becomes NaN
    # torch threads per process on CPU; None = the cores this process may use, split among the machine's
    # processes (`accelerate launch` alone sets OMP_NUM_THREADS=1, half the speed of 2 cores)
    cpu_threads: int | None = None


@dataclass
class LoggingConfig:
    log_every: int = 10
    validate_every: int = 500
    validation_prompts: tuple[str, ...] = ("a red circle at the left", "a blue square at the top",
                                           "a green triangle left of a yellow circle", "a purple diamond")
    validation_seed: int = 0
    tensorboard: bool = True


@dataclass
class ExperimentConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    text: TextConfig = field(default_factory=TextConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


CHOICES = {
    ("model", "kind"): ("xattn", "diffusers"),
    ("scheduler", "prediction_type"): ("epsilon", "v_prediction"),
    ("data", "kind"): ("shapes", "imagefolder"),
    ("optim", "lr_schedule"): ("cosine", "constant"),
    ("train", "mixed_precision"): (None, "no", "bf16", "fp16"),
    # the schedules every sampler of schedulers.py implements
    ("scheduler", "beta_schedule"): ("linear", "scaled_linear", "squaredcos_cap_v2"),
}
POSITIVE = {("train", "batch_size"), ("train", "max_steps"), ("train", "gradient_accumulation_steps"),
            ("train", "checkpoint_every"), ("logging", "log_every"), ("logging", "validate_every"),
            ("scheduler", "steps"), ("model", "sample_size"), ("data", "size"), ("optim", "lr"), ("model", "patch_size"),
            ("train", "cpu_threads"), ("model", "num_heads"), ("model", "ff_mult"), ("text", "hidden_size"),
            ("text", "num_layers"), ("text", "num_heads"), ("text", "max_length"), ("text", "vocab_captions"),
            ("scheduler", "num_train_timesteps"),
            ("train", "checkpoints_total_limit")}  # None (where allowed) is not checked
UNIT_INTERVAL = {("train", "caption_dropout"), ("train", "ema_decay"), ("data", "two_object_prob")}
# fixed bounds where a bigger value only makes a run take hours or start thousands of processes/threads
AT_MOST = {("text", "vocab_captions"): 200_000, ("data", "num_workers"): 256, ("train", "cpu_threads"): 4096}


def _coerce(value, tp, where: str):
    """Check `value` against the annotation `tp`, converting lists to tuples and ints to floats."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except ConfigError as e:
                errors.append(e)
        raise errors[0]
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {short_repr(value)}")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
        if len(value) != len(args):
            raise ConfigError(f"{where}: expected a list of {len(args)} values, got {short_repr(value)}")
        return tuple(_coerce(v, a, f"{where}[{i}]") for i, (v, a) in enumerate(zip(value, args)))
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        value = float(value) if abs(value) < 2**1023 else math.inf
    if tp is bool and not isinstance(value, bool) or tp is int and isinstance(value, bool) \
            or not isinstance(value, tp):
        raise ConfigError(f"{where}: expected {tp.__name__}, got {short_repr(value)} ({type(value).__name__})")
    if tp is float and not math.isfinite(value):
        raise ConfigError(f"{where}: expected a finite number, got {value!r}")
    return value


def _build(cls, data: dict, where: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'config'}: expected a mapping of keys, got {short_repr(data)}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    kwargs = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in names:
            raise ConfigError(f"unknown key {path!r}; allowed keys{' in ' + where if where else ''}: {', '.join(names)}")
        tp = hints[key]
        kwargs[key] = _build(tp, value, path) if dataclasses.is_dataclass(tp) else _coerce(value, tp, path)
    return cls(**kwargs)


def validate(cfg: ExperimentConfig) -> ExperimentConfig:
    for (section, key), allowed in CHOICES.items():
        value = getattr(getattr(cfg, section), key)
        if value not in allowed:
            raise ConfigError(f"{section}.{key}={short_repr(value)} is not allowed; choose one of {allowed}")
    for section, key in POSITIVE:
        value = getattr(getattr(cfg, section), key)
        if value is not None and value <= 0:
            raise ConfigError(f"{section}.{key}={value!r} must be > 0")
    for section, key in UNIT_INTERVAL:
        value = getattr(getattr(cfg, section), key)
        if not 0 <= value <= 1:
            raise ConfigError(f"{section}.{key}={value!r} must be in [0, 1]")
    from .schedulers import SCHEDULERS

    if cfg.scheduler.sampler not in SCHEDULERS:
        raise ConfigError(f"scheduler.sampler={short_repr(cfg.scheduler.sampler)} is not allowed; choose one of "
                          f"{tuple(SCHEDULERS)}")
    for (section, key), most in AT_MOST.items():
        value = getattr(getattr(cfg, section), key)
        if value is not None and value > most:
            raise ConfigError(f"{section}.{key}={value} must be at most {most:,}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be >= 0")
    if cfg.text.max_length < 2:
        raise ConfigError(f"text.max_length={cfg.text.max_length} must be >= 2 (the start and end tokens)")
    if not cfg.logging.validation_prompts:
        raise ConfigError("logging.validation_prompts is empty; give at least one prompt")
    try:
        _check_limits(cfg)
    except limits.LimitError as e:
        raise ConfigError(str(e)) from None
    return cfg


def _check_limits(cfg: ExperimentConfig) -> None:
    """Sizes the run will allocate, against `limits` (before any of it is built)."""
    s, size, sample = cfg.scheduler, cfg.data.size, cfg.model.sample_size
    limits.steps(s.steps, "scheduler.steps")
    limits.guidance(s.guidance_scale, "scheduler.guidance_scale")
    limits.check(limits.TRAIN_TIMESTEPS, s.num_train_timesteps, "scheduler.num_train_timesteps")
    limits.check(limits.IMAGE_PIXELS, size * size, f"data.size={size}: an image of {size}x{size} pixels")
    limits.check(limits.IMAGE_PIXELS, sample * sample, f"model.sample_size={sample}: an image of {sample}x{sample} pixels")
    t = cfg.train  # an optimizer step's batch: batch_size x gradient_accumulation_steps images
    limits.check(limits.PIXELS, t.batch_size * t.gradient_accumulation_steps * size * size,
                 f"train.batch_size={t.batch_size} x train.gradient_accumulation_steps="
                 f"{t.gradient_accumulation_steps} images of {size}x{size} pixels")
    prompts = len(cfg.logging.validation_prompts)
    limits.check(limits.PIXELS, prompts * sample * sample, f"{prompts} validation prompts of {sample}x{sample} pixels")


def parse_override(text: str) -> tuple[list[str], object]:
    """'train.lr=3e-4' -> (['train', 'lr'], 0.0003); the value is read as YAML (numbers, lists, null)."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = text.split("=", 1)
    try:
        value = _yaml(raw) if raw.strip() else None
    except (yaml.YAMLError, RecursionError) as e:
        raise ConfigError(f"override {short_repr(text)}: the value is not valid YAML "
                          f"({' '.join(str(e).split())})") from None
    if isinstance(value, str):  # YAML reads 3e-4 as a string; numbers the way users write them
        try:
            value = float(value)
        except ValueError:
            pass
    return key.strip().lstrip("-").split("."), value


def load_config(path: str | Path | None = None, overrides: list[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment file (or the defaults), apply `section.key=value` overrides, and validate."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        try:
            data = _yaml(path.read_text(encoding="utf-8")) or {}
        except (yaml.YAMLError, RecursionError, UnicodeDecodeError) as e:
            raise ConfigError(f"config file {str(path)!r} is not valid YAML: {' '.join(str(e).split())}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config file {str(path)!r} must contain a mapping of sections")
    for text in overrides:
        keys, value = parse_override(text)
        node = data
        for k in keys[:-1]:
            node = node.setdefault(k, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {text!r}: {k!r} is not a section")
        node[keys[-1]] = value
    return validate(_build(ExperimentConfig, data, ""))


def to_dict(cfg) -> dict:
    """Plain-YAML-serialisable dict of a config (tuples become lists)."""
    return yaml.safe_load(yaml.safe_dump(_plain(dataclasses.asdict(cfg))))


def _plain(x):
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def overrides_from_argv(argv: list[str]) -> list[str]:
    """Command-line overrides -> 'section.key=value' strings. Accepts `--train.lr 3e-4`, `--train.lr=3e-4`
    and `train.lr=3e-4`."""
    out, i = [], 0
    while i < len(argv):
        arg = argv[i]
        if "=" in arg:
            out.append(arg.lstrip("-"))
        elif arg.startswith("--") and "." in arg and i + 1 < len(argv):
            out.append(f"{arg[2:]}={argv[i + 1]}")
            i += 1
        else:
            raise ConfigError(f"cannot read override {arg!r}; write --section.key VALUE or section.key=VALUE")
        i += 1
    return out
