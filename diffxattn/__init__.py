"""diffxattn: text-to-image diffusion with cross-attention you can see and edit."""

import logging as _logging

# diffusers' pipeline module imports transformers' image processors (for Stable Diffusion's safety checker);
# transformers >= 5.25 then warns, on every command, that torchvision is missing. Nothing here uses an image
# processor, so that one message is dropped; every other transformers warning still shows.
_logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

import diffusers as _diffusers  # noqa: E402

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
