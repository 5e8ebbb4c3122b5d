"""Prompt tools in one call, on our pipeline, Stable Diffusion or SDXL: weighted prompts, prompt editing over steps,
and prompt-to-prompt edits.

    image = generate(pipe, "a (red:1.6) circle", weight_mode="attention").images[0]
    image = generate(pipe, "a [red:blue:0.5] circle").images[0]      # prompt editing over steps
    image = generate(pipe, "a red circle left of a blue square", guide=Guide(bind="auto")).images[0]
    source, edited = edit(pipe, "a red circle at the left", "a blue circle at the left")
    result = edit(pipe, source, target, local_blend=["circle"])     # result.mask: where the edit shows

Each composes the attention controllers (`control.edits`), the text conditioning (`conditioning`) and the
step callbacks (`callbacks`); a `callback_on_step_end` of the caller runs after theirs.
"""

from __future__ import annotations

from contextlib import ExitStack
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .callbacks import PromptSchedule, StepCallbacks
from .conditioning import TextEmbeddings, embed_texts, embed_weighted, prompt_tokens, weight_rows
from .control.edits import FEATURE_LAYERS, AttentionReweight, LocalBlend, PromptToPrompt
from .control.guided import AttentionGuide, Guide
from .control.steps import StepRange
from .prompt_syntax import has_weights, parse_schedule, split_and

WEIGHT_MODES = ("attention", "embedding", "embedding-a1111", "embedding-a1111-no-norm")


def _steps(pipe, steps: int | None) -> int:
    if steps is not None:  # 0 is an error for the pipeline to name, not "the default"
        return steps
    return getattr(pipe.config, "default_steps", 50)  # 50: Stable Diffusion pipelines' default


def generate(pipe, prompt: str, *, weight_mode: str = "attention", weight_steps=StepRange.fraction(0, 1),
             num_inference_steps: int | None = None, negative_prompt: str | None = None, guide: Guide | None = None,
             callback_on_step_end=None, callback_on_step_end_tensor_inputs: list[str] | None = None, **kwargs):
    """Generate with Automatic1111/compel weight syntax, `[from:to:when]` prompt editing over steps and
    `a cat AND a dog :0.5` composable diffusion (`composable`; weights inside its sub-prompts act on embeddings).

    weight_mode "attention" scales the weighted tokens' cross-attention probabilities (in the steps
    `weight_steps`, a `StepRange`); "embedding" scales token embeddings towards/away from the empty prompt
    (compel), "embedding-a1111" scales them and restores their mean (Automatic1111's "Original" emphasis),
    "embedding-a1111-no-norm" only scales them (its "No norm"); its "Ignore" is "attention" with
    `weight_steps=StepRange.fraction(0, 0)`. `guide`: attention-guided sampling
    (`control.guided`), its words those of the (first) prompt; with `guide.arrange`, a partial run of the candidate
    noises first (with this call's settings and callbacks, not `callback_on_step_end`), then the call from the
    picked one. Returns the pipeline output.
    """
    if weight_mode not in WEIGHT_MODES:
        raise ValueError(f"weight mode {weight_mode!r}; expected one of {WEIGHT_MODES}")
    steps = _steps(pipe, num_inference_steps)
    parts = split_and(prompt, strict=getattr(pipe, "strict", False))
    if getattr(pipe, "unet", None) is None:
        _check_sd3(pipe, prompt, parts, weight_mode, steps, guide)
    if len(parts) > 1:
        return _generate_and(pipe, parts, weight_mode=weight_mode, steps=steps, negative_prompt=negative_prompt,
                             guide=guide, callbacks=StepCallbacks([(callback_on_step_end,
                                                                    callback_on_step_end_tensor_inputs)]), **kwargs)
    schedule = parse_schedule(prompt, steps)  # [(end_step, text), ...]
    tokens = [prompt_tokens(pipe, text) for _, text in schedule]
    prompt_of_step = [next(k for k, (end, _) in enumerate(schedule) if s < end) for s in range(steps)]
    negative, chunks = _negative(pipe, negative_prompt, tokens, weight_mode)
    if weight_mode == "attention":
        sd3 = {"max_sequence_length": kwargs["max_sequence_length"]} if "max_sequence_length" in kwargs else {}
        embedded = embed_texts(pipe, tokens, chunks, **sd3)  # the T5 length SD3's own call would embed
        weights = weight_rows(tokens, chunks)  # (prompts, S): SD3's T5 tokens after the CLIP window weigh 1
        weights = F.pad(weights, (0, embedded.embeds.shape[1] - weights.shape[1]), value=1.0)
    else:
        mode = "compel" if weight_mode == "embedding" else weight_mode.removeprefix("embedding-")
        embedded = embed_weighted(pipe, tokens, mode, chunks)
        weights = torch.ones(1)
    schedule_callback = PromptSchedule(pipe, embedded.embeds, embedded.mask, prompt_of_step,
                                       pooled=embedded.pooled) if len(tokens) > 1 else None
    text = {**embedded[:1].pipeline_kwargs(pipe), **negative}
    with ExitStack() as stack:
        guided = _guided(stack, pipe, guide, [tokens[0]])
        ours = [(schedule_callback, None), _callback(guided)]
        if (weights != 1).any():
            stack.enter_context(AttentionReweight(pipe, lambda s: weights[prompt_of_step[min(s, steps - 1)]][None],
                                                  steps=weight_steps))
        if guided and guide.arrange:  # a partial run of the candidate noises, with our callbacks but not the caller's
            picked = guided.arrange({**text, "num_inference_steps": steps, **StepCallbacks(ours).kwargs(), **kwargs})
            kwargs = kwargs if picked is None else {**kwargs, "latents": picked}
        callbacks = StepCallbacks([*ours, (callback_on_step_end, callback_on_step_end_tensor_inputs)])
        return pipe(**text, num_inference_steps=steps, **callbacks.kwargs(), **kwargs)


def _check_sd3(pipe, prompt: str, parts: list, weight_mode: str, steps: int, guide: Guide | None) -> None:
    """On SD3, `generate` does word weights in attention mode only: a ValueError names what else was asked."""
    asked = [what for what, on in (
        (f"weight mode {weight_mode!r}", weight_mode != "attention"), ("AND sub-prompts", len(parts) > 1),
        ("prompt editing over steps", len(parse_schedule(prompt, steps)) > 1), ("attention guidance", bool(guide)))
        if on]
    if asked:
        raise ValueError(f"on SD3 (joint attention) generate reads word weights in 'attention' mode only, not "
                         f"{', '.join(asked)}")


def _negative(pipe, negative_prompt: str | None, tokens, weight_mode: str) -> tuple[dict, int]:
    """The pipeline call's negative-prompt arguments, and the windows every text is embedded in.

    The negative prompt is read as Automatic1111 reads it: weight syntax, and on Stable Diffusion and SDXL
    windows and ``BREAK`` (`TokenizedPrompt`). Its weights act on its embeddings (the unconditional rows' attention
    is not reweighted): as `weight_mode` says for the embedding modes, with Automatic1111's "Original" emphasis in
    "attention" mode. A plain one-window negative prompt goes to the pipeline as it is; otherwise it is embedded
    here, in as many windows as the prompt (SDXL's zeros for no negative prompt kept). SD3 reads it as text.
    """
    if getattr(pipe, "unet", None) is None:
        return {"negative_prompt": negative_prompt}, 1
    negative = prompt_tokens(pipe, negative_prompt or "")
    chunks = max(t.chunks for t in [*tokens, negative])
    weighted = any(w != 1 for w in negative.weights)
    if chunks == 1 and not weighted and negative.clean == (negative_prompt or ""):
        return {"negative_prompt": negative_prompt}, 1
    if weighted:
        mode = {"attention": "a1111", "embedding": "compel"}.get(weight_mode, weight_mode.removeprefix("embedding-"))
        text = embed_weighted(pipe, [negative], mode, chunks)
    else:
        text = embed_texts(pipe, [negative], chunks)
    if negative_prompt is None and getattr(pipe.config, "force_zeros_for_empty_prompt", False):
        text = TextEmbeddings(torch.zeros_like(text.embeds), text.mask,
                              None if text.pooled is None else torch.zeros_like(text.pooled))
    return {f"negative_{k}": v for k, v in text.pipeline_kwargs(pipe).items()}, chunks


def _generate_and(pipe, parts: list[tuple[str, float]], *, weight_mode: str, steps: int, negative_prompt,
                  guide: Guide | None, callbacks: StepCallbacks, **kwargs):
    """`generate` for a prompt with AND: one prediction per sub-prompt (`composable.Composable`)."""
    from .composable import Composable
    from .control.processor import controlled

    if guide:
        raise ValueError("attention-guided sampling cannot be combined with AND sub-prompts (it reads one prompt's "
                         "attention maps); drop the guide options or the AND")
    if controlled(pipe.unet):
        raise ValueError("AND sub-prompts cannot run with attention controllers installed (heatmaps, edits): "
                         "each UNet call holds one row per sub-prompt")
    for text, _ in parts:
        if len(parse_schedule(text, steps)) > 1:
            raise ValueError(f"prompt editing over steps ([from:to:when]) inside the AND sub-prompt {text!r} is not "
                             "supported")
    mode = "compel" if weight_mode in ("attention", "embedding") else weight_mode.removeprefix("embedding-")
    tokens = [prompt_tokens(pipe, text) for text, _ in parts]
    negative, chunks = _negative(pipe, negative_prompt, tokens, weight_mode)
    embedded = embed_weighted(pipe, tokens, mode, chunks)
    with Composable(pipe, embedded[1:], [w for _, w in parts]):
        return pipe(**embedded[:1].pipeline_kwargs(pipe), **negative, num_inference_steps=steps,
                    **callbacks.kwargs(), **kwargs)


@dataclass
class EditResult:
    """What `edit` made. Reads as the (source, edited) pair `edit` used to return: `source, edited = edit(...)`,
    `edit(...)[1]`, `list(edit(...))`."""

    source: object  # the source image, in the pipeline's output type (PIL image, numpy array or tensor)
    edited: object
    mask: torch.Tensor | None  # (H, W) bool at the image size: where local blend let the edit through; None
    # without local blend (the mask of the last step, which decided the final latents)

    def __getitem__(self, index):
        return (self.source, self.edited)[index]

    def __len__(self) -> int:
        return 2


def edit(pipe, source: str, target: str, *, cross_replace=StepRange.fraction(0, 0.8),
         self_replace=StepRange.fraction(0, 0.4), feature_replace=StepRange.fraction(0, 0),
         feature_layers=FEATURE_LAYERS, local_blend: list[str] | None = None, blend_threshold: float = 0.3,
         seed: int = 0, inversion=None, guide: Guide | None = None, callback_on_step_end=None,
         callback_on_step_end_tensor_inputs: list[str] | None = None, **kwargs) -> EditResult:
    """Prompt-to-prompt: the source image and the edited one from the same noise, the edit keeping the layout.

    Weight syntax in `target` on words shared with `source` reweights them (prompt-to-prompt's reweight edit).
    `feature_replace` (e.g. StepRange.fraction(0, 0.8)) also gives the edit the source's decoder features
    (`PromptToPrompt`): for attribute edits such as a color, which then keep the object's shape and position.
    `local_blend`: words whose region alone may change (`LocalBlend`); the result carries its mask.
    `inversion` (an `inversion.Inversion` of `source`): edit that image instead of one drawn from `seed`.
    `guide`: attention-guided sampling (`control.guided`) on the source prompt's words; the source's latent update
    applies to the edit too, so both keep one layout.
    """
    if has_weights(source):
        raise ValueError(f"the source prompt {source!r} has weight syntax; put weights in the target prompt")
    src, tgt = prompt_tokens(pipe, source), prompt_tokens(pipe, target)
    generator = [torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)]
    null_text = None
    if inversion is not None:
        if source != inversion.prompt:
            raise ValueError(f"the source prompt {source!r} is not the inversion's {inversion.prompt!r}; the "
                             "inversion draws its image for its own prompt")
        if guide:
            raise ValueError("attention guidance cannot edit an inverted image: it would move the image away from "
                             "the inversion; leave out --excite/--bind/--box/--arrange or --inversion")
        kwargs, null_text = inversion.apply(pipe, kwargs, batch=2)
    if guide and guide.arrange:
        raise ValueError("arrange picks the starting noise of generate and heatmap, not of edit (whose source and "
                         "edited image start from one seed's noise)")
    with ExitStack() as stack:
        guided = _callback(_guided(stack, pipe, guide, [src], shared=True))
        p2p = stack.enter_context(PromptToPrompt(pipe, src, tgt, cross_replace=cross_replace,
                                                 self_replace=self_replace, feature_replace=feature_replace,
                                                 feature_layers=feature_layers, weights=tgt.word_weights()))
        blend = stack.enter_context(LocalBlend(pipe, [src, tgt], local_blend, threshold=blend_threshold)
                                    ) if local_blend else None
        callbacks = StepCallbacks([(null_text, None), guided, (blend.callback if blend else None, ["latents"]),
                                   (callback_on_step_end, callback_on_step_end_tensor_inputs)])
        images = pipe(p2p.prompts, generator=generator, **callbacks.kwargs(), **kwargs).images
    return EditResult(images[0], images[1], _image_mask(pipe, blend))


def _guided(stack: ExitStack, pipe, guide: Guide | None, prompts, shared: bool = False) -> AttentionGuide | None:
    """Install `guide` (if any) in `stack`, its words checked against `prompts` now."""
    if not guide:
        return None
    guided = stack.enter_context(AttentionGuide(pipe, guide, shared=shared))
    guided.check(prompts)
    return guided


def _callback(guided: AttentionGuide | None):
    """The guide's step callback and the tensors it reads, as `StepCallbacks` takes them."""
    return (guided.callback, guided.tensor_inputs) if guided else (None, None)


def _image_mask(pipe, blend: LocalBlend | None) -> torch.Tensor | None:
    """The blend's latent mask (1, 1, h, w) as a (H, W) bool mask at the image size (nearest)."""
    if blend is None or blend.mask is None:
        return None
    scale = getattr(pipe, "vae_scale_factor", 1)  # Stable Diffusion's latents are 8x smaller; ours are pixels
    return F.interpolate(blend.mask, scale_factor=scale, mode="nearest")[0, 0] > 0
