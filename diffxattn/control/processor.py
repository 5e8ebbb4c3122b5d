"""The one attention-control mechanism: a processor that hands attention probabilities to controllers.

Works on any UNet whose attention layers are diffusers `Attention` modules (XAttnUNet and
`UNet2DConditionModel`): installing swaps the `processor` of every attention layer for a
`ControlledProcessor`, and uninstalling puts the original processors back.

For each attention call the processor builds an `AttnCall` (layer name, block, resolution, step,
heads, which batch rows are conditional) and asks each controller whether it `wants` the call:
- nobody wants it: the original (fused SDPA) processor runs, nothing else;
- controllers only `observe`: the original processor still computes the output, and the softmax
  probabilities are computed separately for the conditional rows, so capture cannot change an image;
- a controller `edit`s: the output is the original output plus (edited - original probabilities) @ V,
  projected by to_out. An edit that changes nothing (weight 1) therefore adds exactly zero.

Controllers compose: several can be installed at once (edits run in installation order, observers
see the edited probabilities).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention

from ..models.attention import AttentionInputs, attention_inputs, attention_probs


@dataclass(frozen=True)
class AttnCall:
    """What a controller knows about one attention call."""

    layer: str  # module name, e.g. "up_blocks.1.attentions.0.attn2"
    block: str  # "down", "mid" or "up"
    cross: bool  # cross-attention (keys from text) or self-attention
    height: int  # query map size: height x width tokens
    width: int
    step: int  # denoising step index, 0-based
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
    """Base class: override `wants` and `observe` (capture) and/or `edit` (change probabilities)."""

    edits = False  # True if `edit` may change probabilities (then the explicit path is taken)

    def wants(self, call: AttnCall) -> bool:
        return False

    def edit(self, call: AttnCall, probs: torch.Tensor) -> torch.Tensor:
        """probs (batch, heads, N, S) for all rows -> edited probs of the same shape."""
        return probs

    def observe(self, call: AttnCall, probs: torch.Tensor) -> None:
        """probs (rows, heads, N, S) of the conditional rows only."""

    def begin(self, pipe) -> None:
        """Called when installed on `pipe`."""

    def end(self) -> None:
        """Called when removed."""


def block_of(name: str) -> str:
    return "down" if name.startswith("down") else "mid" if name.startswith("mid") else "up"


class SamplingState:
    """Step index, latent size and guidance layout of the current UNet call, read by a forward pre-hook."""

    def __init__(self, pipe):
        self.pipe = pipe
        self.step, self.num_steps, self.latent_hw, self.cfg = 0, 1, (1, 1), False

    def __call__(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs["sample"]
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        self.latent_hw = tuple(sample.shape[-2:])
        timesteps = getattr(self.pipe.scheduler, "timesteps", None)
        if timesteps is not None and len(timesteps):
            t = torch.as_tensor(t).reshape(-1)[0].to(timesteps.device, timesteps.dtype)
            self.step = int((timesteps - t).abs().argmin())  # Heun calls the UNet twice per step: same index
            self.num_steps = len(timesteps) // getattr(self.pipe.scheduler, "order", 1)
            self.step = min(self.step // getattr(self.pipe.scheduler, "order", 1), self.num_steps - 1)
        self.cfg = bool(getattr(self.pipe, "do_classifier_free_guidance", False))

    @property
    def fraction(self) -> float:
        return self.step / max(self.num_steps, 1)

    def call(self, name: str, attn: Attention, hidden_states: torch.Tensor) -> AttnCall:
        batch = hidden_states.shape[0]
        n = hidden_states.shape[1] if hidden_states.ndim == 3 else hidden_states.shape[2] * hidden_states.shape[3]
        heads = attn.heads
        lh, lw = self.latent_hw
        factor = max(1, round((lh * lw / n) ** 0.5))  # how much this layer is down-sampled
        return AttnCall(layer=name, block=block_of(name), cross=attn.is_cross_attention, height=lh // factor,
                        width=lw // factor, step=self.step, num_steps=self.num_steps, heads=heads, batch=batch,
                        cond_start=batch // 2 if self.cfg else 0, latent=(lh, lw))


class ControlledProcessor:
    """Wraps a layer's original processor; routes each call through the installed controllers."""

    def __init__(self, name: str, original, controllers: list[Controller], state: SamplingState):
        self.name, self.original, self.controllers, self.state = name, original, controllers, state

    def __call__(self, attn: Attention, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        out = self.original(attn, hidden_states, encoder_hidden_states=encoder_hidden_states,
                            attention_mask=attention_mask, **kwargs)
        if not self.controllers:
            return out
        call = self.state.call(self.name, attn, hidden_states)
        active = [c for c in self.controllers if c.wants(call)]
        if not active:
            return out
        inputs = attention_inputs(attn, hidden_states, encoder_hidden_states, attention_mask)
        editors = [c for c in active if c.edits]
        if not editors:  # observe only: probabilities of the conditional rows, output untouched
            probs = attention_probs(_rows(inputs, call.cond_start), attn.scale)
            for c in active:
                c.observe(call, probs)
            return out
        probs = attention_probs(inputs, attn.scale)
        edited = probs
        for c in editors:
            edited = c.edit(call, edited)
        for c in active:
            c.observe(call, edited[call.cond_start:])
        return out + _project_delta(attn, (edited - probs) @ inputs.v, inputs)


def _rows(inputs: AttentionInputs, start: int) -> AttentionInputs:
    mask = inputs.mask[start:] if inputs.mask is not None and inputs.mask.shape[0] > 1 else inputs.mask
    return AttentionInputs(inputs.q[start:], inputs.k[start:], inputs.v[start:], mask, inputs.residual, inputs.shape4d)


def _project_delta(attn: Attention, delta: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    """A change of the per-head attention output (B, heads, N, d) -> the change of the layer output.

    to_out[0] is affine, so to_out(a + d) = to_out(a) + W d: the bias is not added again.
    """
    if inputs.shape4d is not None:
        raise NotImplementedError("attention edits on 4D (B, C, H, W) attention inputs are not supported")
    b, h, n, d = delta.shape
    delta = F.linear(delta.transpose(1, 2).reshape(b, n, h * d), attn.to_out[0].weight)
    return delta / attn.rescale_output_factor


def attention_layers(unet) -> dict[str, Attention]:
    """Every diffusers `Attention` module of a UNet, by module name."""
    return {name: m for name, m in unet.named_modules() if isinstance(m, Attention)}


class Installed:
    """Bookkeeping of one UNet's controlled processors (shared by all controllers installed on it)."""

    def __init__(self, pipe):
        self.unet = pipe.unet
        self.controllers: list[Controller] = []
        self.state = SamplingState(pipe)
        self.originals = {name: m.processor for name, m in attention_layers(self.unet).items()}
        for name, m in attention_layers(self.unet).items():
            m.set_processor(ControlledProcessor(name, self.originals[name], self.controllers, self.state))
        self.hook = self.unet.register_forward_pre_hook(self.state, with_kwargs=True)

    def restore(self) -> None:
        self.hook.remove()
        for name, m in attention_layers(self.unet).items():
            m.set_processor(self.originals[name])


_INSTALLED: dict[int, Installed] = {}  # id(unet) -> its installation, while any controller is active


def install(pipe, controller: Controller) -> None:
    """Add `controller` to `pipe.unet`'s attention layers (swapping processors on the first one)."""
    key = id(pipe.unet)
    if key not in _INSTALLED:
        _INSTALLED[key] = Installed(pipe)
    _INSTALLED[key].controllers.append(controller)
    controller.begin(pipe)


def uninstall(pipe, controller: Controller) -> None:
    """Remove `controller`; when it was the last one, every layer gets its original processor back."""
    key = id(pipe.unet)
    inst = _INSTALLED.get(key)
    if inst is None or controller not in inst.controllers:
        return
    inst.controllers.remove(controller)
    controller.end()
    if not inst.controllers:
        inst.restore()
        del _INSTALLED[key]


def sampling_state(pipe) -> SamplingState:
    """The step counter shared by the controllers installed on `pipe.unet`, for a controller that also hooks
    other modules (e.g. ResBlocks); valid from the controller's `begin` until its `end`."""
    return _INSTALLED[id(pipe.unet)].state


class ControllerContext(Controller):
    """A controller usable as `with Controller(pipe, ...) as c:`; restores processors on exit, also on errors."""

    def __init__(self, pipe):
        self.pipe = pipe

    def __enter__(self):
        install(self.pipe, self)
        return self

    def __exit__(self, *exc) -> None:
        uninstall(self.pipe, self)
