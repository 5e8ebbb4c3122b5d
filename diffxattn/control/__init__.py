"""Attention control: one processor + controller seam for capture and editing, on any diffusers-style UNet."""

from .processor import AttnCall, Controller, ControllerContext, attention_layers, install, uninstall
from .steps import SamplingRun, StepRange
from .store import AttentionStore, words_to_maps

__all__ = ["AttentionStore", "AttnCall", "Controller", "ControllerContext", "SamplingRun", "StepRange",
           "attention_layers", "install", "uninstall", "words_to_maps"]
