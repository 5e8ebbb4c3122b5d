"""Composable diffusion (Liu et al. 2022), as Automatic1111 reads `a cat AND a dog :0.5`: one prediction per
sub-prompt, combined as  eps = eps_uncond + sum_i w_i (eps_i - eps_uncond)  before the pipeline's guidance.

`Composable` wraps the UNet with a forward pre-hook and a forward hook, so it works on any pipeline that calls
its UNet with the unconditional rows first (ours, Stable Diffusion, SDXL): the pre-hook repeats the latents of
the conditional rows once per extra sub-prompt and gives them that sub-prompt's text (and SDXL's pooled
embedding); the hook folds the predictions back into the rows the pipeline expects. The pipeline's own text
is the first sub-prompt. With the guidance scale s the result is eps_u + s * sum_i w_i (eps_i - eps_u), which is
Automatic1111's formula; a step without unconditional rows (outside our pipeline's guidance interval) takes
the weighted mean sum_i w_i eps_i / sum_i w_i.
"""

from __future__ import annotations

import torch

from .conditioning import TextEmbeddings


class Composable:
    """`with Composable(pipe, extra, weights): pipe(prompt_embeds=first sub-prompt, ...)`.

    extra: the other sub-prompts' embeddings (one row each); weights: every sub-prompt's weight, the first's
    first. The sub-prompts' embeddings must have the pipeline text's sequence length.
    """

    def __init__(self, pipe, extra: TextEmbeddings, weights: list[float]):
        if len(weights) != 1 + extra.embeds.shape[0]:
            raise ValueError(f"{len(weights)} weights for {1 + extra.embeds.shape[0]} sub-prompts")
        self.pipe, self.extra, self.weights = pipe, extra, torch.tensor(weights)
        self.rows: tuple[int, int] | None = None  # (rows, conditional rows) of the UNet call in flight

    def __enter__(self) -> Composable:
        unet = self.pipe.unet
        self.hooks = [unet.register_forward_pre_hook(self._expand, with_kwargs=True),
                      unet.register_forward_hook(self._combine, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        for hook in self.hooks:
            hook.remove()

    def _expand(self, module, args, kwargs):
        sample = args[0] if args else kwargs["sample"]
        rows = sample.shape[0]
        cond = rows // 2 if getattr(self.pipe, "do_classifier_free_guidance", False) else rows
        if cond == rows and self.weights.sum() <= 0:
            raise ValueError(f"AND weights {self.weights.tolist()} sum to {self.weights.sum().item():g}; a step "
                             "without classifier-free guidance takes their weighted mean, which needs a positive sum")
        self.rows = (rows, cond)
        k = self.extra.embeds.shape[0]

        def repeat(x):  # the conditional rows once more per extra sub-prompt
            if not torch.is_tensor(x) or x.ndim == 0 or x.shape[0] != rows:
                return x
            return torch.cat([x] + [x[rows - cond:]] * k)

        def with_text(x, extra: torch.Tensor):  # the conditional rows of each extra sub-prompt get its text
            return torch.cat([x] + [extra[i:i + 1].to(x).expand(cond, *x.shape[1:]) for i in range(k)])

        texts = {"encoder_hidden_states": self.extra.embeds, "encoder_attention_mask": self.extra.mask}
        # (sample, timestep, encoder_hidden_states, ...) as UNet2DConditionModel.forward takes them
        args = tuple(with_text(a, self.extra.embeds) if i == 2 else repeat(a) for i, a in enumerate(args))
        kwargs = {name: with_text(v, texts[name]) if name in texts and v is not None else repeat(v)
                  for name, v in kwargs.items()}
        added = kwargs.get("added_cond_kwargs")
        if added:  # SDXL: its pooled text embedding per sub-prompt, the size/crop ids repeated
            pooled = self.extra.pooled
            kwargs["added_cond_kwargs"] = {
                name: with_text(v, pooled) if name == "text_embeds" and pooled is not None else repeat(v)
                for name, v in added.items()}
        return args, kwargs

    def _combine(self, module, args, kwargs, output):
        rows, cond = self.rows
        pred = output[0] if isinstance(output, tuple) else output.sample
        uncond = pred[:rows - cond]
        each = pred[rows - cond:].unflatten(0, (-1, cond))  # (sub-prompts, cond, ...)
        w = self.weights.to(pred).view(-1, *[1] * (each.ndim - 1))
        if rows > cond:
            combined = uncond + (w * (each - uncond[None])).sum(0)
        else:
            combined = (w * each).sum(0) / w.sum()
        pred = torch.cat([uncond, combined])
        return (pred, *output[1:]) if isinstance(output, tuple) else type(output)(sample=pred)
