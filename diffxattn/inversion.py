"""Real-image inversion: the starting noise (and, under guidance, each step's unconditional embedding) from which
a pipeline's DDIM sampler draws a given image again, so that heatmaps and prompt edits work on that image.

    inv = invert(pipe, load_rgb(Path("photo.png")), "a red circle at the left")   # null-text by default
    inv.save("inv/");  inv = Inversion.load("inv/", pipe)
    image = reconstruct(pipe, inv).images[0]                                    # the input, again
    source, edited = edit(pipe, inv.prompt, "a blue circle at the left", inversion=inv)

Methods (`METHODS`); each step of the sampler, x_t -> x_prev, is solved backwards, x_prev -> x_t:
- "ddim": the model's prediction at x_prev stands in for the one at x_t (one model call per step; drifts).
- "fixed-point": x_t solved so that the sampler's own step maps it to x_prev exactly, by fixed-point iterations on
  the model's prediction (the linear part of a v- or x0-prediction solved in closed form); with guidance, the
  guided prediction.
- "null-text" (Mokady et al. 2023): the fixed-point inversion without guidance is the pivot; then, along the
  guided sampling run from its noise, each guided step's unconditional embedding is optimised so that the step
  lands on the pivot. It starts from the prompt's own embedding (negative-prompt inversion, Miyake et al. 2023),
  with which the guided step is the unguided one, so Adam only corrects what drifts past the paper's tolerance.
  Started from "" as in the paper, Adam could not reach the pivot on the shipped model (19-29 dB on 4 renders):
  with padding masked, "" leaves it two token vectors to move.

A saved inversion (safetensors + JSON) records the prompt, sampler, steps, guidance, size and a fingerprint of the
pipeline's weights; loading it into another pipeline or sampling it with other settings is an error saying why.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
import warnings
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler
from PIL import Image
from safetensors.torch import load_file, save_file

from . import atomic
from .checkpoint import check_replaceable
from .conditioning import encode, masks_padding
from .errors import UserError

METHODS = ("null-text", "fixed-point", "ddim")
SAMPLERS = ("ddim",)  # samplers whose step can be solved backwards here (deterministic, one model call per step)
FORMAT = 1
FILES = ("inversion.json", "inversion.safetensors")
IMAGES = ("input.png", "reconstruction.png")  # what `diffxattn invert` adds to the folder, for the eye


class InversionError(UserError):
    """An inversion that does not fit the pipeline or the settings it is used with; the message says why."""


@dataclass
class Inversion:
    """What `invert` found: `latents` (1, C, h, w), the noise the sampler starts from; `null_embeds` (steps, S, D)
    and `null_mask` (S,): the unconditional text input of each step (null-text; None otherwise). The other fields
    are the settings it must be sampled with."""

    latents: torch.Tensor
    null_embeds: torch.Tensor | None
    null_mask: torch.Tensor | None
    prompt: str
    method: str
    steps: int
    guidance: float
    guidance_interval: tuple[float, float]
    height: int  # image size in pixels
    width: int
    fingerprint: str
    sampler: str = "ddim"
    seconds: float = field(default=0.0, compare=False)

    def meta(self) -> dict:
        meta = {f.name: getattr(self, f.name) for f in fields(self)
                if f.name not in ("latents", "null_embeds", "null_mask")}
        return {"format": FORMAT, **meta, "guidance_interval": list(self.guidance_interval)}

    def save(self, out: str | Path, overwrite: bool = False, images: dict[str, Image.Image] | None = None) -> Path:
        """Write inversion.json and inversion.safetensors (and `images`: name -> PIL image, names from `IMAGES`)
        as the folder `out`, replacing it atomically; without `overwrite`, an existing `out` must be empty or an
        inversion folder."""
        tensors = {"latents": self.latents.detach().float().cpu().contiguous()}
        if self.null_embeds is not None:
            tensors["null_embeds"] = self.null_embeds.detach().float().cpu().contiguous()
            tensors["null_mask"] = self.null_mask.detach().cpu().to(torch.uint8).contiguous()

        def write(tmp: Path) -> None:
            tmp.mkdir()
            save_file(tensors, str(tmp / "inversion.safetensors"))
            (tmp / "inversion.json").write_text(json.dumps(self.meta(), indent=2), encoding="utf-8")
            for name, image in (images or {}).items():
                image.save(tmp / name)

        if set(images or ()) - set(IMAGES):
            raise ValueError(f"images {sorted(set(images) - set(IMAGES))}: an inversion folder holds {IMAGES}")
        if not overwrite:
            check_replaceable(Path(out), is_inversion_folder, "an inversion folder")
        return atomic.replace_folder(out, write)

    @classmethod
    def load(cls, folder: str | Path, pipe=None) -> "Inversion":
        """Read a saved inversion; with `pipe`, also check that it was made with that pipeline (`check`)."""
        folder = Path(folder)
        for name in FILES:
            if not (folder / name).is_file():
                raise InversionError(f"{folder} is not an inversion folder: {folder / name} is missing "
                                     "(make one with `diffxattn invert IMAGE --prompt TEXT -o FOLDER`)")
        try:
            meta = json.loads((folder / "inversion.json").read_text(encoding="utf-8"))
            tensors = load_file(str(folder / "inversion.safetensors"))
        except Exception as e:  # the files are user data: whatever their readers raise is their fault
            raise InversionError(f"{folder}: cannot read the inversion ({type(e).__name__}: {e})") from None
        found = meta.get("format") if isinstance(meta, dict) else None
        if found != FORMAT:
            raise InversionError(f"{folder / 'inversion.json'}: format {found!r}, expected {FORMAT}")
        try:
            inv = cls(latents=tensors["latents"], null_embeds=tensors.get("null_embeds"),
                      null_mask=tensors["null_mask"].bool() if "null_mask" in tensors else None,
                      **{k: meta[k] for k in ("prompt", "method", "steps", "guidance", "height", "width",
                                              "fingerprint", "sampler")},
                      guidance_interval=tuple(meta["guidance_interval"]), seconds=meta.get("seconds", 0.0))
        except (KeyError, TypeError) as e:
            raise InversionError(f"{folder}: the inversion lacks {e} or holds a wrong value") from None
        if pipe is not None:
            inv.check(pipe, folder)
        return inv

    def check(self, pipe, where: str | Path = "the inversion") -> None:
        """The inversion fits `pipe`: same weights and noise schedule, a DDIM sampler, latents of the saved size."""
        mine = fingerprint(pipe)
        if self.fingerprint != mine:
            raise InversionError(f"{where} was made with another pipeline (weights and schedule fingerprint "
                                 f"{self.fingerprint[:12]}, this pipeline's {mine[:12]}); invert the image again "
                                 "with this pipeline")
        check_sampler(pipe)
        shape = latent_shape(pipe, self.height, self.width)
        if tuple(self.latents.shape) != shape:
            raise InversionError(f"{where}: its latents have shape {tuple(self.latents.shape)}, but a "
                                 f"{self.width}x{self.height} image on this pipeline needs {shape}")
        if self.null_embeds is not None and self.null_embeds.shape[0] != self.steps:
            raise InversionError(f"{where}: {self.null_embeds.shape[0]} null-text embeddings for {self.steps} steps")

    def apply(self, pipe, kwargs: dict, batch: int = 1) -> tuple[dict, "NullTextCallback | None"]:
        """A pipeline call's `kwargs` with this inversion put in, for `batch` images, and its step callback (None
        without null-text embeddings) for `StepCallbacks`. Settings in `kwargs` (None: unset) must be the
        inversion's: with others it would not draw the image it was made from."""
        self.check(pipe)
        kwargs = dict(kwargs)
        asked = {"steps": kwargs.pop("num_inference_steps", None), "guidance": kwargs.pop("guidance_scale", None),
                 "guidance interval": kwargs.pop("guidance_interval", None)}
        saved = {"steps": self.steps, "guidance": self.guidance, "guidance interval": self.guidance_interval}
        if not masks_padding(pipe):
            asked["guidance interval"] = None  # Stable Diffusion has none
        for name, value in asked.items():
            if value is not None and (tuple(value) if name == "guidance interval" else value) != saved[name]:
                raise InversionError(f"{name} {value}: the inversion was made for {name} {saved[name]}, and it "
                                     "draws the image again only with that; invert the image again to use another")
        if kwargs.pop("guidance_rescale", 0.0):
            raise InversionError("guidance rescale changes the guided prediction the inversion was solved for; "
                                 "leave it at 0 with an inversion")
        kwargs.pop("generator", None)  # the noise is the inversion's
        kwargs["latents"] = self.latents.repeat(batch, 1, 1, 1)
        kwargs.update(num_inference_steps=self.steps, guidance_scale=self.guidance)
        if masks_padding(pipe):  # ours: the interval it was made with; Stable Diffusion guides every step
            kwargs["guidance_interval"] = self.guidance_interval
        if self.null_embeds is None:
            return kwargs, None
        # the first image's negative rows are the inversion's; the other images' (edits) the pipeline's own ""
        negative, mask = encode(pipe, [""] * batch)
        negative, mask = negative.clone(), mask.clone()
        negative[0], mask[0] = self.null_embeds[0].to(negative), self.null_mask.to(mask)
        kwargs["negative_prompt_embeds"] = negative.to(pipe.unet.dtype)
        if masks_padding(pipe):
            kwargs["negative_prompt_attention_mask"] = mask
        return kwargs, NullTextCallback(self.null_embeds)


def is_inversion_folder(folder: Path) -> bool:
    names = {p.name for p in folder.iterdir()}
    return set(FILES) <= names <= set(FILES + IMAGES)


class NullTextCallback:
    """A step callback that gives the next step of the first image its own unconditional (negative) embeddings.

    Edited images (the batch's other rows) keep the pipeline's "": the inversion's embeddings are the source
    prompt's (see `invert`), a negative prompt that, on an edited row, pushes away from the source and grows its
    objects (bench_inversion on 16 renders: target color 0.69 and shape and position kept 0.75 with them on every
    row, 0.81 and 1.0 on the first row only)."""

    tensor_inputs = ["prompt_embeds"]

    def __init__(self, null_embeds: torch.Tensor):
        self.null_embeds = null_embeds

    def __call__(self, pipe, i: int, timestep, tensors: dict) -> dict:
        step = i + 1
        if step >= len(self.null_embeds) or not pipe.do_classifier_free_guidance:
            return {}
        embeds = tensors["prompt_embeds"].clone()
        embeds[0] = self.null_embeds[step].to(embeds)  # the negative rows come first
        return {"prompt_embeds": embeds}


def fingerprint(pipe) -> str:
    """A hash of the UNet's and text encoder's weights (names, shapes and sums) and the noise schedule: an
    inversion found with one pipeline means nothing to another."""
    h = hashlib.sha256()
    for module in (pipe.unet, pipe.text_encoder):
        for name, tensor in module.state_dict().items():
            t = tensor.detach().double()
            h.update(f"{name}{tuple(t.shape)}{t.sum().item():.6e}{t.abs().sum().item():.6e}".encode())
    schedule = {k: pipe.scheduler.config.get(k) for k in ("num_train_timesteps", "beta_schedule", "beta_start",
                                                          "beta_end", "prediction_type", "trained_betas")}
    h.update(json.dumps(schedule, sort_keys=True, default=str).encode())
    return h.hexdigest()


def check_sampler(pipe) -> None:
    """Inversion solves DDIM steps backwards: the pipeline's sampler must be a DDIM that does not clip x0."""
    scheduler = pipe.scheduler
    if not isinstance(scheduler, DDIMScheduler):
        raise InversionError(f"inversion supports the samplers {', '.join(SAMPLERS)}; this pipeline samples with "
                             f"{type(scheduler).__name__} (give --scheduler ddim)")
    if scheduler.config.get("clip_sample") or scheduler.config.get("thresholding"):
        raise InversionError("inversion needs a DDIM sampler that does not clip x0; this pipeline's sets "
                             "clip_sample or thresholding (set them to false in its scheduler_config.json)")


def vae_factor(pipe) -> int:
    return getattr(pipe, "vae_scale_factor", 1) if hasattr(pipe, "vae") else 1


def latent_shape(pipe, height: int, width: int) -> tuple[int, int, int, int]:
    f = vae_factor(pipe)
    return (1, pipe.unet.config.in_channels, height // f, width // f)


def image_size(pipe) -> tuple[int, int]:
    """(height, width) in pixels that the pipeline draws by default."""
    size = pipe.unet.config.sample_size * vae_factor(pipe)
    return size, size


def prepare_image(image: Image.Image, height: int, width: int) -> Image.Image:
    """`image` as 8-bit RGB of `width` x `height`: another mode is converted, another size resized (bicubic),
    each with a warning saying so."""
    from .data.imagefolder import to_rgb

    if image.mode != "RGB":
        warnings.warn(f"the image is mode {image.mode}; converted to RGB", stacklevel=3)
        image = to_rgb(image, Path("the image"))
    if image.size != (width, height):
        warnings.warn(f"the image is {image.width}x{image.height}; resized to the pipeline's {width}x{height}",
                      stacklevel=3)
        image = image.resize((width, height), Image.Resampling.BICUBIC)
    return image


@torch.no_grad()
def encode_image(pipe, image: Image.Image) -> torch.Tensor:
    """The image in the UNet's space (1, C, h, w): pixels in [-1, 1]; through the VAE on Stable Diffusion."""
    x = torch.from_numpy(np.asarray(image, np.float32) / 127.5 - 1).permute(2, 0, 1)[None]
    x = x.to(pipe._execution_device, pipe.unet.dtype)
    if not hasattr(pipe, "vae"):
        return x
    vae = pipe.vae
    return vae.encode(x.to(vae.dtype)).latent_dist.mean * vae.config.scaling_factor


class _Step:
    """One DDIM step of the pipeline's sampler (eta 0, no clipping), x_t -> x_prev, as `DDIMScheduler.step`
    computes it, and its inverse. The model output m gives eps = A m + B x_t for every prediction type."""

    def __init__(self, scheduler: DDIMScheduler, t: int, steps: int):
        alphas = scheduler.alphas_cumprod
        prev = t - scheduler.config.num_train_timesteps // steps
        a_t = float(alphas[t])
        a_p = float(alphas[prev]) if prev >= 0 else float(scheduler.final_alpha_cumprod)
        self.t, self.a_t, self.a_p = t, a_t, a_p
        kind = scheduler.config.prediction_type
        if kind == "epsilon":
            self.A, self.B = 1.0, 0.0
        elif kind == "v_prediction":
            self.A, self.B = math.sqrt(a_t), math.sqrt(1 - a_t)
        elif kind == "sample":
            self.A, self.B = -math.sqrt(a_t / (1 - a_t)), 1 / math.sqrt(1 - a_t)
        else:
            raise InversionError(f"prediction_type {kind!r}; inversion supports epsilon, v_prediction and sample")
        # x_t = k x_prev + c eps: the step solved for x_t
        self.k = math.sqrt(a_t / a_p)
        self.c = math.sqrt(1 - a_t) - self.k * math.sqrt(1 - a_p)

    def forward(self, x: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        eps = self.A * m + self.B * x
        x0 = (x - math.sqrt(1 - self.a_t) * eps) / math.sqrt(self.a_t)
        return math.sqrt(self.a_p) * x0 + math.sqrt(1 - self.a_p) * eps

    def backward(self, x_prev: torch.Tensor, m: torch.Tensor) -> torch.Tensor:
        """x_t from x_prev and the model output at x_t (the B x_t part of eps moved to the left side)."""
        return (self.k * x_prev + self.c * self.A * m) / (1 - self.c * self.B)


class _Model:
    """The UNet's output for the inversion's text: conditional, or guided with a given unconditional input."""

    def __init__(self, pipe, prompt: str):
        self.pipe, self.masked = pipe, masks_padding(pipe)
        with torch.no_grad():
            embeds, mask = encode(pipe, [prompt, ""])
        (self.cond, self.null), (self.cond_mask, self.null_mask) = embeds.chunk(2), mask.chunk(2)

    def __call__(self, x: torch.Tensor, t: int, embeds: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        kwargs = {"encoder_attention_mask": mask} if self.masked else {}
        timestep = torch.tensor([t] * x.shape[0], device=x.device)
        return self.pipe.unet(x, timestep, encoder_hidden_states=embeds.to(x.dtype), **kwargs).sample

    def guided(self, x: torch.Tensor, t: int, scale: float, null: torch.Tensor | None = None,
               null_mask: torch.Tensor | None = None) -> torch.Tensor:
        if scale == 1:
            return self(x, t, self.cond, self.cond_mask)
        null = self.null if null is None else null
        null_mask = self.null_mask if null_mask is None else null_mask
        m_u, m_c = self(torch.cat([x, x]), t, torch.cat([null, self.cond]),
                        torch.cat([null_mask, self.cond_mask])).chunk(2)
        return m_u + scale * (m_c - m_u)


def _solve(step: _Step, x_prev: torch.Tensor, predict: Callable[[torch.Tensor], torch.Tensor], iterations: int,
           tolerance: float, history: int = 3) -> torch.Tensor:
    """x_t with step.forward(x_t, predict(x_t)) = x_prev: the fixed point of G(x) = step.backward(x_prev,
    predict(x)), from G(x_prev), by Anderson-accelerated iterations (Walker & Ni 2011; plain iterations diverge
    where the model's prediction changes fast with x, as under strong guidance). Ends when an iterate moves less
    than `tolerance` (max abs); the iterate with the smallest residual is kept."""
    x = step.backward(x_prev, predict(x_prev))
    best, best_residual = x, math.inf
    xs, rs = [], []  # recent iterates and residuals G(x) - x, flattened
    for _ in range(iterations - 1):
        g = step.backward(x_prev, predict(x))
        r = g - x
        residual = r.abs().max().item()
        if residual < best_residual:
            best, best_residual = g, residual
        if residual < tolerance:
            break
        xs, rs = (xs + [x.flatten()])[-history - 1:], (rs + [r.flatten()])[-history - 1:]
        if len(xs) == 1:
            x = g
            continue
        d_r = torch.stack([b - a for a, b in zip(rs, rs[1:])], 1)  # (n, k)
        d_x = torch.stack([b - a for a, b in zip(xs, xs[1:])], 1)
        gamma = torch.linalg.lstsq(d_r.double(), rs[-1].double()[:, None]).solution.to(r.dtype)
        x = (g.flatten() - ((d_x + d_r) @ gamma)[:, 0]).view_as(x)
    return best


def invert(pipe, image: Image.Image, prompt: str, *, method: str = "null-text", steps: int | None = None,
           guidance: float | None = None, guidance_interval: tuple[float, float] | None = None,
           iterations: int = 10, tolerance: float = 1e-4, inner_steps: int = 10, learning_rate: float = 1e-2,
           stop: float = 1e-5,
           callback: Callable[[int, int], None] | None = None) -> Inversion:
    """Invert `image` (PIL; other modes and sizes are converted with a warning) for `prompt` with `method`.

    steps / guidance / guidance_interval: the sampling settings the inversion is for (default: the pipeline's).
    iterations, tolerance: fixed-point iterations per step and the change (max abs) that ends them.
    inner_steps, learning_rate, stop: null-text's Adam steps per guided step at most, its rate, and the loss (MSE
    over the target's mean square, so latents of any scale are alike) below which a step needs none.
    callback(done, total): progress, after each step of each pass.
    """
    start = time.perf_counter()
    if method not in METHODS:
        raise InversionError(f"inversion method {method!r}; expected one of {', '.join(METHODS)}")
    check_sampler(pipe)
    steps = getattr(pipe.config, "default_steps", 50) if steps is None else steps
    guidance = getattr(pipe.config, "default_guidance_scale", 7.5) if guidance is None else guidance
    if guidance_interval is None:
        guidance_interval = tuple(pipe.config.get("default_guidance_interval", (0.0, 1.0)))
    if not masks_padding(pipe) and tuple(guidance_interval) != (0.0, 1.0):
        raise InversionError("a guidance interval needs a diffxattn pipeline; Stable Diffusion guides every step")
    height, width = image_size(pipe)
    if masks_padding(pipe):  # ours: steps, guidance and size within limits (Stable Diffusion checks its own)
        pipe.check_inputs([prompt], None, height, width, steps, guidance_scale=guidance)
    image = prepare_image(image, height, width)
    z0 = encode_image(pipe, image)
    model = _Model(pipe, prompt)
    scheduler = pipe.scheduler
    scheduler.set_timesteps(steps, device=z0.device)
    timesteps = [int(t) for t in scheduler.timesteps]  # most noisy first
    ddim_steps = [_Step(scheduler, t, steps) for t in timesteps]
    guided = [guidance > 1 and guidance_interval[0] <= i / steps < guidance_interval[1] for i in range(steps)]
    passes = 2 if method == "null-text" else 1
    done = 0

    def tick():
        nonlocal done
        done += 1
        if callback is not None:
            callback(done, steps * passes)

    # the run backwards: x_0 = the image, x_steps = the noise (null-text's pivot: without guidance)
    n_iter = 1 if method == "ddim" else iterations
    path = [z0]
    with torch.no_grad():
        for i in reversed(range(steps)):
            scale = guidance if guided[i] and method != "null-text" else 1.0
            step = ddim_steps[i]
            path.append(_solve(step, path[-1], lambda x: model.guided(x, step.t, scale), n_iter, tolerance))
            tick()
    latents = path[-1]
    nulls = None
    if method == "null-text" and any(guided):
        nulls = _null_text(model, ddim_steps, guided, guidance, path, inner_steps, learning_rate, stop, tick)
    null_mask = model.cond_mask[0].cpu() if nulls is not None else None
    return Inversion(latents=latents.cpu(), null_embeds=nulls, null_mask=null_mask, prompt=prompt, method=method,
                     steps=steps, guidance=float(guidance), guidance_interval=tuple(float(v) for v in guidance_interval), height=height, width=width,
                     fingerprint=fingerprint(pipe), seconds=time.perf_counter() - start)


def _null_text(model: _Model, ddim_steps: list[_Step], guided: list[bool], guidance: float, pivot: list,
               inner_steps: int, learning_rate: float, stop: float, tick) -> torch.Tensor:
    """Per step, the unconditional embedding with which the guided step from the current latent lands on the
    pivot's next latent (Adam on the MSE relative to the target's mean square, stopping below `stop`). Steps
    without guidance keep ""'s."""
    steps = len(ddim_steps)
    x = pivot[-1]
    null = model.cond.detach().clone()  # the prompt's: the guided step is the unguided one, on the pivot
    nulls = []
    unet = model.pipe.unet
    requires = [p.requires_grad for p in unet.parameters()]
    unet.requires_grad_(False)  # gradients for the embedding only
    try:
        for i, step in enumerate(ddim_steps):
            target = pivot[steps - 1 - i]
            scale = target.pow(2).mean().clamp_min(1e-12)
            if guided[i]:
                with torch.no_grad():
                    m_c = model(x, step.t, model.cond, model.cond_mask)
                null = null.detach().requires_grad_(True)
                optimizer = torch.optim.Adam([null], lr=learning_rate * (1 - i / (2 * steps)))
                best, best_loss = null.detach().clone(), math.inf  # Adam's steps may overshoot: keep the best
                for _ in range(inner_steps):
                    with torch.enable_grad():
                        m_u = model(x, step.t, null, model.cond_mask)
                        loss = F.mse_loss(step.forward(x, m_u + guidance * (m_c - m_u)), target) / scale
                        if loss.item() < best_loss:
                            best, best_loss = null.detach().clone(), loss.item()
                        if loss.item() < stop:
                            break
                        optimizer.zero_grad(set_to_none=True)
                        loss.backward()
                    optimizer.step()
                null = best
            with torch.no_grad():
                nulls.append(null[0] if guided[i] else model.null[0])
                x = step.forward(x, model.guided(x, step.t, guidance if guided[i] else 1.0, null,
                                                 model.cond_mask))
            tick()
    finally:
        for p, r in zip(unet.parameters(), requires):
            p.requires_grad_(r)
    return torch.stack(nulls).cpu()


def reconstruct(pipe, inversion: Inversion, **kwargs):
    """The pipeline's output (`kwargs`: more call arguments) for the inversion's prompt, sampled from it: the
    inverted image, again."""
    from .callbacks import StepCallbacks

    kwargs, callback = inversion.apply(pipe, kwargs)
    callbacks = StepCallbacks([(callback, None), (kwargs.pop("callback_on_step_end", None),
                                                  kwargs.pop("callback_on_step_end_tensor_inputs", None))])
    return pipe(inversion.prompt, **kwargs, **callbacks.kwargs())


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of two uint8 images, in dB (inf when equal)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return math.inf if mse == 0 else 10 * math.log10(255 ** 2 / mse)
