"""diffxattn: text-to-image diffusion with cross-attention you can see and edit.

Importing the package is cheap (no torch, no diffusers): `diffxattn --help` answers at once. The public
classes load on first use (`diffxattn.DiffXAttnPipeline`), and diffusers learns our pipeline class as soon as
diffusers itself is imported, so `DiffusionPipeline.from_pretrained(folder)` loads our folders after
`import diffxattn` whichever of the two is imported first.
"""

import importlib
import importlib.abc
import importlib.util
import logging as _logging
import sys

# diffusers' pipeline module imports transformers' image processors (for Stable Diffusion's safety checker);
# transformers >= 5.25 then warns, on every command, that torchvision is missing. Nothing here uses an image
# processor, so that one message is dropped; every other transformers warning still shows.
_logging.getLogger("transformers.utils.import_utils").addFilter(
    lambda record: "requires torchvision (not installed)" not in record.getMessage())

__version__ = "0.1.0"
__all__ = ["DiffXAttnPipeline", "SCHEDULERS", "XAttnUNet", "make_scheduler"]
_LAZY = {"DiffXAttnPipeline": ".pipeline", "XAttnUNet": ".models", "SCHEDULERS": ".schedulers",
         "make_scheduler": ".schedulers"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def register_with_diffusers() -> None:
    """diffusers resolves a saved pipeline's `_class_name` by name inside the `diffusers` module (components as
    `diffxattn.<Class>`). Registering the pipeline class there lets plain `DiffusionPipeline.from_pretrained(folder)`
    load our folders without running code from the folder (a custom `pipeline.py` needs trust_remote_code=True)."""
    if __name__ + ".pipeline" not in sys.modules:  # else it is being imported, and registers itself at its end
        importlib.import_module(".pipeline", __name__)


class _RegisterWhenDiffusersLoads(importlib.abc.MetaPathFinder):
    """Runs `register_with_diffusers` right after `import diffusers` completes (once)."""

    def find_spec(self, name, path=None, target=None):
        if name != "diffusers":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):
            exec_module(module)
            register_with_diffusers()

        spec.loader.exec_module = exec_then_register
        return spec


if "diffusers" in sys.modules:
    register_with_diffusers()
else:
    sys.meta_path.insert(0, _RegisterWhenDiffusersLoads())
