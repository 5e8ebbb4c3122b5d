"""Runs and steps: where sampling is, as the scheduler tells it, and ranges of steps.

A *run* is one pipeline call's denoising loop: it starts when the pipeline calls the scheduler's
`set_timesteps`, and its step k ends when the scheduler's `step` has been called for the last time for k.
Both diffusers' pipelines and ours call both, so the step is known rather than guessed from the timestep.
A scheduler of order 2 (Heun) calls the UNet and `step` twice per step except the last: 7 calls for 4 steps.

    StepRange.fraction(0, 0.8)    # the first 80% of the steps, whatever their number
    StepRange.steps(0, 10)        # steps 0..9
    StepRange.parse("0.2:1.0"), StepRange.parse("0:10"), StepRange.parse("0.8")
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class StepRange:
    """A half-open range of denoising steps, [start, end): step indices, or fractions of the run.

    Step s of a run of n steps is in a fraction range when start <= s / n < end, so
    `StepRange.fraction(0, 1)` is every step and `StepRange.fraction(0, 0.5)` the first half.
    """

    start: float
    end: float
    unit: str  # "steps" or "fraction"

    def __post_init__(self):
        if self.unit not in ("steps", "fraction"):
            raise ValueError(f"step range unit {self.unit!r}; expected 'steps' or 'fraction'")
        if not 0 <= self.start <= self.end:
            raise ValueError(f"step range {self}: expected 0 <= start <= end")

    @classmethod
    def steps(cls, start: int, end: int) -> StepRange:
        return cls(int(start), int(end), "steps")

    @classmethod
    def fraction(cls, start: float, end: float) -> StepRange:
        return cls(float(start), float(end), "fraction")

    @classmethod
    def parse(cls, text: str) -> StepRange:
        """'A:B' with integers -> steps, with a decimal point in either -> fractions; 'F' -> fraction(0, F)."""
        parts = text.strip().split(":")
        try:
            numbers = [float(p) if "." in p or len(parts) == 1 else int(p) for p in parts]
        except ValueError:
            numbers = []
        if len(numbers) in (1, 2):
            return cls.of(numbers[0] if len(numbers) == 1 else tuple(numbers))
        raise ValueError(f"step range {text!r}: expected START:END (steps 0:10, fractions 0.2:1.0) or a "
                         "fraction F meaning 0:F")

    @classmethod
    def of(cls, value) -> StepRange:
        """A StepRange from what the public API has always accepted: a StepRange, a string for `parse`, a
        fraction F (0:F), or a (start, end) pair, which means step indices when both are ints and fractions
        otherwise: (0, 1) is step 0 only, (0, 1.0) the whole run."""
        if isinstance(value, StepRange):
            return value
        if isinstance(value, str):
            return cls.parse(value)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls.fraction(0, value)
        start, end = value
        if all(isinstance(v, int) and not isinstance(v, bool) for v in (start, end)):
            return cls.steps(start, end)
        return cls.fraction(start, end)

    def contains(self, step: int, num_steps: int) -> bool:
        """Whether step `step` (0-based) of a run of `num_steps` steps lies in the range."""
        position = step if self.unit == "steps" else step / max(num_steps, 1)
        return self.start <= position < self.end

    def __str__(self) -> str:
        return f"{self.unit} {self.start:g}:{self.end:g}"


@dataclass(frozen=True)
class SamplingRun:
    """What controllers learn when a pipeline call starts sampling."""

    num_steps: int  # denoising steps, as requested (not scheduler calls: Heun makes 2n - 1 of those)
    prompts: list[str] | None  # the prompts encoded for this call, if the pipeline encoded text


class StepClock:
    """Counts a scheduler's runs and steps by wrapping its `set_timesteps` and `step` on the instance (and
    `set_begin_index`, by which an image-to-image pipeline starts later in the run).

    `on_run_start(num_steps)` and `on_step_end(step)` are called as they happen; `restore()` unwraps.
    """

    def __init__(self, scheduler, on_run_start: Callable[[int], None], on_step_end: Callable[[int], None]):
        self.scheduler, self.on_run_start, self.on_step_end = scheduler, on_run_start, on_step_end
        self.step, self.num_steps = 0, 1  # before any run (a UNet called by hand): step 0 of 1
        self._calls, self._total = 0, 0  # scheduler.step calls made, and due, in this run
        wrapped = ("set_timesteps", "step") + (("set_begin_index",) if hasattr(scheduler, "set_begin_index") else ())
        self._saved = {name: scheduler.__dict__.get(name) for name in wrapped}
        scheduler.set_timesteps = self._wrap(scheduler.set_timesteps, self._run_started)
        scheduler.step = self._wrap(scheduler.step, self._called)
        if "set_begin_index" in wrapped:
            scheduler.set_begin_index = self._wrap(scheduler.set_begin_index, self._begins_later)

    @staticmethod
    def _wrap(method, after: Callable[[], None]):
        @functools.wraps(method)  # keeps the signature: pipelines inspect scheduler.step for `generator`, `eta`
        def wrapped(*args, **kwargs):
            out = method(*args, **kwargs)
            after()
            return out
        return wrapped

    @property
    def order(self) -> int:
        return getattr(self.scheduler, "order", 1)

    def _run_started(self) -> None:
        self._total = len(self.scheduler.timesteps)
        self.step, self._calls = 0, 0
        self.num_steps = max(1, -(-self._total // self.order))  # ceil: Heun's 2n - 1 calls are n steps
        self.on_run_start(self.num_steps)

    def _begins_later(self) -> None:
        """An image-to-image pipeline skips the first timesteps (its `strength`): the run's first step is not 0."""
        begin = getattr(self.scheduler, "begin_index", None) or 0
        self._calls, self.step = begin, begin // self.order

    def _called(self) -> None:
        self._calls += 1
        if self._calls % self.order == 0 or self._calls == self._total:  # the step's last call
            self.step += 1
            self.on_step_end(self.step - 1)

    def restore(self) -> None:
        for name, previous in self._saved.items():
            if previous is None:
                self.scheduler.__dict__.pop(name, None)
            else:
                setattr(self.scheduler, name, previous)
