"""What one run of the live app asks for, checked with the CLI's limits, and its reproducing command line.

    request = RunRequest.from_json({"prompt": "a red circle", "seed": 0}, defaults)
    command_line(request, pipeline="pipelines/shapes-32")   # diffxattn generate 'a red circle' --seed 0 ...

Torch-free: a request is refused (a `ValueError` naming the field) before any work is queued.
"""

from __future__ import annotations

import math
import numbers
import shlex
from dataclasses import dataclass, field, replace

from .. import limits
from ..prompt_syntax import MAX_WEIGHT, MIN_WEIGHT, parse_schedule, parse_weights

MAX_SEED = 2**63 - 1
MAX_PROMPT = 2000  # characters; the text encoder reads far fewer tokens
WEIGHT_MODES = ("attention", "embedding", "embedding-a1111")
FEATURE_REPLACE = 0.8  # the fraction of steps "feature injection" uses (the README's attribute-edit value)


class FieldError(ValueError):
    """A bad value in a request; `field` names the form field, `column`/`problem` locate a prompt syntax error."""

    def __init__(self, field: str, message: str, column: int | None = None, problem: str | None = None):
        super().__init__(message)
        self.field, self.column, self.problem = field, column, problem


@dataclass(frozen=True)
class Defaults:
    """The loaded pipeline's settings: what an empty field means, and the samplers it may switch to."""

    steps: int
    guidance: float
    sampler: str
    samplers: tuple[str, ...]


@dataclass(frozen=True)
class RunRequest:
    kind: str  # "generate" or "edit"
    prompt: str  # generate: the prompt (weights written in); edit: the source prompt
    seed: int
    steps: int
    guidance: float
    sampler: str
    weight_mode: str = "attention"
    weights: dict[int, float] = field(default_factory=dict)  # word index -> weight, to write into the prompt
    to: str = ""  # edit: the edited prompt
    local_blend: tuple[str, ...] = ()  # edit: words whose region alone may change
    feature_injection: bool = False  # edit: the source's decoder features for FEATURE_REPLACE of the steps
    cross_replace: float = 0.8  # edit: fraction of the steps whose cross-attention maps come from the source

    @classmethod
    def from_json(cls, data, defaults: Defaults) -> RunRequest:
        """Check every field of a JSON request; raise `FieldError` on the first bad one."""
        if not isinstance(data, dict):
            raise FieldError("request", "expected a JSON object")
        kind = data.get("kind", "generate")
        if kind not in ("generate", "edit"):
            raise FieldError("kind", f"kind {kind!r}: expected 'generate' or 'edit'")
        prompt = _prompt(data.get("prompt"), "prompt")
        steps = _checked("steps", data.get("steps"), defaults.steps, limits.steps)
        request = cls(
            kind=kind, prompt=prompt, steps=steps,
            seed=_checked("seed", data.get("seed"), 0, _seed),
            guidance=_checked("guidance", data.get("guidance"), defaults.guidance, limits.guidance),
            sampler=_choice("sampler", data.get("sampler") or defaults.sampler, defaults.samplers),
            weight_mode=_choice("weight_mode", data.get("weight_mode") or "attention", WEIGHT_MODES),
            weights=_weights(data.get("weights") or {}),
        )
        _syntax(prompt, steps, "prompt")
        if request.weights and len(parse_schedule(prompt, steps)) > 1:
            raise FieldError("prompt", "weight sliders need a prompt without [from:to:when]: edit its weights in the "
                                       "text instead")
        if kind == "generate":
            return request
        to = _prompt(data.get("to"), "to")
        _syntax(to, steps, "to")
        if any(span.weight != 1.0 for span in parse_weights(prompt)):
            raise FieldError("prompt", "an edit's source prompt has no weights: put them in the edited prompt")
        blend = data.get("local_blend") or []
        blend = blend.split() if isinstance(blend, str) else blend
        if not isinstance(blend, list) or not all(isinstance(w, str) and w for w in blend) or len(blend) > 32:
            raise FieldError("local_blend", "local blend: expected up to 32 words separated by spaces")
        cross = _checked("cross_replace", data.get("cross_replace"), 0.8, lambda v, name: limits.fraction(v, name))
        return replace(request, to=to, local_blend=tuple(blend), feature_injection=bool(data.get("feature_injection")),
                       cross_replace=cross, weights={})


def _prompt(value, name: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise FieldError(name, f"{name}: type a prompt")
    if len(value) > MAX_PROMPT:
        raise FieldError(name, f"{name}: {len(value):,} characters, over the limit of {MAX_PROMPT:,}")
    return value


def _syntax(prompt: str, steps: int, name: str) -> None:
    from ..prompt_syntax import PromptSyntaxError

    try:
        for _, text in parse_schedule(prompt, steps, strict=True):  # the form shows the column: no lenient reading
            parse_weights(text, strict=True)
    except PromptSyntaxError as e:
        raise FieldError(name, f"column {e.column}: {e.problem}", e.column, e.problem) from None
    except ValueError as e:
        raise FieldError(name, str(e)) from None


def _checked(name: str, value, default, check):
    if value is None or value == "":
        return default
    if isinstance(value, str):  # form fields arrive as text
        try:
            value = float(value) if name in ("guidance", "cross_replace") else int(value)
        except ValueError:
            raise FieldError(name, f"{name}: expected a number, got {value!r}") from None
    if isinstance(value, float) and name not in ("guidance", "cross_replace") and value.is_integer():
        value = int(value)
    try:
        return check(value, name)
    except ValueError as e:
        raise FieldError(name, str(e)) from None


def _seed(value, name: str) -> int:
    value = limits.whole(value, name, minimum=0)
    if value > MAX_SEED:
        raise limits.LimitError(f"{name}={value} must be a seed from 0 to 2**63 - 1")
    return value


def _choice(name: str, value, choices) -> str:
    if value not in choices:
        raise FieldError(name, f"{name} {value!r}: expected one of {', '.join(choices)}")
    return value


def _weights(data) -> dict[int, float]:
    if not isinstance(data, dict) or len(data) > 256:
        raise FieldError("weights", "weights: expected {word index: weight}")
    weights = {}
    for key, value in data.items():
        try:
            index = int(key)
        except (TypeError, ValueError):
            raise FieldError("weights", f"weights: word index {key!r} is not a whole number") from None
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
                or not MIN_WEIGHT <= value <= MAX_WEIGHT:
            raise FieldError("weights", f"weight {value!r} of word {index}: expected a number from {MIN_WEIGHT:g} "
                                        f"to {MAX_WEIGHT:g}")
        weights[index] = float(value)
    return weights


def command_line(request: RunRequest, pipeline: str | None = None) -> str:
    """The `diffxattn generate` / `diffxattn edit` line that makes the same image (weights written in the prompt;
    `pipeline` None: the default one)."""
    quote = shlex.quote
    words = ["diffxattn", request.kind, quote(request.prompt)]
    if request.kind == "edit":
        words += ["--to", quote(request.to)]
    if pipeline:
        words += ["--pipeline", quote(pipeline)]
    words += ["--seed", str(request.seed), "--steps", str(request.steps), "--guidance", f"{request.guidance:g}",
              "--scheduler", quote(request.sampler)]
    if request.kind == "generate":
        words += ["--weight-mode", request.weight_mode]
    else:
        words += ["--cross-replace", f"{request.cross_replace:g}"]
        if request.local_blend:
            words += ["--local-blend", *map(quote, request.local_blend)]
        if request.feature_injection:
            words += ["--feature-replace", f"{FEATURE_REPLACE:g}"]
    return " ".join(words + ["-o", "edit.png" if request.kind == "edit" else "out.png"])
