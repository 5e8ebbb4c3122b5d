"""Attention for XAttnUNet: diffusers' `Attention` module (it owns to_q/to_k/to_v/to_out) plus our processor.

The module/processor split is the seam the whole project hangs on: `diffxattn.control` swaps the
processor of selected layers to watch or edit attention probabilities, on this UNet and on diffusers'
`UNet2DConditionModel` alike, without touching model code.
"""

from __future__ import annotations

import functools
import math
import weakref
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from diffusers.models.attention_processor import Attention
from torch import nn


@dataclass
class AttentionInputs:
    """Projected, head-split attention operands. q: (B, heads, N, d); k, v: (B, heads, S, d)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    mask: torch.Tensor | None  # bool (B, 1, 1, S) True = attend, or additive float bias broadcastable
    residual: torch.Tensor
    shape4d: tuple[int, int, int, int] | None  # (B, C, H, W) when the input came in as a feature map


def key_mask(attention_mask: torch.Tensor | None, batch: int) -> torch.Tensor | None:
    """Normalise a key mask to something SDPA broadcasts over (B, heads, N, S).

    Accepted: bool/int (B, S) with 1 = keep (what XAttnUNet passes), or diffusers' additive float bias
    (B, 1, S) / (B, S) that `UNet2DConditionModel` builds from `encoder_attention_mask`.
    """
    if attention_mask is None:
        return None
    mask = attention_mask
    if mask.dtype in (torch.int32, torch.int64, torch.uint8):
        mask = mask.bool()
    if mask.shape[0] != batch:  # diffusers may have repeated it per head: (B*heads, 1, S)
        mask = mask[:: mask.shape[0] // batch]
    return mask.reshape(batch, 1, 1, mask.shape[-1])


def attention_inputs(
    attn: Attention,
    hidden_states: torch.Tensor,
    encoder_hidden_states: torch.Tensor | None = None,
    attention_mask: torch.Tensor | None = None,
) -> AttentionInputs:
    """Everything diffusers' AttnProcessor2_0 does before the softmax, shared by all our processors."""
    residual = hidden_states
    shape4d = None
    if hidden_states.ndim == 4:  # (B, C, H, W) -> (B, HW, C)
        shape4d = tuple(hidden_states.shape)
        b, c, h, w = shape4d
        hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
    context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
    if encoder_hidden_states is not None and attn.norm_cross:
        context = attn.norm_encoder_hidden_states(context)

    batch = hidden_states.shape[0]

    def heads(x: torch.Tensor) -> torch.Tensor:  # (B, T, heads*d) -> (B, heads, T, d)
        return x.view(batch, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

    q = heads(attn.to_q(hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    k, v = text_keys_values(attn, encoder_hidden_states, lambda: _keys_values(attn, context, heads))
    return AttentionInputs(q, k, v, key_mask(attention_mask, batch), residual, shape4d)


def _keys_values(attn: Attention, context: torch.Tensor, heads) -> tuple[torch.Tensor, torch.Tensor]:
    k, v = heads(attn.to_k(context)), heads(attn.to_v(context))
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    return k, v


def _kv_key(attn: Attention, text: torch.Tensor) -> tuple:
    """What the text's keys and values depend on: the text tensor (same object, unmodified) and the weights of
    every module between it and them (each parameter object and its in-place version: an optimizer step or
    `load_state_dict` bumps it)."""
    modules = (attn.to_k, attn.to_v, attn.norm_k, attn.norm_cross if attn.norm_cross else None)
    params = [p for m in modules if m is not None for p in m.parameters()]
    return (text._version, tuple((id(p), p._version) for p in params))


def text_keys_values(attn: Attention, text: torch.Tensor | None, compute) -> tuple[torch.Tensor, torch.Tensor]:
    """Cross-attention keys and values of `text`, computed once per sampling run instead of at every step.

    The pipeline passes the same text tensor to every UNet call of a run, so each layer keeps the keys and values
    of the last text it saw (a weak reference to the tensor, its version and its weights' versions) and reuses
    them while all are unchanged. Only without autograd (training needs the graph) and outside torch.compile;
    self-attention (no text) and inference-mode tensors (no version counter) compute them every time. The cached
    tensors are the ones `compute()` returned, so images are bit-identical with and without the cache.
    """
    if torch.compiler.is_compiling() or text is None or torch.is_grad_enabled() or text.is_inference():
        return compute()
    key = _kv_key(attn, text)
    cached = _TEXT_KV.get(attn)
    if cached is not None and cached[0]() is text and cached[1] == key:
        return cached[2]
    kv = compute()
    _TEXT_KV[attn] = (weakref.ref(text), key, kv)
    return kv


# layer -> (weak reference to the text, _kv_key, (k, v)); outside the modules, so they stay picklable
_TEXT_KV: "weakref.WeakKeyDictionary[Attention, tuple]" = weakref.WeakKeyDictionary()


def attention_output(attn: Attention, out: torch.Tensor, inputs: AttentionInputs) -> torch.Tensor:
    """Merge heads, project out, and undo what `attention_inputs` did to the layout."""
    b, h, n, d = out.shape
    out = out.transpose(1, 2).reshape(b, n, h * d)  # (B, N, heads*d)
    out = attn.to_out[1](attn.to_out[0](out))
    if inputs.shape4d is not None:
        out = out.transpose(1, 2).reshape(inputs.shape4d)
    if attn.residual_connection:
        out = out + inputs.residual
    return out / attn.rescale_output_factor


def attention_probs(inputs: AttentionInputs, scale: float) -> torch.Tensor:
    """Explicit softmax(QK^T * scale) with the key mask applied: (B, heads, N, S).

    Masked keys get exactly zero probability (the bias is -inf, so exp() underflows to 0). One fused
    scale-multiply-add (`baddbmm`) and the softmax: this runs in every observed layer at every step.
    """
    b, h, n, d = inputs.q.shape
    s = inputs.k.shape[2]
    mask = inputs.mask
    if mask is None:
        bias = inputs.q.new_zeros(())
    elif mask.dtype == torch.bool:
        bias = inputs.q.new_zeros(()).masked_fill(~mask, float("-inf"))
    else:
        bias = mask.to(inputs.q.dtype)
    bias = bias.expand(b, h, bias.shape[-2] if bias.ndim == 4 else 1, s).reshape(b * h, -1, s)
    scores = torch.baddbmm(bias, inputs.q.reshape(b * h, n, d), inputs.k.reshape(b * h, s, d).transpose(1, 2),
                           alpha=scale)
    return scores.softmax(dim=-1).view(b, h, n, s)


class SDPAProcessor:
    """Default processor: PyTorch scaled-dot-product attention (fused, no explicit probabilities).

    diffusers' `AttnProcessor2_0` does the same; its `AttnProcessor` is the explicit-softmax one.
    """

    def __call__(
        self,
        attn: Attention,
        hidden_states: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        temb: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.attend(attn, attention_inputs(attn, hidden_states, encoder_hidden_states, attention_mask))

    @staticmethod
    def attend(attn: Attention, inputs: AttentionInputs) -> torch.Tensor:
        """The layer output from projected inputs (attention controllers reuse the inputs they computed)."""
        out = F.scaled_dot_product_attention(inputs.q, inputs.k, inputs.v, attn_mask=inputs.mask, scale=attn.scale)
        return attention_output(attn, out, inputs)


AttnProcessor = SDPAProcessor  # the old name (before #20), easily mistaken for diffusers' explicit-softmax one


class LeanAttention(Attention):
    """diffusers' `Attention` whose forward calls its processor directly. diffusers' forward inspects the
    processor's signature at every call to filter keyword arguments (about 60 us, 3% of a sampling step of the
    shipped UNet); module hooks still run, as `__call__` is unchanged."""

    def forward(self, hidden_states, encoder_hidden_states=None, attention_mask=None, **kwargs):
        return self.processor(self, hidden_states, encoder_hidden_states=encoder_hidden_states,
                              attention_mask=attention_mask, **kwargs)


def make_attention(query_dim: int, heads: int, cross_attention_dim: int | None = None) -> Attention:
    """A diffusers `Attention` (to_q from image tokens, to_k/to_v from `cross_attention_dim`) with our processor."""
    return LeanAttention(
        query_dim,
        cross_attention_dim=cross_attention_dim,
        heads=heads,
        dim_head=query_dim // heads,
        bias=False,
        processor=SDPAProcessor(),
    )


@functools.lru_cache(maxsize=64)
def sincos_2d(height: int, width: int, dim: int, device=None, dtype=None) -> torch.Tensor:
    """Fixed 2D sine/cosine position embedding (HW, dim): half the channels encode y, half x.

    Cached per (size, dim, device, dtype): it is a constant, and recomputing it took ~8% of sampling time.
    """
    quarter = dim // 4
    freqs = torch.exp(-math.log(10000.0) * torch.arange(quarter, device=device) / max(quarter, 1))
    ys = torch.arange(height, device=device).float()[:, None] * freqs  # (H, dim/4)
    xs = torch.arange(width, device=device).float()[:, None] * freqs  # (W, dim/4)
    ey = torch.cat([ys.sin(), ys.cos()], dim=1)[:, None, :].expand(height, width, 2 * quarter)
    ex = torch.cat([xs.sin(), xs.cos()], dim=1)[None, :, :].expand(height, width, 2 * quarter)
    emb = torch.cat([ey, ex], dim=-1).reshape(height * width, 4 * quarter)
    emb = F.pad(emb, (0, dim - 4 * quarter))
    return emb.to(dtype) if dtype is not None else emb


class TransformerBlock(nn.Module):
    """Image tokens attend to themselves (optional, `attn1`) and to the text (`attn2`), then an MLP.

    Queries get a fixed 2D position embedding: without it a query cannot tell *where* it is, and
    position words ("at the left") were learned late or not at all in the prototype.
    With `gated=True` the cross-attention residual is scaled by tanh(gate), gate initialised to 0, so a
    fresh block is exactly the identity on its input (Flamingo's gated cross-attention).
    """

    def __init__(
        self,
        dim: int,
        heads: int,
        cross_attention_dim: int | None,
        self_attention: bool,
        gated: bool = False,
        query_pos_embed: bool = True,
        ff_mult: int = 2,
    ):
        super().__init__()
        self.query_pos_embed = query_pos_embed
        self.norm1 = nn.LayerNorm(dim) if self_attention else None
        self.attn1 = make_attention(dim, heads) if self_attention else None
        self.norm2 = nn.LayerNorm(dim) if cross_attention_dim else None
        self.attn2 = make_attention(dim, heads, cross_attention_dim) if cross_attention_dim else None
        self.gate = nn.Parameter(torch.zeros(1)) if (gated and cross_attention_dim) else None
        self.norm3 = nn.LayerNorm(dim)
        self.ff = nn.Sequential(nn.Linear(dim, ff_mult * dim), nn.GELU(), nn.Linear(ff_mult * dim, dim))

    def forward(
        self,
        h: torch.Tensor,
        encoder_hidden_states: torch.Tensor | None = None,
        encoder_attention_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        b, c, height, width = h.shape
        x = h.flatten(2).transpose(1, 2)  # (B, HW, C)
        if not self.query_pos_embed:
            pos = 0.0
        elif torch.compiler.is_compiling():  # a constant of the compiled graph (the lru_cache would break it)
            pos = sincos_2d.__wrapped__(height, width, c, x.device, x.dtype)
        else:
            pos = sincos_2d(height, width, c, x.device, x.dtype)
        if self.attn1 is not None:
            x = x + self.attn1(self.norm1(x) + pos)
        if self.attn2 is not None:
            xa = self.attn2(self.norm2(x) + pos, encoder_hidden_states, attention_mask=encoder_attention_mask)
            x = x + (torch.tanh(self.gate) * xa if self.gate is not None else xa)
        x = x + self.ff(self.norm3(x))
        return x.transpose(1, 2).reshape(b, c, height, width)
