"""Editing controllers: attention reweighting, prompt-to-prompt word swap / refine, local blend.

Prompt-to-prompt (Hertz et al. 2022) samples the source and the edited prompt in one batch from the
same noise; while sampling, the edited prompt's attention maps are replaced by the source's, so the
layout stays and only what the changed words say changes. Optionally, as in Plug-and-Play (Tumanyan et al.
2023), the edited prompt also takes the source's features at chosen decoder ResBlocks: the layout is then
kept exactly, and only what the text adds through cross-attention (a color, not a shape) can change.

    with PromptToPrompt(pipe, "a red circle at the left", "a blue circle at the left") as p2p:
        source, edited = pipe(p2p.prompts, generator=[g(0), g(0)]).images

`diffxattn.generation.edit` does this (with weights, local blend and feature injection) in one call.
"""

from __future__ import annotations

import difflib
from typing import Callable

import torch
import torch.nn.functional as F

from ..conditioning import TokenizedPrompt, prompt_tokens, tokenizers
from .processor import AttnCall, ControllerContext, step_clock
from .steps import SamplingRun, StepRange

FEATURE_LAYERS = ("up_blocks.0.resnets.0",)  # the decoder's first ResBlock, the same name on both UNets


class AttentionReweight(ControllerContext):
    """Scale the cross-attention probabilities of chosen tokens (prompt-to-prompt's reweight).

    weights: (rows, S) per conditional row and token position (1 = unchanged), or a function
    step -> (rows, S) for weights that change over steps; steps: a `StepRange` (or what `StepRange.of` reads).
    With weight 1 everywhere the image is bit-identical to no reweighting.
    """

    edits = True

    def __init__(self, pipe, weights: torch.Tensor | Callable[[int], torch.Tensor], steps=StepRange.fraction(0, 1)):
        super().__init__(pipe)
        self.weights, self.steps = weights, StepRange.of(steps)

    def wants(self, call: AttnCall) -> bool:
        return call.cross and self.steps.contains(call.step, call.num_steps)

    def edit(self, call: AttnCall, probs: torch.Tensor) -> torch.Tensor:
        w = self.weights(call.step) if callable(self.weights) else self.weights
        rows = probs.shape[0] - call.cond_start
        w = w.to(probs.device, probs.dtype).repeat_interleave(rows // w.shape[0], dim=0)  # images per prompt
        out = probs.clone()
        out[call.cond_start:] = probs[call.cond_start:] * w[:, None, None, :]
        return out


def token_mapper(tokenizer, source: str | TokenizedPrompt, target: str | TokenizedPrompt
                 ) -> tuple[torch.Tensor, bool]:
    """For each target token position, the source position whose attention it takes (-1: its own).

    Same number of tokens -> a word swap (position j takes source position j). Otherwise -> refine:
    tokens are aligned with difflib; equal runs and same-length replacements map position by position,
    inserted words keep their own attention. Returns (mapper (S,), is_swap).
    """
    src, tgt = TokenizedPrompt.of(tokenizer, source).ids, TokenizedPrompt.of(tokenizer, target).ids
    size = tokenizer.model_max_length
    if len(src) == len(tgt):
        return torch.arange(size), True
    mapper = torch.full((size,), -1, dtype=torch.long)
    for tag, i1, i2, j1, j2 in difflib.SequenceMatcher(None, src, tgt, autojunk=False).get_opcodes():
        if tag == "equal" or (tag == "replace" and i2 - i1 == j2 - j1):
            mapper[j1:j2] = torch.arange(i1, i2)
    # padding after the target's EOS attends like the source's padding
    tail = torch.arange(len(tgt), size)
    mapper[len(tgt):] = (tail - len(tgt) + len(src)).clamp(max=size - 1)
    return mapper[:size], False


class PromptToPrompt(ControllerContext):
    """Edit an image by editing its prompt, keeping the layout (word swap, refine, reweight).

    Step ranges are `StepRange`s (or what `StepRange.of` reads: a fraction 0.8, "0:10", (0, 0.8), ...).
    cross_replace: the steps in which the target's cross-attention maps come from the source; or a dict
    {word: range} per target word, others using the `"default"` entry.
    self_replace: the steps in which the target's self-attention maps come from the source.
    feature_replace: the steps in which the target's outputs of the ResBlocks `feature_layers` are the
    source's (Plug-and-Play feature injection; off by default). It keeps the object's shape and position
    exactly, so use it for attribute edits (a color); it also stops a swapped shape word from changing the shape.
    weights: optional {target word: weight} applied on top (prompt-to-prompt's reweight edit).
    source, target: text without weight syntax, or `TokenizedPrompt`s (their clean text is used).
    The batch must be [source, target] conditional rows: use `pipe(p2p.prompts, ...)`.
    """

    edits = True

    def __init__(self, pipe, source: str | TokenizedPrompt, target: str | TokenizedPrompt, *,
                 cross_replace=StepRange.fraction(0, 0.8), self_replace=StepRange.fraction(0, 0.4),
                 feature_replace=StepRange.fraction(0, 0), feature_layers=FEATURE_LAYERS,
                 weights: dict[str, float] | None = None):
        super().__init__(pipe)
        modules = dict(pipe.unet.named_modules())
        unknown = [name for name in feature_layers if name not in modules]
        if unknown:
            resnets = [n for n in modules if n.split(".")[-2:-1] == ["resnets"]]
            raise ValueError(f"feature layers {unknown} are not modules of the UNet; its ResBlocks are {resnets}")
        self.feature_replace, self.feature_layers, self.hooks = StepRange.of(feature_replace), list(feature_layers), []
        source, target = prompt_tokens(pipe, source), prompt_tokens(pipe, target)
        for tokens in (source, target):
            if tokens.chunks > 1:
                raise ValueError(f"prompt-to-prompt edits read one window of the text encoder; {tokens.prompt!r} "
                                 f"takes {tokens.chunks} (more than {len(tokens.weights) // tokens.chunks - 2} tokens, "
                                 "or BREAK)")
        self.prompts = [source.clean, target.clean]
        tokenizer = tokenizers(pipe)[0]
        self.mapper, self.is_swap = token_mapper(tokenizer, source, target)
        size = tokenizer.model_max_length
        self.words = target.words
        ranges = cross_replace if isinstance(cross_replace, dict) else {"default": cross_replace}
        ranges = {word: StepRange.of(r) for word, r in ranges.items()}
        self.cross_ranges = [ranges.get("default", StepRange.fraction(0, 0.8))] * size
        for word, pos in self.words:
            if word in ranges:
                for p in pos:
                    self.cross_ranges[p] = ranges[word]
        unknown = set(ranges) - {"default"} - {w for w, _ in self.words}
        if unknown:
            raise ValueError(f"cross_replace names {sorted(unknown)}, not words of the target prompt "
                             f"{[w for w, _ in self.words]}")
        self.self_replace = StepRange.of(self_replace)
        self.token_weights = torch.ones(size)
        for word, w in (weights or {}).items():
            positions = target.positions([word])
            if not positions:
                raise ValueError(f"weights names {word!r}, not a word of the target prompt {[w for w, _ in self.words]}")
            self.token_weights[positions] = w

    def begin(self, pipe) -> None:
        self.clock = step_clock(pipe)
        self.hooks = [pipe.unet.get_submodule(name).register_forward_hook(self._inject)
                      for name in self.feature_layers]

    def end(self) -> None:
        for hook in self.hooks:
            hook.remove()
        self.hooks = []

    def _inject(self, module, args, output: torch.Tensor) -> torch.Tensor | None:
        """Rows are [source, target] pairs (unconditional pair first under guidance): targets take the sources'."""
        if not self.feature_replace.contains(self.clock.step, self.clock.num_steps):
            return None
        output = output.clone()
        output[1::2] = output[0::2]
        return output

    def wants(self, call: AttnCall) -> bool:
        if call.batch - call.cond_start != 2:
            raise ValueError(f"prompt-to-prompt needs exactly a [source, target] batch, got "
                             f"{call.batch - call.cond_start} conditional rows; call pipe(p2p.prompts)")
        return call.cross or self.self_replace.contains(call.step, call.num_steps)

    def edit(self, call: AttnCall, probs: torch.Tensor) -> torch.Tensor:
        cs = call.cond_start
        src, tgt = probs[cs], probs[cs + 1]  # (heads, N, S)
        if call.cross:
            replace = torch.tensor([r.contains(call.step, call.num_steps) for r in self.cross_ranges],
                                   device=probs.device)
            replace &= self.mapper >= 0
            taken = src[..., self.mapper.clamp_min(0)]  # the source's column for each target token
            new = torch.where(replace, taken, tgt) * self.token_weights.to(probs)
        else:
            new = src
        out = probs.clone()
        out[cs + 1] = new
        return out


class LocalBlend(ControllerContext):
    """Keep everything outside the edited words' region from the source image.

    After each step, target latents become source + mask * (target - source), where the mask is where the
    cross-attention maps of `words` (in source or target), summed over the steps so far and max-pooled over
    `dilate` latent pixels as prompt-to-prompt does, exceed `threshold` after min-max scaling; it is applied
    in the steps `steps` (a `StepRange`; `start=f` is the old spelling of fraction(f, 1)). Use
    `callback_on_step_end=blend.callback` in the pipeline call.
    """

    def __init__(self, pipe, prompts: list[str | TokenizedPrompt], words: list[str], *, threshold: float = 0.3,
                 steps=StepRange.fraction(0.2, 1), start: float | None = None, resolutions=None, dilate: int = 2):
        if not 0 <= threshold < 1:
            raise ValueError(f"local blend threshold {threshold} must be in [0, 1)")
        super().__init__(pipe)
        self.steps = StepRange.of(steps) if start is None else StepRange.fraction(start, 1)
        self.threshold, self.resolutions, self.dilate = threshold, resolutions, dilate
        tokens = [prompt_tokens(pipe, p) for p in prompts]
        self.positions = [t.positions(words) for t in tokens]
        if not any(self.positions):
            raise ValueError(f"local blend words {words} appear in neither prompt: {[t.clean for t in tokens]}")
        self.on_run_start(SamplingRun(num_steps=1, prompts=None))

    def on_run_start(self, run: SamplingRun) -> None:
        self.num_steps = run.num_steps
        self.maps: list[torch.Tensor] = []  # this step's maps, one per layer and UNet call
        self.total: torch.Tensor | None = None  # (rows, 1, h, w) summed over the steps so far
        self.mask: torch.Tensor | None = None  # (1, 1, h, w) 1 = take the target
        self.blend_now = False  # a step just ended in `steps`: the next callback blends

    def wants(self, call: AttnCall) -> bool:
        return call.cross and (self.resolutions is None or call.height in self.resolutions)

    def observe(self, call: AttnCall, probs: torch.Tensor) -> None:
        h, w = call.height, call.width
        rows = []
        for r, pos in enumerate(self.positions):  # (heads, N, S) -> (h, w) for row r
            m = probs[r][..., pos].sum(-1).mean(0) if pos else probs.new_zeros(h * w)
            rows.append(m.reshape(1, 1, h, w))
        self.maps.append(torch.cat(rows))
        self.latent = call.latent

    def on_step_end(self, step: int) -> None:
        if self.maps:
            maps = torch.stack([F.interpolate(m, size=self.latent, mode="bilinear", align_corners=False)
                                for m in self.maps]).mean(0)  # (rows, 1, h, w)
            self.total = maps if self.total is None else self.total + maps
            k = self.dilate  # max-pool, as prompt-to-prompt does, so the mask's edge does not cut the object
            maps = F.max_pool2d(self.total, 2 * k + 1, stride=1, padding=k) if k else self.total
            low = maps.amin(dim=(-2, -1), keepdim=True)
            maps = (maps - low) / (maps.amax(dim=(-2, -1), keepdim=True) - low).clamp_min(1e-12)
            self.mask = (maps > self.threshold).any(0, keepdim=True).float()  # union over source/target
            self.maps = []
        self.blend_now = self.mask is not None and self.steps.contains(step, self.num_steps)

    def callback(self, pipe, step: int, timestep, tensors: dict) -> dict:
        """A `callback_on_step_end`: after each step in `steps`, the target keeps the source outside the mask."""
        if not self.blend_now:
            return {}
        self.blend_now = False
        latents = tensors["latents"]
        src, tgt = latents[0:1], latents[1:2]
        return {"latents": torch.cat([src, src + self.mask.to(latents) * (tgt - src)])}
