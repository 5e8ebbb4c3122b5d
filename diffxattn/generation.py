"""High-level prompt editing: weighted and scheduled prompts, and prompt-to-prompt edits.

    image = generate(pipe, "a (red:1.6) circle", weight_mode="attention")
    image = generate(pipe, "a [red:blue:0.5] circle")          # prompt editing over steps
    source, edited = edit(pipe, "a red circle at the left", "a blue circle at the left")
"""

from __future__ import annotations

from contextlib import ExitStack

import torch

from . import prompts as prompt_syntax
from .control.edits import (FEATURE_LAYERS, AttentionReweight, LocalBlend, PromptToPrompt, embedding_weights,
                            encode_prompts, token_weight_rows)
from .control.steps import StepRange
from .pipeline import DiffXAttnPipeline

WEIGHT_MODES = ("attention", "embedding", "embedding-a1111")


def _steps(pipe, steps: int | None) -> int:
    return steps or getattr(pipe.config, "default_steps", 50)  # 50: Stable Diffusion pipelines' default


def generate(pipe, prompt: str, *, weight_mode: str = "attention", weight_steps=StepRange.fraction(0, 1),
             num_inference_steps: int | None = None, negative_prompt: str | None = None, **kwargs):
    """Generate with Automatic1111/compel weight syntax and `[from:to:when]` prompt editing over steps.

    weight_mode "attention" scales the weighted tokens' cross-attention probabilities (over `weight_steps`);
    "embedding" scales token embeddings towards/away from the empty prompt (compel), "embedding-a1111"
    scales them and restores their mean. Returns the pipeline output.
    """
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode {weight_mode!r}; expected one of {WEIGHT_MODES}")
    steps = _steps(pipe, num_inference_steps)
    schedule = prompt_syntax.parse_schedule(prompt, steps)  # [(end_step, text), ...]
    texts = [text for _, text in schedule]
    segment_of = [next(k for k, (end, _) in enumerate(schedule) if s < end) for s in range(steps)]

    if weight_mode == "attention":
        embeds, mask = encode_prompts(pipe, [prompt_syntax.clean_text(t) for t in texts])
        weights = token_weight_rows(pipe.tokenizer, texts)  # (segments, S)
    else:
        embeds, mask = embedding_weights(pipe, texts, "compel" if weight_mode == "embedding" else "a1111")
        weights = torch.ones(len(texts), pipe.tokenizer.model_max_length)

    def step_embeds(step: int):
        k = segment_of[min(step, steps - 1)]
        return embeds[k:k + 1], mask[k:k + 1]

    with ExitStack() as stack:
        if (weights != 1).any():
            stack.enter_context(AttentionReweight(pipe, lambda s: weights[segment_of[min(s, steps - 1)]][None],
                                                  steps=weight_steps))
        if isinstance(pipe, DiffXAttnPipeline):
            return pipe(prompt_embeds=embeds[:1], prompt_attention_mask=mask[:1], negative_prompt=negative_prompt,
                        step_prompt_embeds=step_embeds if len(texts) > 1 else None, num_inference_steps=steps,
                        **kwargs)
        if len(texts) > 1:  # diffusers' pipelines have no per-step prompt: switch embeddings in the step callback
            kwargs.update(callback_on_step_end=_switch_embeds(step_embeds),
                          callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"])
        return pipe(prompt_embeds=embeds[:1], negative_prompt=negative_prompt, num_inference_steps=steps, **kwargs)


def _switch_embeds(step_embeds):
    """A diffusers `callback_on_step_end` that gives the next step its conditional embeddings (the last rows
    of `prompt_embeds`, after the negative prompt's under classifier-free guidance)."""
    def callback(pipe, step: int, timestep, tensors: dict) -> dict:
        embeds = tensors["prompt_embeds"].clone()
        cond = embeds.shape[0] // 2 if pipe.do_classifier_free_guidance else 0
        embeds[cond:] = step_embeds(step + 1)[0].to(embeds)
        return {"prompt_embeds": embeds}
    return callback


def edit(pipe, source: str, target: str, *, cross_replace=StepRange.fraction(0, 0.8),
         self_replace=StepRange.fraction(0, 0.4), feature_replace=StepRange.fraction(0, 0), feature_layers=FEATURE_LAYERS, local_blend: list[str] | None = None,
         blend_threshold: float = 0.3, seed: int = 0, **kwargs):
    """Prompt-to-prompt: (source image, edited image) from the same noise, the edit keeping the source's layout.

    Weight syntax in `target` on words shared with `source` reweights them (prompt-to-prompt's reweight edit).
    `feature_replace` (e.g. (0, 0.8)) also gives the edit the source's decoder features (`PromptToPrompt`):
    for attribute edits such as a color, which then keep the object's shape and position exactly.
    """
    src_runs = prompt_syntax.parse_weights(source)
    if any(r.weight != 1.0 for r in src_runs):
        raise ValueError(f"the source prompt {source!r} has weight syntax; put weights in the target prompt")
    clean_target = prompt_syntax.clean_text(target)
    _, weights, _ = prompt_syntax.token_weights(target, pipe.tokenizer)
    words = prompt_syntax.word_token_map(clean_target, pipe.tokenizer)
    word_weights = {w: weights[pos[0] - 1] for w, pos in words if pos and pos[0] - 1 < len(weights)
                    and weights[pos[0] - 1] != 1.0}
    prompts = [source, clean_target]
    generator = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)]
    with ExitStack() as stack:
        stack.enter_context(PromptToPrompt(pipe, source, clean_target, cross_replace=cross_replace,
                                           self_replace=self_replace, feature_replace=feature_replace,
                                           feature_layers=feature_layers, weights=word_weights))
        callback = None
        if local_blend:
            blend = stack.enter_context(LocalBlend(pipe, prompts, local_blend, threshold=blend_threshold))
            callback = blend.callback
        images = pipe(prompts, generator=generator, callback_on_step_end=callback, **kwargs).images
    return images[0], images[1]
