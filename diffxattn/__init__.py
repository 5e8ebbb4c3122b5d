"""diffxattn: text-to-image diffusion with cross-attention you can see and edit."""

import diffusers as _diffusers

from .models import XAttnUNet
from .pipeline import DiffXAttnPipeline
from .schedulers import SCHEDULERS, make_scheduler

# diffusers resolves a saved pipeline's `_class_name` (and a component's class) by name inside a library
# module: components as `diffxattn.<Class>`, the pipeline as `diffusers.<Class>`. Registering the pipeline
# class there lets plain `DiffusionPipeline.from_pretrained(folder)` load our folders without running code
# from the folder (the alternative, a custom `pipeline.py`, needs trust_remote_code=True).
setattr(_diffusers, DiffXAttnPipeline.__name__, DiffXAttnPipeline)

__version__ = "0.1.0"
__all__ = ["DiffXAttnPipeline", "SCHEDULERS", "XAttnUNet", "make_scheduler"]
