"""Noise schedulers by name: a thin table over diffusers' own scheduler classes.

All of them are built from one config (number of train timesteps, beta schedule, prediction type), so
a model trained with v-prediction samples with v-prediction under every scheduler.
"""

from __future__ import annotations

import inspect
from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

# name -> (class, extra config that defines the variant: always applied)
SCHEDULERS: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "ddpm": (DDPMScheduler, {}),
    "ddim": (DDIMScheduler, {"set_alpha_to_one": False}),
    "dpm-solver++": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-ancestral": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "unipc": (UniPCMultistepScheduler, {}),
}
PREDICTION_TYPES = ("epsilon", "v_prediction")
# name -> settings that differ from diffusers' defaults unless the config given says otherwise
DEFAULTS: dict[str, dict[str, Any]] = {
    # DDIM's default clip_sample=True clips x0 but keeps the noise of the unclipped prediction; with guidance
    # x0 leaves [-1, 1] and the two disagree (see DiffXAttnPipeline._step_kwargs, which also mends that)
    "ddim": {"clip_sample": False},
}


def make_scheduler(
    name: str,
    *,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    prediction_type: str = "v_prediction",
    config: dict | None = None,
) -> SchedulerMixin:
    """Build scheduler `name`. With `config` (e.g. another scheduler's `.config`), every setting of it that the
    new class has is kept: the training schedule and the sampler settings (clipping, spacing, ...) alike.

    Example:
        >>> pipe.scheduler = make_scheduler("euler", config=pipe.scheduler.config)
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known schedulers: {', '.join(SCHEDULERS)}")
    cls, variant = SCHEDULERS[name]
    if config is None:
        settings = {"num_train_timesteps": num_train_timesteps, "beta_schedule": beta_schedule,
                    "prediction_type": prediction_type}
    else:
        accepted = inspect.signature(cls.__init__).parameters
        settings = {k: v for k, v in dict(config).items() if k in accepted}
    if settings.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {settings['prediction_type']!r}")
    return cls.from_config({**DEFAULTS.get(name, {}), **settings, **variant})


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The table name of a scheduler instance (reverse of `make_scheduler`), or its class name if not listed."""
    for name, (cls, variant) in SCHEDULERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in variant.items()):
            return name
    return type(scheduler).__name__
