"""AttentionStore: capture cross-attention while sampling and read it back per token or per word.

    with AttentionStore(pipe, resolutions=(16, 8), steps=StepRange.fraction(0, 1)) as store:
        image = pipe("a red circle left of a blue square").images[0]
    maps = store.word_maps()   # {"red": (H, W) tensor, "circle": ..., ...}

Maps are summed while sampling (per resolution; optionally per step bin and per layer), so memory does
not grow with the number of steps. Only the conditional half of a guidance batch is captured. Each
pipeline call inside the `with` block is a new run: it clears the maps and records that call's prompts.

The store takes each observed layer's queries and keys and computes their probabilities in batches: all
the calls of up to `BATCHED_STEPS` steps of one step bin at a time (and at most `BATCHED_BYTES` of queries:
a Stable Diffusion layer's are megabytes), one softmax per resolution, when the bin ends or the maps are
read. At this model size one small softmax per layer and step costs more in dispatch than in arithmetic;
batched, capture costs a few percent of a plain run.
"""

from __future__ import annotations

from collections import defaultdict

import torch
import torch.nn.functional as F

from ..conditioning import TokenizedPrompt, prompt_tokens
from ..models.attention import AttentionInputs, attention_probs
from .processor import AttnCall, ControllerContext, _rows
from .steps import SamplingRun, StepRange

NORMALIZATIONS = ("none", "minmax", "share")
BATCHED_STEPS = 4  # at most this many steps' queries wait for their probabilities: memory stays constant in steps
BATCHED_BYTES = 64 << 20  # and at most this many bytes of them


def _flushed(name: str) -> property:
    """A captured-maps dict, read after the waiting queries are turned into probabilities and summed."""
    return property(lambda self: (self.flush(), getattr(self, name))[1])


class AttentionStore(ControllerContext):
    """Aggregated cross-attention probabilities of selected layers and steps.

    resolutions: query-map heights to keep (e.g. (16, 8)); None = all.
    layers: keep layers whose name contains any of these strings; None = all.
    blocks: subset of ("down", "mid", "up"); None = all.
    steps: the steps to keep, a `StepRange` (or what `StepRange.of` reads: "0:10", (0, 1.0), ...).
    heads: "mean" (average heads while capturing) or "each" (keep every head).
    step_bins: number of step bins kept for per-step views (the viewer's slider); 0 = none.
    per_layer: also keep one map per layer (summed over steps).
    """

    observes_inputs = True
    sums = _flushed("_sums")  # (h, w) -> (rows, heads|1, h*w, S)
    counts = _flushed("_counts")
    bin_sums = _flushed("_bin_sums")  # (bin, (h, w)) -> (rows, h*w, S)
    bin_counts = _flushed("_bin_counts")
    layer_sums = _flushed("_layer_sums")  # layer -> (rows, h*w, S)
    layer_counts = _flushed("_layer_counts")

    def __init__(self, pipe, *, resolutions=None, layers=None, blocks=None, steps=StepRange.fraction(0, 1),
                 heads: str = "mean", step_bins: int = 10, per_layer: bool = False):
        super().__init__(pipe)
        if heads not in ("mean", "each"):
            raise ValueError(f"heads={heads!r}; expected 'mean' or 'each'")
        if blocks is not None and not set(blocks) <= {"down", "mid", "up"}:
            raise ValueError(f"blocks={tuple(blocks)!r}; expected a subset of ('down', 'mid', 'up')")
        self.resolutions = None if resolutions is None else set(resolutions)
        self.layers, self.blocks, self.steps, self.heads = layers, blocks, StepRange.of(steps), heads
        self.step_bins, self.per_layer = step_bins, per_layer
        self.prompts: list[str] | None = None
        self.reset()

    # -- capture --
    def reset(self) -> None:
        self._sums: dict[tuple[int, int], torch.Tensor] = {}
        self._counts: dict[tuple[int, int], int] = defaultdict(int)
        self._bin_sums: dict[tuple[int, tuple[int, int]], torch.Tensor] = {}
        self._bin_counts: dict[tuple[int, tuple[int, int]], int] = defaultdict(int)
        self._layer_sums: dict[str, torch.Tensor] = {}
        self._layer_counts: dict[str, int] = defaultdict(int)
        self.layer_hw: dict[str, tuple[int, int]] = {}
        self._waiting: list[tuple[AttnCall, AttentionInputs, float]] = []  # one step bin's, see observe_inputs
        self._waiting_bin = self._waiting_bytes = 0
        self.steps_seen: set[int] = set()
        self.num_steps = 0

    def on_run_start(self, run: SamplingRun) -> None:
        self.reset()
        self.prompts, self.num_steps = run.prompts, run.num_steps

    def wants(self, call: AttnCall) -> bool:
        return (call.cross
                and (self.resolutions is None or call.height in self.resolutions)
                and (self.blocks is None or call.block in self.blocks)
                and (self.layers is None or any(s in call.layer for s in self.layers))
                and self.steps.contains(call.step, call.num_steps))

    def _bin(self, call: AttnCall) -> int:
        return (call.step * self.step_bins) // max(call.num_steps, 1)

    def observe_inputs(self, call: AttnCall, inputs: AttentionInputs, scale: float) -> None:
        """Keep the call's queries and keys until its step bin ends (or `BATCHED_STEPS` steps or `BATCHED_BYTES`
        wait). Only q, k and the mask are kept (q and k whole: the layer computed them for all rows)."""
        step_bin = self._bin(call)
        size = inputs.q.untyped_storage().nbytes() + inputs.k.untyped_storage().nbytes()
        if self._waiting and (step_bin != self._waiting_bin or self._waiting_bytes + size > BATCHED_BYTES
                              or not 0 <= call.step - self._waiting[0][0].step < BATCHED_STEPS):
            self.flush()
        self._waiting_bin = step_bin
        self._waiting_bytes += size
        self._seen(call)
        self._waiting.append((call, AttentionInputs(inputs.q, inputs.k, None, inputs.mask, None, None), scale))

    def _seen(self, call: AttnCall) -> None:
        self._latent = call.latent
        self.steps_seen.add(call.step)
        if self.per_layer:
            self.layer_hw.setdefault(call.layer, (call.height, call.width))  # layers in the order they run

    def flush(self) -> None:
        """Turn the waiting queries into probabilities, one batched softmax per resolution, and add them up."""
        waiting, self._waiting, self._waiting_bytes = self._waiting, [], 0
        if not waiting:
            return
        groups = defaultdict(list)  # calls whose operands stack: same resolution, shapes, scale and mask layout
        for call, inputs, scale in waiting:
            mask = inputs.mask
            groups[(call.height, call.cond_start, scale, inputs.q.shape, inputs.k.shape, inputs.q.dtype,
                    None if mask is None else (mask.dtype, mask.shape))].append((call, inputs))
        with torch.no_grad():
            for (_, start, scale, *_), entries in groups.items():
                parts = [_rows(i, start) for _, i in entries]
                q = torch.cat([p.q for p in parts])
                rows = q.shape[0] // len(entries)
                masks = [p.mask.expand(rows, *p.mask.shape[1:]) for p in parts if p.mask is not None]
                both = AttentionInputs(q, torch.cat([p.k for p in parts]), None, torch.cat(masks) if masks else None,
                                       None, None)
                probs = _probs(both, scale).float()
                self._add([c for c, _ in entries], probs.view(len(entries), rows, *probs.shape[1:]),
                          both.k.shape[2])
        if self.per_layer:  # computed by resolution; kept in the order the layers run
            self._layer_sums = {n: self._layer_sums[n] for n in self.layer_hw if n in self._layer_sums}

    def observe(self, call: AttnCall, probs: torch.Tensor) -> None:
        """Probabilities as a controller edited them (or SD3's joint attention), one call at a time."""
        self._seen(call)
        self._add([call], probs.detach().float()[None], probs.shape[-1])

    def _add(self, calls: list[AttnCall], probs: torch.Tensor, keys: int) -> None:
        """Sum probs (calls, rows, heads, N, keys or fewer: the rest are 0) of calls at one resolution and in one
        step bin into the maps."""
        key, n = (calls[0].height, calls[0].width), len(calls)
        mean_heads = probs.mean(2)  # (calls, rows, N, S)
        total = mean_heads.sum(0)
        _accumulate(self._sums, key, total[:, None] if self.heads == "mean" else probs.sum(0), keys)
        self._counts[key] += n
        if self.step_bins:
            k = (self._bin(calls[0]), key)
            _accumulate(self._bin_sums, k, total, keys)
            self._bin_counts[k] += n
        if self.per_layer:
            for call, maps in zip(calls, mean_heads):
                _accumulate(self._layer_sums, call.layer, maps, keys)
                self._layer_counts[call.layer] += 1

    def nbytes(self) -> int:
        """Memory held by the captured maps."""
        tensors = [*self.sums.values(), *self.bin_sums.values(), *self.layer_sums.values()]
        return sum(t.numel() * t.element_size() for t in tensors)

    # -- read back --
    @property
    def image_size(self) -> tuple[int, int]:
        """(H, W) of the generated image: the UNet input size times the VAE factor (1 in pixel space)."""
        if not self.sums:
            raise ValueError("the store holds no attention maps: run the pipeline inside the `with` block, and "
                             f"check the selection (resolutions={self.resolutions}, steps={self.steps})")
        f = getattr(self.pipe, "vae_scale_factor", 1)
        return self._latent[0] * f, self._latent[1] * f

    def _upsample(self, maps: torch.Tensor, hw: tuple[int, int], size: tuple[int, int]) -> torch.Tensor:
        """(..., h*w, S) -> (..., S, H, W) bilinearly upsampled to the image size."""
        *lead, n, s = maps.shape
        x = maps.reshape(-1, hw[0], hw[1], s).permute(0, 3, 1, 2)  # (B, S, h, w)
        x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
        return x.reshape(*lead, s, *size)

    def _combine(self, sums: dict, counts: dict, index: int, size) -> torch.Tensor:
        """Average over layers per resolution, upsample, then average the resolutions: (S, H, W)."""
        per_res = [self._upsample(sums[k][index] / counts[k], k, size) for k in sorted(sums, reverse=True)]
        return torch.stack(per_res).mean(0)

    def token_maps(self, index: int = 0, size: tuple[int, int] | None = None, head: int | None = None,
                   resolution: int | None = None) -> torch.Tensor:
        """Per-token maps (S, H, W) of image `index`, upsampled to the image size (or `size`); `resolution`:
        only the layers whose query map is that many rows high (e.g. 16), instead of every captured one."""
        size = size or self.image_size
        if resolution is not None and resolution not in self.captured_resolutions:
            raise ValueError(f"resolution={resolution} was not captured; captured: {self.captured_resolutions}")
        sums = {k: (v[:, head] if head is not None else v.mean(1)) for k, v in self.sums.items()
                if resolution is None or k[0] == resolution}
        return self._combine(sums, self.counts, index, size)

    @property
    def captured_resolutions(self) -> list[int]:
        """Heights of the query maps captured so far, highest first (e.g. [16, 8])."""
        return sorted({h for h, _ in self.sums}, reverse=True)

    def step_token_maps(self, index: int = 0, size: tuple[int, int] | None = None) -> torch.Tensor:
        """Per step bin, per-token maps (bins, S, H, W); bins without captured steps are zero."""
        size = size or self.image_size
        out = []
        for b in range(self.step_bins):
            keys = {k[1]: v for k, v in self.bin_sums.items() if k[0] == b}
            if keys:
                counts = {k[1]: c for k, c in self.bin_counts.items() if k[0] == b}
                out.append(self._combine(keys, counts, index, size))
        if not out:
            raise ValueError("no per-step maps were kept (step_bins=0 or no steps captured)")
        return torch.stack(out)

    def layer_token_maps(self, index: int = 0, size: tuple[int, int] | None = None) -> tuple[list[str], torch.Tensor]:
        """(layer names, per-layer per-token maps (L, S, H, W)); needs per_layer=True."""
        if not self.layer_sums:
            raise ValueError("per-layer maps were not kept: create the store with per_layer=True")
        size = size or self.image_size
        names = list(self.layer_sums)
        maps = [self._upsample(self.layer_sums[n][index] / self.layer_counts[n], self.layer_hw[n], size) for n in names]
        return names, torch.stack(maps)

    def words(self, index: int = 0, prompt: str | TokenizedPrompt | None = None) -> list[tuple[str, list[int]]]:
        """(word, token positions) for the prompt of image `index` (or `prompt`); BOS/EOS/padding and words cut
        off by the encoder's length excluded."""
        prompt = prompt if prompt is not None else self._prompt(index)
        return prompt_tokens(self.pipe, prompt).words

    def _prompt(self, index: int) -> str:
        if not self.prompts:
            raise ValueError("the store does not know the prompt; pass prompt=...")
        per_prompt = max(1, self._rows() // len(self.prompts))
        return self.prompts[min(index // per_prompt, len(self.prompts) - 1)]

    def _rows(self) -> int:
        return next(iter(self.sums.values())).shape[0]

    def word_maps(self, index: int = 0, prompt: str | TokenizedPrompt | None = None, normalize: str = "none",
                  size: tuple[int, int] | None = None, resolution: int | None = None) -> dict[str, torch.Tensor]:
        """{word: (H, W)} for image `index`; a word of several tokens is the mean of its tokens' maps.

        A repeated word is keyed "word", "word#2", ...; normalize: "none", "minmax" (per word to [0, 1])
        or "share" (each pixel's attention split across the prompt's words); resolution: as in `token_maps`.
        """
        tokens = self.token_maps(index, size, resolution=resolution)
        return words_to_maps(self.words(index, prompt), tokens, normalize)

    def word_map(self, word: str, occurrence: int = 1, index: int = 0, **kw) -> torch.Tensor:
        """The map of the `occurrence`-th (1-based) appearance of `word`."""
        key = word if occurrence == 1 else f"{word}#{occurrence}"
        maps = self.word_maps(index, **kw)
        if key not in maps:
            raise KeyError(f"{word!r} (occurrence {occurrence}) is not in the prompt's words: {list(maps)}")
        return maps[key]


def word_keys(words: list[str]) -> list[str]:
    """Unique keys for the words of a prompt: repeated words get '#2', '#3', ..."""
    seen: dict[str, int] = defaultdict(int)
    keys = []
    for w in words:
        seen[w] += 1
        keys.append(w if seen[w] == 1 else f"{w}#{seen[w]}")
    return keys


def words_to_maps(words: list[tuple[str, list[int]]], tokens: torch.Tensor, normalize: str = "none"
                  ) -> dict[str, torch.Tensor]:
    """Per-token maps (S, ...) -> {word key: map}, each word the mean over its token positions."""
    if normalize not in NORMALIZATIONS:
        raise ValueError(f"normalize={normalize!r}; expected one of {NORMALIZATIONS}")
    maps = [tokens[pos].mean(0) for _, pos in words]
    if normalize == "share" and maps:
        total = torch.stack(maps).sum(0).clamp_min(1e-12)
        maps = [m / total for m in maps]
    elif normalize == "minmax":
        maps = [(m - m.min()) / (m.max() - m.min()).clamp_min(1e-12) for m in maps]
    return dict(zip(word_keys([w for w, _ in words]), maps))


def _probs(inputs: AttentionInputs, scale: float) -> torch.Tensor:
    """`attention_probs` (B, heads, N, S) for many calls at once, possibly without the last keys: with a boolean
    key mask, only the keys up to the last one it keeps are computed (the padding after it gets probability 0
    either way, and a short prompt leaves most of the text's tokens padding).

    The scores are laid out (keys, queries), so the softmax runs over a non-last dimension, which torch's CPU
    kernel vectorizes across the queries: over a last dimension of a few keys it is about 10x slower."""
    mask, (b, h, n, d), end = inputs.mask, inputs.q.shape, inputs.k.shape[2]
    if mask is not None and mask.dtype != torch.bool:
        return attention_probs(inputs, scale)
    bias = inputs.q.new_zeros(())
    if mask is not None:
        kept = mask.reshape(-1, end).any(0).nonzero()
        end = int(kept.max()) + 1 if len(kept) else end
        bias = bias.masked_fill(~mask[..., :end], float("-inf")).expand(b, h, 1, end).reshape(b * h, end, 1)
    k = inputs.k[:, :, :end].reshape(b * h, end, d)
    scores = torch.baddbmm(bias, k, inputs.q.reshape(b * h, n, d).transpose(1, 2), alpha=scale)  # (B*heads, keys, N)
    return scores.softmax(dim=1).view(b, h, end, n).transpose(2, 3)


def _accumulate(sums: dict, key, value: torch.Tensor, keys: int | None = None) -> None:
    """sums[key] += value, in place; `keys`: the sums' last dimension when `value` holds only its first entries."""
    if key not in sums:
        sums[key] = value.new_zeros(*value.shape[:-1], keys or value.shape[-1])
    sums[key][..., :value.shape[-1]].add_(value)
