"""DiffXAttnPipeline: prompt -> CLIP text embeddings -> UNet denoising loop in pixel space -> images.

A plain diffusers `DiffusionPipeline` with four components (unet, text_encoder, tokenizer, scheduler),
saved in diffusers' folder format. `import diffxattn` makes the class resolvable by name, so
`diffusers.DiffusionPipeline.from_pretrained(folder)` loads a saved pipeline without running any code
from the folder (no `trust_remote_code`).
"""

import inspect
import json
import math
import re
from pathlib import Path
from typing import Callable, Union

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import rescale_noise_cfg
from diffusers.utils.torch_utils import randn_tensor
from PIL import Image
from safetensors import safe_open

from . import conditioning, limits
from .errors import UserError, short_repr

CONFIG_FILES = ("model_index.json", "scheduler/scheduler_config.json", "unet/config.json", "text_encoder/config.json",
                "tokenizer/tokenizer_config.json")


class PipelineLoadError(UserError):
    """A pipeline folder is incomplete or holds a damaged / mismatched file; the message names the file."""


class SchedulerConfigError(UserError):
    """A scheduler whose config numbers do not give a usable schedule for the requested steps."""


class NonFiniteImageError(UserError):
    """Sampling produced NaN/inf values: a weight, a config number or an input was out of range."""


def diagnose(folder: Path, error: Exception) -> str:
    """The most specific reason a local pipeline folder failed to load, naming the file."""
    if not (folder / "model_index.json").is_file():
        return f"{folder / 'model_index.json'} is missing (not a diffusers pipeline folder)"
    files = sorted(folder.glob("*/*.safetensors"))
    for f in files:
        try:
            with safe_open(str(f), "pt") as handle:
                keys = set(handle.keys())
        except Exception as e:  # safetensors raises its own error type for bad headers
            return f"{f} is truncated or corrupted ({e})"
        bad = re.search(r"(\S+) expected shape (\S+ ?\S*), but got (\S+ ?\S*)\.", str(error))
        if bad and bad.group(1) in keys:
            return f"{f}: weight {bad.group(1)} has shape {bad.group(3)}, the model's config expects {bad.group(2)}"
    return str(error) if isinstance(error, (OSError, ValueError)) else f"{type(error).__name__}: {error}"


def check_config_files(folder: Path) -> None:
    """The folder's JSON configs parse, hold only finite numbers, and describe a noise schedule within limits."""
    for name in CONFIG_FILES:
        path = folder / name
        if not path.is_file():
            continue  # diffusers names what is missing
        try:
            config = json.loads(path.read_text(encoding="utf-8"))
            bad = _non_finite(config)
        except (ValueError, RecursionError) as e:
            raise PipelineLoadError(f"{path} is not valid JSON ({type(e).__name__}: {e})") from None
        if bad is not None:
            raise PipelineLoadError(f"{path}: {bad} is not a finite number")
        if name.startswith("scheduler/") and isinstance(config, dict):
            try:
                n = limits.whole(config.get("num_train_timesteps", 1000), "num_train_timesteps")
                limits.check(limits.TRAIN_TIMESTEPS, n, "num_train_timesteps")
            except limits.LimitError as e:
                raise PipelineLoadError(f"{path}: {e}") from None


def _non_finite(config) -> str | None:
    """The key path of the first NaN/inf number in a parsed JSON value, or None (iterative: any depth)."""
    todo = [("", config)]
    while todo:
        where, value = todo.pop()
        if isinstance(value, float) and not math.isfinite(value):
            return where or "the value"
        if isinstance(value, dict):
            todo += [(f"{where}.{k}" if where else str(k), v) for k, v in value.items()]
        elif isinstance(value, list):
            todo += [(f"{where}[{i}]", v) for i, v in enumerate(value)]
    return None


def check_weights_present(pipe: "DiffXAttnPipeline", folder: Path) -> None:
    """Every parameter the components' configs ask for was in their weight files: diffusers leaves the missing
    ones unallocated (on the "meta" device) with only a warning, and the first use then fails."""
    for name, component in pipe.components.items():
        if isinstance(component, torch.nn.Module):
            missing = [k for k, v in [*component.named_parameters(), *component.named_buffers()] if v.is_meta]
            if missing:
                raise PipelineLoadError(f"{folder / name}: the weights file has no weights for {', '.join(missing[:3])}"
                                        f"{' ...' if len(missing) > 3 else ''}, which its config.json asks for "
                                        "(a config edited after the weights were saved?)")


def check_components(pipe: "DiffXAttnPipeline", folder: Path) -> None:
    """Components that load on their own but cannot work together (a tokenizer longer than the text encoder's
    window pads every prompt to its length; ids past the embedding table fail inside the encoder)."""
    try:
        limits.steps(pipe.config.default_steps, "default_steps")
        limits.guidance(pipe.config.default_guidance_scale, "default_guidance_scale")
    except limits.LimitError as e:
        raise PipelineLoadError(f"{folder / 'model_index.json'}: {e}") from None
    tokenizer, encoder = pipe.tokenizer, pipe.text_encoder.config
    length = tokenizer.model_max_length
    if isinstance(length, bool) or not isinstance(length, int) or not 2 <= length <= encoder.max_position_embeddings:
        raise PipelineLoadError(f"{folder / 'tokenizer'}: model_max_length={short_repr(length)} must be from 2 to "
                                f"the text encoder's max_position_embeddings ({encoder.max_position_embeddings})")
    if len(tokenizer) > encoder.vocab_size:
        raise PipelineLoadError(f"{folder / 'tokenizer'} has {len(tokenizer)} tokens, more than the text encoder's "
                                f"vocab_size {encoder.vocab_size}")
    cross = pipe.unet.config.get("cross_attention_dim")
    if cross != encoder.hidden_size:
        raise PipelineLoadError(f"{folder / 'unet'}: cross_attention_dim={short_repr(cross)} differs from the "
                                f"text encoder's hidden_size {encoder.hidden_size}")


def check_scheduler(scheduler, steps: int) -> None:
    """Take every one of `steps` steps on a copy of the scheduler with a 1-pixel sample: a schedule whose numbers
    do not work (NaN betas, an offset past the schedule, an unknown option) fails here with its config named,
    instead of failing inside the sampling loop or giving a black image."""
    try:
        # a fresh scheduler from the config: a copy would carry hooks wrapped around the instance (controllers)
        s = type(scheduler).from_config(scheduler.config)
        with torch.random.fork_rng(devices=[]):  # stochastic steps must not move the caller's random state
            s.set_timesteps(steps, device="cpu")
            x = torch.ones(1, 1, 1, 1) * s.init_noise_sigma
            for t in s.timesteps:
                x = s.step(torch.ones_like(x), t, s.scale_model_input(x, t)).prev_sample
        finite = bool(torch.isfinite(x).all())
    except Exception as e:  # raised by diffusers from the scheduler's config numbers
        raise SchedulerConfigError(f"the scheduler ({type(scheduler).__name__}) does not work with {steps} steps: "
                                f"{type(e).__name__}: {e}") from e
    if not finite:
        raise SchedulerConfigError(f"the scheduler ({type(scheduler).__name__}) gives NaN/inf values with {steps} steps; "
                                "check the numbers of its scheduler_config.json (betas, trained_betas)")


class DiffXAttnPipeline(DiffusionPipeline):
    """Text-to-image sampling with classifier-free guidance.

    Example:
        >>> pipe = DiffXAttnPipeline.from_pretrained("pipelines/shapes-32")
        >>> image = pipe("a red circle at the left", generator=torch.Generator().manual_seed(0)).images[0]
    """

    model_cpu_offload_seq = "text_encoder->unet"
    # what a `callback_on_step_end` may read and replace (diffusers' protocol); under classifier-free guidance
    # the embeddings and mask hold the negative rows first, then the conditional ones, as in Stable Diffusion
    _callback_tensor_inputs = ["latents", "prompt_embeds", "prompt_attention_mask"]

    # The config arguments' annotations are evaluated types (no `from __future__ import annotations` in this file)
    # and default_guidance_interval's is a typing.Union: diffusers' loader warns about a plain tuple annotation, and
    # before 0.37 it fails with a KeyError on a string annotation or an `X | Y` union.
    def __init__(self, unet, text_encoder, tokenizer, scheduler, default_steps: int = 30,
                 default_guidance_scale: float = 1.0,
                 default_guidance_interval: Union[tuple[float, float], list[float]] = (0.0, 1.0)):
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)
        self.register_to_config(default_steps=default_steps, default_guidance_scale=default_guidance_scale,
                                default_guidance_interval=list(default_guidance_interval))
        self._guidance_scale = default_guidance_scale
        self._guiding = True  # False during the steps outside the guidance interval
        self.strict = False  # True: a prompt longer than the text encoder's window is an error, not a warning

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, **kwargs):
        """diffusers' loader, with errors about a local folder's files rewritten to name the file at fault."""
        folder = Path(str(pretrained_model_name_or_path))
        if not folder.is_dir():
            return super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        check_config_files(folder)  # before diffusers allocates what they describe
        try:
            pipe = super().from_pretrained(pretrained_model_name_or_path, **kwargs)
        except Exception as e:  # the folder is user data: whatever its files make a loader raise is their fault
            raise PipelineLoadError(f"cannot load the pipeline in {folder}: {diagnose(folder, e)}") from e
        check_weights_present(pipe, folder)
        check_components(pipe, folder)
        return pipe

    # -- properties the attention tools read (same names as diffusers' StableDiffusionPipeline) --
    @property
    def do_classifier_free_guidance(self) -> bool:
        """Whether the UNet's batch has unconditional rows (first half) now: guidance > 1, and, while sampling,
        the current step inside the guidance interval. Controllers read it to find the conditional rows."""
        return self._guidance_scale > 1.0 and self._guiding

    @property
    def downsample_factor(self) -> int:
        return getattr(self.unet.config, "patch_size", 1) * 2 ** (len(self.unet.config.block_out_channels) - 1)

    def encode_prompt(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text embeddings (B, S, D) and key mask (B, S) for a list of prompts ("" = unconditional).

        Words past the encoder's max length are dropped with a warning naming them (an error if `self.strict`).
        """
        return conditioning.encode_texts(self.tokenizer, self.text_encoder, prompts, strict=self.strict,
                                         dtype=self.unet.dtype)

    def check_inputs(self, prompts: list[str], negative: list[str] | None, height: int, width: int, steps: int,
                     *, guidance_scale: float = 1.0, num_images: int = 1) -> None:
        """Every input checked before anything is allocated: values in range, sizes within `limits`."""
        if not prompts:
            raise ValueError("prompt is an empty list; give at least one prompt (\"\" for an unconditional image)")
        if negative is not None and len(negative) != len(prompts):
            raise ValueError(f"negative_prompt has {len(negative)} entries but prompt has {len(prompts)}; "
                             "give one negative prompt, or one per prompt")
        f = self.downsample_factor
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0 or value % f:
                raise ValueError(f"{name}={value!r} must be a positive multiple of the UNet's down-sampling factor {f}")
        limits.steps(steps)
        limits.guidance(guidance_scale)
        limits.whole(num_images, "number of images")
        limits.check_images(num_images, height, width)
        check_scheduler(self.scheduler, steps)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        *,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int | None = None,
        guidance_scale: float | None = None,
        guidance_rescale: float = 0.0,
        guidance_interval: tuple[float, float] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        prompt_embeds: torch.Tensor | None = None,
        prompt_attention_mask: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        negative_prompt_attention_mask: torch.Tensor | None = None,
        callback_on_step_end: Callable[["DiffXAttnPipeline", int, torch.Tensor, dict], dict | None] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """Generate images.

        `prompt_embeds`/`prompt_attention_mask` replace the text encoder's output (used by prompt weighting).
        `callback_on_step_end(pipe, i, t, tensors)` runs after each scheduler step, as in diffusers: `tensors`
        holds `callback_on_step_end_tensor_inputs` (default ["latents"]; also "prompt_embeds" and
        "prompt_attention_mask", negative rows first under guidance) and the tensors it returns replace them.
        `generator` may be a list with one generator per image, so an image's bits do not depend on its batch.
        `latents` (B, C, H, W), as in diffusers: the starting noise instead of drawing it (an inversion's).
        `guidance_rescale` (0..1) rescales the guided prediction towards the conditional one's standard deviation
        (Lin et al. 2023); `guidance_interval=(a, b)` applies guidance only in that fraction of the steps (the
        conditional prediction alone elsewhere, at half the cost; Kynkäänniemi et al. 2024). `None` means the
        pipeline's default (steps, guidance scale and interval are saved in its config).
        """
        if output_type not in ("pil", "np", "pt"):
            raise ValueError(f"output_type={output_type!r}; expected 'pil', 'np' or 'pt'")
        tensor_inputs = self._step_tensor_inputs(callback_on_step_end, callback_on_step_end_tensor_inputs)
        steps = self.config.default_steps if num_inference_steps is None else num_inference_steps
        self._guidance_scale = self.config.default_guidance_scale if guidance_scale is None else guidance_scale
        if guidance_interval is None:
            guidance_interval = tuple(self.config.get("default_guidance_interval", (0.0, 1.0)))
        size = self.unet.config.sample_size
        height = size if height is None else height
        width = size if width is None else width
        if prompt_embeds is None:
            prompts = [prompt] if isinstance(prompt, str) else list(prompt if prompt is not None else [])
        else:
            prompts = [""] * prompt_embeds.shape[0]
        negative = [negative_prompt] * len(prompts) if isinstance(negative_prompt, str) else negative_prompt
        self.check_inputs(prompts, negative, height, width, steps, guidance_scale=self._guidance_scale,
                          num_images=len(prompts) * num_images_per_prompt)
        limits.fraction(guidance_rescale, "guidance_rescale")
        guidance_interval = limits.interval(guidance_interval, "guidance_interval")
        if isinstance(generator, list) and len(generator) != len(prompts) * num_images_per_prompt:
            raise ValueError(f"got {len(generator)} generators for {len(prompts) * num_images_per_prompt} images")
        device = self._execution_device

        self._guiding = True
        guided = self.do_classifier_free_guidance  # the text input holds negative rows, then conditional ones
        prompt_embeds, prompt_attention_mask = self._text_input(
            prompts, negative, num_images_per_prompt, (prompt_embeds, prompt_attention_mask),
            (negative_prompt_embeds, negative_prompt_attention_mask))

        batch = len(prompts) * num_images_per_prompt
        shape = (batch, self.unet.config.in_channels, height, width)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.unet.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents have shape {tuple(latents.shape)}; this call needs {shape} "
                             "(images, channels, height, width)")
        else:
            latents = latents.to(device=device, dtype=self.unet.dtype)
        self.scheduler.set_timesteps(steps, device=device)
        latents = latents * self.scheduler.init_noise_sigma
        self._num_timesteps = len(self.scheduler.timesteps)
        step_kwargs = self._step_kwargs(generator)
        # the conditional rows for the steps outside the guidance interval: the same tensors at every such step,
        # so the text's keys and values are computed once per run (`text_keys_values` keys on the tensor)
        cond_rows = (prompt_embeds.chunk(2)[1], prompt_attention_mask.chunk(2)[1]) if guided else None

        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            x_in = self.scheduler.scale_model_input(latents, t)
            self._guiding = guidance_interval[0] <= i / len(self.scheduler.timesteps) < guidance_interval[1]
            if self.do_classifier_free_guidance:
                x2 = torch.cat([x_in, x_in])  # negative rows, then conditional ones, as in prompt_embeds
                pred_u, pred_c = self._predict(x2, t, prompt_embeds, prompt_attention_mask).chunk(2)
                pred = pred_u + self._guidance_scale * (pred_c - pred_u)
                if guidance_rescale > 0:
                    pred = rescale_noise_cfg(pred, pred_c, guidance_rescale)
            elif guided:  # a step outside the guidance interval: the conditional rows alone
                pred = self._predict(x_in, t, *cond_rows)
            else:
                pred = self._predict(x_in, t, prompt_embeds, prompt_attention_mask)
            latents = self.scheduler.step(pred, t, latents, **step_kwargs).prev_sample
            if callback_on_step_end is not None:
                current = {"latents": latents, "prompt_embeds": prompt_embeds,
                           "prompt_attention_mask": prompt_attention_mask}
                out = callback_on_step_end(self, i, t, {k: current[k] for k in tensor_inputs}) or {}
                latents = out.get("latents", latents)
                prompt_embeds = out.get("prompt_embeds", prompt_embeds)
                prompt_attention_mask = out.get("prompt_attention_mask", prompt_attention_mask)
                if guided and ("prompt_embeds" in out or "prompt_attention_mask" in out):
                    cond_rows = (prompt_embeds.chunk(2)[1], prompt_attention_mask.chunk(2)[1])

        self._guiding = True
        images = self.postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _text_input(self, prompts: list[str], negative: list[str] | None, n: int, given: tuple,
                    negative_given: tuple) -> tuple[torch.Tensor, torch.Tensor]:
        """The UNet's text input: embeddings (B, S, D) and key mask (B, S), each prompt's rows repeated for its
        n images; under classifier-free guidance the negative rows first, then the conditional ones (the layout
        Stable Diffusion's step callbacks see too). `given`: (embeds, mask) passed in, encoded when None."""
        embeds, mask = given if given[0] is not None else self.encode_prompt(prompts)
        if mask is None:
            mask = torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device)
        embeds, mask = self._repeat(embeds, mask, n)
        if not self.do_classifier_free_guidance:
            return embeds, mask
        neg = negative_given if negative_given[0] is not None else self.encode_prompt(negative or [""] * len(prompts))
        neg_embeds, neg_mask = self._repeat(*neg, n)
        return torch.cat([neg_embeds, embeds]), torch.cat([neg_mask, mask])

    def _step_tensor_inputs(self, callback, names: list[str] | None) -> list[str]:
        """The tensors a step callback sees: its own `tensor_inputs` (diffusers' PipelineCallback), the names
        asked for, or the latents; each must be one of `_callback_tensor_inputs`."""
        names = list(getattr(callback, "tensor_inputs", None) or names or ["latents"])
        unknown = [n for n in names if n not in self._callback_tensor_inputs]
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs {unknown}: a step callback can read "
                             f"{self._callback_tensor_inputs}")
        return names

    def _step_kwargs(self, generator) -> dict:
        """Extra arguments of `scheduler.step`: stochastic samplers (DDPM, ancestral) draw their step noise from
        the per-image generators; a DDIM that clips (or thresholds) x0 also recomputes its noise estimate from the
        clipped x0. Without that, the step mixes a clipped x0 with the noise of the unclipped one, and guidance,
        which pushes x0 outside [-1, 1], then draws extra objects (guidance 2: all-correct 0.00 vs 0.8)."""
        params = inspect.signature(self.scheduler.step).parameters
        kwargs = {"generator": generator} if "generator" in params else {}
        clips = self.scheduler.config.get("clip_sample") or self.scheduler.config.get("thresholding")
        if "use_clipped_model_output" in params and clips:
            kwargs["use_clipped_model_output"] = True
        return kwargs

    def compile_unet(self, **options) -> "DiffXAttnPipeline":
        """Sample with a `torch.compile`d UNet: inductor fuses GroupNorm+SiLU and the other small ops and removes
        the Python between layers; measured 1.28x faster sampling on a 2-core CPU (`python bench/bench_speed.py`).
        Compilation takes 15-100 s once per batch size (a run with a guidance interval has two: the guided steps
        run the pair of rows), so it pays off only for many images at a fixed batch; on a CPU the eager UNet
        stays the default. Runs with attention controllers installed (capture, edits, guidance) or hooks on the
        UNet (AND sub-prompts) use the eager UNet, whose processors and hooks they change. Images agree with the eager ones to float rounding (about 1e-6),
        not bit for bit. `options` go to `torch.compile`. Returns the pipeline."""
        self._compiled_unet = torch.compile(self.unet, **options)
        return self

    def _predict(self, x: torch.Tensor, t: torch.Tensor, emb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        unet = self.unet
        compiled = self.__dict__.get("_compiled_unet")
        if compiled is not None:
            from .control.processor import controlled  # (control imports the models, which import this module)

            hooked = controlled(unet) or unet._forward_pre_hooks or unet._forward_hooks  # e.g. AND sub-prompts
            unet = unet if hooked else compiled
        return unet(x, t, encoder_hidden_states=emb, encoder_attention_mask=mask).sample

    @staticmethod
    def _repeat(embeds: torch.Tensor, mask: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return embeds.repeat_interleave(n, dim=0), mask.repeat_interleave(n, dim=0)

    @staticmethod
    def postprocess(x: torch.Tensor, output_type: str = "pil"):
        """Model space [-1, 1] (B, C, H, W) -> 'pt' (B, C, H, W) in [0, 1], 'np' (B, H, W, C) float, or PIL list."""
        if not torch.isfinite(x).all():  # clamped, NaN would save as a black image with exit code 0
            raise NonFiniteImageError("sampling produced NaN/inf values: a weight or config number of the pipeline "
                                      "(e.g. the scheduler's betas), or an input, is out of range")
        x = (x.float() / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return x
        arr = x.permute(0, 2, 3, 1).cpu().numpy()
        if output_type == "np":
            return arr
        return [Image.fromarray(np.round(a * 255).astype(np.uint8)) for a in arr]


# diffusers resolves a saved pipeline's `_class_name` by name inside the `diffusers` module: registered there,
# plain `DiffusionPipeline.from_pretrained(folder)` loads our folders (see diffxattn/__init__.py).
import diffusers as _diffusers  # noqa: E402

setattr(_diffusers, DiffXAttnPipeline.__name__, DiffXAttnPipeline)
