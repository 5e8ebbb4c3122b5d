"""Noise schedulers by name: a thin table over diffusers' own scheduler classes.

All of them are built from one config (number of train timesteps, beta schedule, prediction type), so
a model trained with v-prediction samples with v-prediction under every scheduler.
"""

from __future__ import annotations

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

# name -> (class, extra config that defines the variant)
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


def make_scheduler(
    name: str,
    *,
    num_train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    prediction_type: str = "v_prediction",
    config: dict | None = None,
) -> SchedulerMixin:
    """Build scheduler `name`. With `config` (e.g. another scheduler's `.config`), its training settings are kept.

    Example:
        >>> pipe.scheduler = make_scheduler("euler", config=pipe.scheduler.config)
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; known schedulers: {', '.join(SCHEDULERS)}")
    base = {
        "num_train_timesteps": num_train_timesteps,
        "beta_schedule": beta_schedule,
        "prediction_type": prediction_type,
    }
    if config is not None:
        base = {k: config[k] for k in ("num_train_timesteps", "beta_schedule", "prediction_type", "trained_betas",
                                       "beta_start", "beta_end") if config.get(k) is not None}
    if base.get("prediction_type", "epsilon") not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {base['prediction_type']!r}")
    cls, variant = SCHEDULERS[name]
    return cls.from_config({**base, **variant})


def scheduler_name(scheduler: SchedulerMixin) -> str:
    """The table name of a scheduler instance (reverse of `make_scheduler`), or its class name if not listed."""
    for name, (cls, variant) in SCHEDULERS.items():
        if type(scheduler) is cls and all(scheduler.config.get(k) == v for k, v in variant.items()):
            return name
    return type(scheduler).__name__
