"""Bounds on what a command line, config or pipeline folder may ask for, checked before anything is allocated.

Sizes have a default limit that an environment variable raises (a 433-byte config or a `-n 100000` must not
take all the memory or hours, but a user with a big machine may mean it):

    DIFFXATTN_MAX_IMAGE_PIXELS     262,144 (512 x 512)  pixels of one sampled image (height x width)
    DIFFXATTN_MAX_PIXELS         4,194,304 (2048 x 2048) pixels sampled in one call (images x height x width),
                                                         trained in one batch, or written in one image file
    DIFFXATTN_MAX_STEPS              1,000               denoising steps of one call
    DIFFXATTN_MAX_TRAIN_TIMESTEPS  100,000               timesteps of a noise schedule (arrays of this length)
    DIFFXATTN_MAX_PARAMS     1,000,000,000               parameters of a model built from a config

Values are also checked for meaning: a guidance scale is a finite number in [1, 100], steps are whole numbers.
"""

from __future__ import annotations

import math
import numbers
import os
from dataclasses import dataclass

from .errors import UserError

MAX_GUIDANCE = 100.0  # useful scales are 1-20; far beyond, the guided prediction only overflows (1e308: black)


class LimitError(UserError):
    """A size over its limit, or a value outside its range; the message names the limit and how to raise it."""


@dataclass(frozen=True)
class Limit:
    unit: str  # what the limit counts, for the message
    env: str
    default: int

    @property
    def value(self) -> int:
        raw = os.environ.get(self.env)
        if raw is None:
            return self.default
        try:
            value = int(raw.replace("_", "").replace(",", ""))
        except ValueError:
            value = 0
        if value < 1:
            raise LimitError(f"{self.env}={raw!r} must be a whole number >= 1")
        return value


IMAGE_PIXELS = Limit("pixels of one image", "DIFFXATTN_MAX_IMAGE_PIXELS", 512 * 512)
PIXELS = Limit("pixels in one call, batch or image file", "DIFFXATTN_MAX_PIXELS", 2048 * 2048)
STEPS = Limit("denoising steps", "DIFFXATTN_MAX_STEPS", 1000)
TRAIN_TIMESTEPS = Limit("train timesteps", "DIFFXATTN_MAX_TRAIN_TIMESTEPS", 100_000)
PARAMS = Limit("parameters", "DIFFXATTN_MAX_PARAMS", 10**9)


def check(limit: Limit, value: int, what: str) -> None:
    """Raise LimitError if `value` (described by `what`, e.g. "-n 8 images of 32x32") exceeds `limit`."""
    if value > limit.value:
        raise LimitError(f"{what} is {value:,}, over the limit of {limit.value:,} {limit.unit}; "
                         f"raise it with the environment variable {limit.env}=N if you mean it")


def check_images(num_images: int, height: int, width: int) -> None:
    """The pixels one sampling call allocates, per image and in total."""
    check(IMAGE_PIXELS, height * width, f"an image of {height}x{width} pixels")
    check(PIXELS, num_images * height * width, f"{num_images} images of {height}x{width} pixels")


def whole(value, name: str, minimum: int = 1) -> int:
    """`value` as an int >= minimum (not a bool, not 4.5, not "4")."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise LimitError(f"{name}={value!r} must be a whole number >= {minimum}")
    return int(value)


def steps(value, name: str = "num_inference_steps") -> int:
    """Denoising steps: a whole number from 1 to the steps limit."""
    value = whole(value, name)
    check(STEPS, value, name)
    return value


def guidance(value, name: str = "guidance_scale") -> float:
    """A classifier-free guidance scale: finite, in [1, MAX_GUIDANCE].

    1 means no guidance (the conditional prediction alone). This pipeline does not extrapolate below 1, so a
    value there (0.5, 0, -5) is an error instead of silently acting as 1.
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or not 1 <= value <= MAX_GUIDANCE:
        raise LimitError(f"{name}={value!r} must be a number in [1, {MAX_GUIDANCE:g}] "
                         "(1 = no classifier-free guidance; values below 1 are not supported)")
    return float(value)


def fraction(value, name: str) -> float:
    """A number from 0 to 1 (a guidance rescale factor)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0 <= value <= 1:  # NaN fails too
        raise LimitError(f"{name}={value!r} must be a number from 0 to 1")
    return float(value)


def interval(value, name: str) -> tuple[float, float]:
    """(start, end) fractions of the steps with 0 <= start < end <= 1 (a guidance interval)."""
    try:
        start, end = (float(v) for v in value)
    except (TypeError, ValueError):
        raise LimitError(f"{name}={value!r} must be two fractions (START, END), e.g. (0, 0.6)") from None
    if not 0 <= start < end <= 1:
        raise LimitError(f"{name}={value!r} must have 0 <= START < END <= 1")
    return start, end

