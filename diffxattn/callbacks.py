"""Step callbacks: diffusers' `callback_on_step_end` protocol, which both pipelines honour.

A step callback is `fn(pipe, i, timestep, tensors) -> dict`: after the scheduler's i-th step it gets the
tensors named in `callback_on_step_end_tensor_inputs` ("latents", "prompt_embeds", on our pipeline
"prompt_attention_mask", on SDXL "add_text_embeds" and "add_time_ids") and returns the ones it replaces. Prompt schedules, local blend and a user's own
callback are all such functions; `StepCallbacks` runs several in order as one.

    callbacks = StepCallbacks([(schedule, schedule.tensor_inputs), (blend.callback, ["latents"]), (mine, None)])
    pipe(..., callback_on_step_end=callbacks, callback_on_step_end_tensor_inputs=callbacks.tensor_inputs)
"""

from __future__ import annotations

from typing import Callable

import torch

from .conditioning import masks_padding, takes_pooled

StepCallback = Callable[..., "dict | None"]


class StepCallbacks:
    """Several step callbacks run in order as one; each sees the tensors as the previous ones left them.

    `callbacks`: (callback, the tensor inputs it reads) pairs; None reads the callback's own `tensor_inputs`
    (diffusers' PipelineCallback) or else the latents. Callbacks that are None are left out.
    """

    def __init__(self, callbacks: list[tuple[StepCallback | None, list[str] | None]]):
        self.callbacks = [cb for cb, _ in callbacks if cb is not None]
        names = [n for cb, inputs in callbacks if cb is not None
                 for n in (inputs or getattr(cb, "tensor_inputs", None) or ["latents"])]
        self.tensor_inputs = list(dict.fromkeys(names))

    def __call__(self, pipe, step: int, timestep, tensors: dict) -> dict:
        tensors = dict(tensors)
        for callback in self.callbacks:
            tensors.update(callback(pipe, step, timestep, tensors) or {})
        return tensors

    def kwargs(self) -> dict:
        """The pipeline call's callback arguments (none when there is no callback)."""
        if not self.callbacks:
            return {}
        return {"callback_on_step_end": self, "callback_on_step_end_tensor_inputs": self.tensor_inputs}


class PromptSchedule:
    """A step callback that gives each step the conditional embeddings of its prompt: prompt editing over
    steps (`[from:to:when]`) on either pipeline.

    embeds (K, S, D) and mask (K, S): one row per prompt of the schedule; `prompt_of_step[s]` is the row of
    step s; pooled (K, P): SDXL's pooled embeddings (`add_text_embeds`), which switch with them. A scheduler of
    order 2 (Heun) calls back twice per step but the last (see `control.steps`).
    """

    def __init__(self, pipe, embeds: torch.Tensor, mask: torch.Tensor, prompt_of_step: list[int],
                 pooled: torch.Tensor | None = None):
        if takes_pooled(pipe) and pooled is None:
            raise ValueError(f"{type(pipe).__name__} also reads pooled text embeddings: pass pooled=")
        self.embeds, self.mask, self.prompt_of_step, self.pooled = embeds, mask, prompt_of_step, pooled
        self.tensor_inputs = (["prompt_embeds"] + (["prompt_attention_mask"] if masks_padding(pipe) else [])
                              + (["add_text_embeds"] if pooled is not None else []))

    def __call__(self, pipe, i: int, timestep, tensors: dict) -> dict:
        step = (i + 1) // getattr(pipe.scheduler, "order", 1)  # the step the next UNet call belongs to
        k = self.prompt_of_step[min(step, len(self.prompt_of_step) - 1)]
        embeds = tensors["prompt_embeds"].clone()
        cond = embeds.shape[0] // 2 if pipe.do_classifier_free_guidance else 0  # negative rows come first
        embeds[cond:] = self.embeds[k].to(embeds)
        out = {"prompt_embeds": embeds}
        if "prompt_attention_mask" in tensors:
            mask = tensors["prompt_attention_mask"].clone()
            mask[cond:] = self.mask[k].to(mask)
            out["prompt_attention_mask"] = mask
        if self.pooled is not None:
            pooled = tensors["add_text_embeds"].clone()
            pooled[cond:] = self.pooled[k].to(pooled)
            out["add_text_embeds"] = pooled
        return out
