"""The one attention-control mechanism: a processor that hands attention probabilities to controllers.

Works on any pipeline whose UNet's attention layers are diffusers `Attention` modules with a processor it knows
(XAttnUNet, `UNet2DConditionModel` of Stable Diffusion and SDXL, and for capture SD3's `SD3Transformer2DModel`,
whose joint attention is read as image-to-text attention; anything else is an error naming the layer,
`check_supported`): installing swaps the `processor` of every attention layer for a
`ControlledProcessor` and hooks the scheduler, which tells the controllers when a run starts and a step
ends (`steps.StepClock`); uninstalling puts everything back (`PipelineHooks`).

For each attention call the processor builds an `AttnCall` (layer name, block, resolution, step,
heads, which batch rows are conditional) and asks each controller whether it `wants` the call:
- nobody wants it: the original (fused SDPA) processor runs, nothing else;
- controllers only `observe`: the original processor still computes the output, and the softmax
  probabilities are computed separately for the conditional rows, so capture cannot change an image
  (a controller with `observes_inputs`, the `AttentionStore`, gets the call's q and k and computes them
  itself, batched over many calls);
- a controller `edit`s: the output is the original output plus (edited - original probabilities) @ V,
  projected by to_out. An edit that changes nothing (weight 1) therefore adds exactly zero.

Controllers compose: several can be installed at once (edits run in installation order, observers
see the edited probabilities).
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..models.attention import AttentionInputs, attention_inputs, attention_probs
from .steps import SamplingRun, StepClock


@dataclass(frozen=True)
class AttnCall:
    """What a controller knows about one attention call."""

    layer: str  # module name, e.g. "up_blocks.1.attentions.0.attn2"
    block: str  # "down", "mid" or "up"
    cross: bool  # cross-attention (keys from text) or self-attention
    height: int  # query map size: height x width tokens
    width: int
    step: int  # denoising step index, 0-based (as the scheduler's step calls count it, `StepClock`)
    num_steps: int
    heads: int
    batch: int  # rows in this call (2x images under classifier-free guidance)
    cond_start: int  # rows cond_start: are the conditional (prompted) ones
    latent: tuple[int, int] = (0, 0)  # the UNet input's (height, width)

    @property
    def resolution(self) -> int:
        return self.height

    @property
    def fraction(self) -> float:
        """Progress through sampling in [0, 1): step / num_steps."""
        return self.step / max(self.num_steps, 1)


class Controller:
    """Base class: override `wants` and `observe` (capture) and/or `edit` (change probabilities).

    `on_run_start` and `on_step_end` tell a controller where sampling is: every installed controller hears
    them, whatever it `wants`.
    """

    edits = False  # True if `edit` may change probabilities (then the explicit path is taken)
    # True if the controller takes a call's attention inputs (`observe_inputs`) and computes the probabilities
    # itself, later and for many calls at once, instead of `observe` getting them per call
    observes_inputs = False

    def wants(self, call: AttnCall) -> bool:
        return False

    def edit(self, call: AttnCall, probs: torch.Tensor) -> torch.Tensor:
        """probs (batch, heads, N, S) for all rows -> edited probs of the same shape."""
        return probs

    def observe(self, call: AttnCall, probs: torch.Tensor) -> None:
        """probs (rows, heads, N, S) of the conditional rows only."""

    def observe_inputs(self, call: AttnCall, inputs: AttentionInputs, scale: float) -> None:
        """With `observes_inputs`: the call's projected inputs, all rows (the conditional ones are `call.cond_start:`;
        a key mask of one row applies to all), when no controller edits the call; otherwise `observe` is called."""

    def on_run_start(self, run: SamplingRun) -> None:
        """A pipeline call starts sampling (its scheduler's `set_timesteps`)."""

    def on_step_end(self, step: int) -> None:
        """Denoising step `step` (0-based) is complete: its last `scheduler.step` call returned."""

    def begin(self, pipe) -> None:
        """Called when installed on `pipe`."""

    def end(self) -> None:
        """Called when removed."""


def block_of(name: str) -> str:
    return "down" if name.startswith("down") else "mid" if name.startswith("mid") else "up"


class UNetCallShape:
    """Latent size and guidance layout of the current UNet call, read by a forward pre-hook."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.latent_hw, self.cfg = (1, 1), False

    def __call__(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))  # UNet / SD3 transformer
        self.latent_hw = tuple(sample.shape[-2:])
        self.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))


class ControlledProcessor:
    """Wraps a layer's original processor; routes each call through the installed controllers."""

    def __init__(self, name: str, original, hooks: PipelineHooks):
        self.name, self.original, self.hooks = name, original, hooks
        self.controllers = hooks.controllers

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        controllers = [self.hooks.exclusive] if self.hooks.exclusive else self.controllers
        joint = encoder_hidden_states is not None and getattr(attn, "add_k_proj", None) is not None
        call = self.hooks.call(self.name, attn, hidden_states, joint) if controllers else None
        active = [c for c in controllers if c.wants(call)]
        if joint and active:
            return self._joint(attn, call, active, hidden_states, encoder_hidden_states, attention_mask, **kwargs)
        attend = None if kwargs else getattr(self.original, "attend", None)  # ours: output from the inputs below
        if not active or attend is None:
            out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                                attention_mask=attention_mask, **kwargs)
            if not active:
                return out
        inputs = attention_inputs(attn, hidden_states, encoder_hidden_states, attention_mask)
        if attend is not None:
            out = attend(attn, inputs)
        editors = [c for c in active if c.edits]
        if not editors:  # observe only: probabilities of the conditional rows, output untouched
            probs = None
            for c in active:
                if c.observes_inputs:
                    c.observe_inputs(call, inputs, attn.scale)
                else:
                    probs = attention_probs(_rows(inputs, call.cond_start), attn.scale) if probs is None else probs
                    c.observe(call, probs)
            return out
        probs = attention_probs(inputs, attn.scale)
        edited = probs
        for c in editors:
            edited = c.edit(call, edited)
        for c in active:
            c.observe(call, edited[call.cond_start:])
        return out + _project_delta(attn, (edited - probs) @ inputs.v, inputs)

    def _joint(self, attn, call, active, hidden_states, encoder_hidden_states, attention_mask, **kwargs):
        """SD3's joint attention: controllers see and edit the image-to-text block of the joint probabilities
        (`joint_text_probs`); an edit changes the image tokens' output by (edited - original block) @ V_text,
        projected by to_out (the text tokens' output and the image-to-image attention stay the layer's own)."""
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **kwargs)
        editors = [c for c in active if c.edits]
        if not editors:
            rows = slice(call.cond_start, None)
            probs = joint_text_probs(attn, hidden_states[rows], encoder_hidden_states[rows])
            for c in active:
                c.observe(call, probs)
            return out
        probs = joint_text_probs(attn, hidden_states, encoder_hidden_states)
        edited = probs
        for c in editors:
            edited = c.edit(call, edited)
        for c in active:
            c.observe(call, edited[call.cond_start:])
        b, heads = probs.shape[:2]
        v = attn.add_v_proj(encoder_hidden_states).view(b, encoder_hidden_states.shape[1], heads, -1).transpose(1, 2)
        delta = _project_delta(attn, (edited - probs) @ v, None)
        return (out[0] + delta, *out[1:]) if isinstance(out, tuple) else out + delta


def joint_text_probs(attn: Attention, hidden_states: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
    """(B, heads, N, T): how much of each image token's attention goes to each text token in a joint attention
    layer (SD3's MMDiT): the image-query, text-key block of softmax(q k^T * scale) over the image and text keys
    together, with the projections and q/k norms `JointAttnProcessor2_0` uses. A row sums to the share of the
    image token's attention that goes to the text (< 1)."""
    b = hidden_states.shape[0]

    def heads(x: torch.Tensor, norm) -> torch.Tensor:
        x = x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)
        return x if norm is None else norm(x)

    q = heads(attn.to_q(hidden_states), attn.norm_q)
    k = torch.cat([heads(attn.to_k(hidden_states), attn.norm_k),
                   heads(attn.add_k_proj(context), attn.norm_added_k)], dim=2)
    return (q @ k.transpose(-1, -2) * attn.scale).softmax(-1)[..., hidden_states.shape[1]:]


def _rows(inputs: AttentionInputs, start: int) -> AttentionInputs:
    """The rows start: of q, k, v and the key mask (a mask of one row applies to all; v may be absent)."""
    mask = inputs.mask[start:] if inputs.mask is not None and inputs.mask.shape[0] > 1 else inputs.mask
    v = inputs.v[start:] if inputs.v is not None else None
    return AttentionInputs(inputs.q[start:], inputs.k[start:], v, mask, inputs.residual, inputs.shape4d)


def _project_delta(attn: Attention, delta: torch.Tensor, inputs: AttentionInputs | None) -> torch.Tensor:
    """A change of the per-head attention output (B, heads, N, d) -> the change of the layer output.

    to_out[0] is affine, so to_out(a + d) = to_out(a) + W d: the bias is not added again.
    """
    if inputs is not None and inputs.shape4d is not None:
        raise NotImplementedError("attention edits on 4D (B, C, H, W) attention inputs are not supported")
    b, h, n, d = delta.shape
    delta = F.linear(delta.transpose(1, 2).reshape(b, n, h * d), attn.to_out[0].weight)
    return delta / attn.rescale_output_factor


def denoiser(pipe):
    """The pipeline's network whose attention is controlled: its UNet, or SD3's transformer."""
    unet = getattr(pipe, "unet", None)
    return unet if unet is not None else pipe.transformer


def attention_layers(unet) -> dict[str, Attention]:
    """Every diffusers `Attention` module of a UNet, by module name."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}


class UnsupportedAttentionError(ValueError):
    """A UNet has an attention layer whose probabilities the control layer cannot compute exactly."""


# Processors that compute softmax(q k^T * scale) v from to_q/to_k/to_v as `attention_inputs` does, so the
# probabilities a controller sees are the ones the layer uses (diffusers' names; those a release lacks are skipped).
KNOWN_PROCESSORS = ("AttnProcessor", "AttnProcessor2_0", "XFormersAttnProcessor", "SlicedAttnProcessor",
                    "AttnProcessorNPU", "FusedAttnProcessor2_0")


def _known_processors() -> tuple[type, ...]:
    from diffusers.models import attention_processor

    from ..models.attention import SDPAProcessor

    return (SDPAProcessor, *(getattr(attention_processor, n) for n in KNOWN_PROCESSORS
                             if hasattr(attention_processor, n)))


def _joint_processor() -> type:
    """SD3's joint attention processor: image and text keys in one softmax (`joint_text_probs`)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    return JointAttnProcessor2_0


def check_supported(unet) -> None:
    """Raise `UnsupportedAttentionError` naming the first attention module of `unet` the control layer does not
    cover: a processor class it does not know (a subclass may compute anything), a diffusers `Attention` with
    extra key/value projections or a spatial norm, or another kind of attention module. Installing a controller
    on such a UNet would otherwise watch the wrong probabilities, or none, without a word."""
    known = _known_processors()
    supported = ", ".join(sorted({k.__name__ for k in known}))
    for name, m in unet.named_modules():
        if isinstance(m, Attention):
            processor = type(m.processor)
            if processor is _joint_processor() and getattr(m, "add_k_proj", None) is not None:
                continue  # SD3's joint attention
            if processor not in known:
                raise UnsupportedAttentionError(
                    f"attention layer {name!r} uses processor {processor.__module__}.{processor.__qualname__}, which "
                    f"diffxattn's attention control does not know; set a supported one ({supported}) first, e.g. "
                    "unet.set_attn_processor(AttnProcessor2_0())")
            extra = ("added key/value projections" if getattr(m, "add_k_proj", None) is not None
                     else "a spatial norm" if getattr(m, "spatial_norm", None) is not None else None)
            if extra:
                raise UnsupportedAttentionError(f"attention layer {name!r} (processor {processor.__name__}) has "
                                                f"{extra}, which diffxattn's attention control does not support")
        elif name and (hasattr(m, "set_processor") or isinstance(m, torch.nn.MultiheadAttention)):
            processor = type(getattr(m, "processor", None)).__name__
            raise UnsupportedAttentionError(
                f"attention module {name!r} is a {type(m).__module__}.{type(m).__qualname__} (processor "
                f"{processor}), not a diffusers Attention layer, which diffxattn's attention control does not support")


class PipelineHooks:
    """Everything installing controllers changes on one pipeline, shared by all of them and undone when the
    last one is removed: each attention layer's processor, the scheduler's `set_timesteps`/`step` (runs and
    steps, `StepClock`), `encode_prompt` (a run's prompts) and a UNet pre-hook (latent size, guidance)."""

    def __init__(self, pipe):
        check_supported(denoiser(pipe))  # before anything is changed: an error leaves the pipeline as it was
        self.pipe, self.unet = pipe, denoiser(pipe)
        self.controllers: list[Controller] = []
        self.exclusive: Controller | None = None  # set by `alone`: the one controller a UNet call reaches
        self.clock = StepClock(pipe.scheduler, self._run_started, self._step_ended)
        self.shape = UNetCallShape(pipe)
        self.prompts: list[str] | None = None  # encoded since the last run started
        self.layers = attention_layers(self.unet)
        self.originals = {name: m.processor for name, m in self.layers.items()}
        for name, m in self.layers.items():
            m.set_processor(ControlledProcessor(name, self.originals[name], self))
        self.hook = self.unet.register_forward_pre_hook(self._unet_called, with_kwargs=True)
        self._encode_prompt = pipe.__dict__.get("encode_prompt")
        pipe.encode_prompt = self._recording(pipe.encode_prompt)

    def _recording(self, encode_prompt):
        """encode_prompt that remembers the first prompt text of a call (the conditional one: both pipelines
        encode it before the negative prompt), for the run that follows."""
        @functools.wraps(encode_prompt)
        def recording(*args, **kwargs):
            prompt = args[0] if args else kwargs.get("prompt", kwargs.get("prompts"))
            if self.prompts is None and prompt is not None:
                self.prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            return encode_prompt(*args, **kwargs)
        return recording

    def _run_started(self, num_steps: int) -> None:
        run, self.prompts = SamplingRun(num_steps, self.prompts), None
        for c in list(self.controllers):
            c.on_run_start(run)

    def _step_ended(self, step: int) -> None:
        for c in list(self.controllers):
            c.on_step_end(step)

    def _unet_called(self, module, args, kwargs) -> None:
        if self.pipe.scheduler is not self.clock.scheduler:
            raise RuntimeError("pipe.scheduler was replaced while attention controllers were installed, so their "
                               "steps are unknown; set the scheduler before installing them (the `with` block)")
        self.shape(module, args, kwargs)

    def call(self, name: str, attn: Attention, hidden_states: torch.Tensor, joint: bool = False) -> AttnCall:
        """The AttnCall of layer `name` for the current UNet call; `joint`: SD3's joint attention, whose image
        queries attend to the text (a cross-attention call for the controllers)."""
        batch = hidden_states.shape[0]
        n = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        lh, lw = self.shape.latent_hw
        factor = max(1, round((lh * lw / n) ** 0.5))  # how much this layer is down-sampled
        step = min(self.clock.step, self.clock.num_steps - 1)  # a UNet call after the last step stays in the run
        return AttnCall(layer=name, block=block_of(name), cross=attn.is_cross_attention or joint, height=lh // factor,
                        width=lw // factor, step=step,
                        num_steps=self.clock.num_steps, heads=attn.heads, batch=batch,
                        cond_start=batch // 2 if self.shape.cfg and not self.exclusive else 0, latent=(lh, lw))

    def restore(self) -> None:
        self.hook.remove()
        self.clock.restore()
        if self._encode_prompt is None:
            self.pipe.__dict__.pop("encode_prompt", None)
        else:
            self.pipe.encode_prompt = self._encode_prompt
        for name, m in self.layers.items():
            m.set_processor(self.originals[name])


_INSTALLED: dict[int, PipelineHooks] = {}  # id(unet) -> its hooks, while any controller is active


def install(pipe, controller: Controller) -> None:
    """Add `controller` to the attention layers of `pipe`'s UNet (hooking the pipeline on the first one)."""
    key = id(denoiser(pipe))
    if key not in _INSTALLED:
        _INSTALLED[key] = PipelineHooks(pipe)
    _INSTALLED[key].controllers.append(controller)
    controller.begin(pipe)


def uninstall(pipe, controller: Controller) -> None:
    """Remove `controller`; when it was the last one, the pipeline gets its original processors and methods back."""
    key = id(denoiser(pipe))
    hooks = _INSTALLED.get(key)
    if hooks is None or controller not in hooks.controllers:
        return
    hooks.controllers.remove(controller)
    controller.end()
    if not hooks.controllers:
        hooks.restore()
        del _INSTALLED[key]


def controlled(unet) -> bool:
    """Whether any controller is installed on `unet` (its processors and hooks replaced)."""
    return id(unet) in _INSTALLED


def step_clock(pipe) -> StepClock:
    """The run and step counter of `pipe`, for a controller that also hooks other modules (e.g. ResBlocks);
    valid from the controller's `begin` until its `end`."""
    return _INSTALLED[id(denoiser(pipe))].clock


@contextlib.contextmanager
def alone(pipe, controller: Controller):
    """UNet calls inside reach `controller` alone, and all their rows are conditional: for a controller's own extra
    UNet calls (attention guidance's gradient pass), which other controllers (a store, an edit) must not see."""
    hooks = _INSTALLED[id(denoiser(pipe))]
    hooks.exclusive = controller
    try:
        yield
    finally:
        hooks.exclusive = None


class ControllerContext(Controller):
    """A controller usable as `with Controller(pipe, ...) as c:`; restores processors on exit, also on errors."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self):
        install(self.pipe, self)
        return self

    def __exit__(self, *exc) -> None:
        uninstall(self.pipe, self)
