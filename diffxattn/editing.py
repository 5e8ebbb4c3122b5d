"""Old name of `diffxattn.generation` (before #20), kept so `diffxattn.editing.edit` / `generate` still import."""

from .generation import WEIGHT_MODES, EditResult, edit, generate

__all__ = ["WEIGHT_MODES", "EditResult", "edit", "generate"]
