"""Attention-guided sampling: steer the latents by a loss on the cross-attention maps, at chosen steps.

Attend-and-Excite (Chefer et al. 2023), Divide & Bind (Li et al. 2023), SynGen (Rassin et al. 2023) and BoxDiff
(Xie et al. 2023) share one loop, which this module runs on any pipeline the control layer covers (XAttnUNet and
diffusers' UNet2DConditionModel): before the UNet predicts step s, the latents x_s take gradient steps

    x_s <- x_s - step_size * sqrt(1 - s / (2 n)) * grad L(maps(x_s)) / rms(grad L)

where `maps` are the conditional prompt's cross-attention probabilities at one resolution (16x16 when the UNet has
it, as Attend-and-Excite), averaged over heads and layers, and L the sum of the objectives. The gradient loses
its per-channel mean over the image (that part only tints the image) and is normalized per image, so `step_size`
is the RMS change of the latents per gradient step, whatever the loss's scale (Attend-and-Excite's raw gradient
needs a step size tuned to each model and loss):

    excite  every named word gets a strong peak in its map (Attend-and-Excite: 1 - max of the smoothed map)
    bind    an attribute's map lies on its noun's and off the other nouns' (Divide & Bind: JS divergence;
            SynGen: symmetric KL to its noun minus symmetric KL to the other objects' words)
    box     a word's attention stays inside its box (BoxDiff: inner, outer and corner constraints)

Boxes have a second method, the default (`box_method="move"`, measured better on the shipped model: the gradient
places the object but reshapes it): at a few steps (`moves`, after the layout has formed) the word's map locates
its object, and a permutation of the latents carries the object's window to the box (`box_move`). A permutation
keeps the latents' noise statistics, and the object keeps the shape and color the model was drawing.

Two-object prompts have a third method, which changes no latent: `arrange` picks the starting noise. Of
`candidates` noises (the seed's own first), sampled together to `arrange_at` of the steps, it keeps the one whose
objects' maps lie apart, as the prompt's relation says, each in one place (`layout_score`), and sampling starts
again from it (`AttentionGuide.arrange`; a choice of the initial noise by its early attention, as InitNO (Guo et
al. 2024) scores noises). On the shipped model the layout is what the maps tell best this early, and a right
layout also brings the right colors and count.

At the `refine` steps the step repeats (up to `iterations` times) until the loss is under that step's target
(Attend-and-Excite's iterative refinement). Words are addressed as heatmaps address them: "circle", "circle#2".

    guide = Guide(excite=("circle", "square"), bind="auto")
    with AttentionGuide(pipe, guide) as g:
        image = pipe("a red circle left of a blue square", **g.kwargs()).images[0]

The gradient path is separate from sampling: each guided step makes one extra UNet call on the conditional rows
with autograd on, which only this controller sees (`processor.alone`); sampling itself, and every other controller,
run as without guidance. The guidance starts at step 1 at the earliest: it acts through the step callback that ends
the previous step, and step 0's input is the noise itself.
"""

from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ..conditioning import TokenizedPrompt, masks_padding, takes_pooled
from .processor import AttnCall, ControllerContext, alone
from .steps import SamplingRun, StepRange
from .store import word_keys

BIND_LOSSES = ("jsd", "syngen")
BOX_METHODS = ("move", "gradient")
Box = tuple[float, float, float, float]  # (x0, y0, x1, y1), fractions of the image, x right and y down


@dataclass(frozen=True)
class Guide:
    """What to steer and how. `bind="auto"`: every size and color word bound to its shape, for prompts in the
    shapes scenes' grammar; `excite="auto"`: every shape word of such a prompt. Words are heatmap keys."""

    excite: tuple[str, ...] | str = ()
    bind: tuple[tuple[str, str], ...] | str = ()  # (attribute, noun) pairs, or "auto"
    boxes: tuple[tuple[str, Box], ...] = ()
    steps: StepRange = StepRange.fraction(0, 0.5)
    step_size: float = 0.1  # RMS change of the latents per gradient step (at step 0; decays to 0.71x)
    refine: tuple[tuple[float, float], ...] = ((0.2, 0.5), (0.4, 0.8))  # (step fraction, target of 1 - loss)
    iterations: int = 5  # most gradient steps at a refinement step
    bind_loss: str = "jsd"
    resolution: int | None = None  # map height to use; None: 16 if the UNet has it, else its largest
    temperature: float | None = None  # `text_maps`: None shares, 0.01 is Attend-and-Excite's softmax
    box_method: str = "move"  # "move": carry the object into its box; "gradient": BoxDiff's losses
    moves: tuple[float, ...] = (0.4, 0.6)  # step fractions at which "move" places the boxed objects
    box_weight: float = 1.0  # "gradient": the box loss's weight
    top_k: float = 0.2  # "gradient": BoxDiff's P, the fraction of a region's cells whose mean is scored
    arrange: tuple[str, ...] | str = ()  # objects whose layout picks the starting noise, or "auto" (shape words)
    candidates: int = 4  # "arrange": starting noises tried per image
    arrange_at: float = 0.25  # "arrange": the step fraction at which the candidates' maps are read

    def __post_init__(self):
        object.__setattr__(self, "steps", StepRange.of(self.steps))
        if isinstance(self.excite, str) and self.excite != "auto":
            raise ValueError(f"excite={self.excite!r}; expected words or 'auto'")
        if isinstance(self.arrange, str) and self.arrange != "auto":
            raise ValueError(f"arrange={self.arrange!r}; expected words or 'auto'")
        if isinstance(self.bind, str) and self.bind != "auto":
            raise ValueError(f"bind={self.bind!r}; expected (attribute, noun) pairs or 'auto'")
        if self.bind_loss not in BIND_LOSSES:
            raise ValueError(f"bind loss {self.bind_loss!r}; expected one of {BIND_LOSSES}")
        if self.box_method not in BOX_METHODS:
            raise ValueError(f"box method {self.box_method!r}; expected one of {BOX_METHODS}")
        try:
            moves = tuple(float(f) for f in self.moves)
        except (TypeError, ValueError):
            moves = ()
        if not moves or not all(0 < f < 1 for f in moves):
            raise ValueError(f"moves={self.moves!r}; expected step fractions strictly between 0 and 1")
        object.__setattr__(self, "moves", moves)
        for word, box in self.boxes:
            check_box(word, box)
        for name in ("step_size", "top_k", "box_weight"):
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name}={value!r}; expected a positive number")
        if not 0 < self.top_k <= 1:
            raise ValueError(f"top_k={self.top_k!r}; expected a fraction in (0, 1]")
        if isinstance(self.iterations, bool) or not isinstance(self.iterations, int) or self.iterations < 1:
            raise ValueError(f"iterations={self.iterations!r}; expected a whole number >= 1")
        if isinstance(self.candidates, bool) or not isinstance(self.candidates, int) or self.candidates < 2:
            raise ValueError(f"candidates={self.candidates!r}; expected a whole number >= 2")
        if not (isinstance(self.arrange_at, (int, float)) and 0 < self.arrange_at < 1):
            raise ValueError(f"arrange_at={self.arrange_at!r}; expected a step fraction strictly between 0 and 1")

    def __bool__(self) -> bool:
        return bool(self.excite or self.bind or self.boxes or self.arrange)


def parse_options(excite: str | None = None, bind: str | None = None, boxes: list[str] | None = None,
                  arrange: str | None = None, **settings) -> Guide:
    """A Guide from command-line text: excite and arrange "WORD,..." or "auto", bind "ADJ=NOUN,..." or "auto",
    boxes ["WORD=x0,y0,x1,y1", ...]; `settings` (None values left out) go to Guide as they are. Without any word the
    Guide is false: it guides nothing, but holds the settings (the box score of `eval` adds its boxes)."""
    def words(text: str, what: str) -> list[str]:
        items = [w.strip() for w in text.split(",")]
        if not all(items):
            raise ValueError(f"--{what} {text!r}: expected comma-separated words, e.g. circle,square")
        return items

    kwargs = {k: v for k, v in settings.items() if v is not None}
    for name, text in (("excite", excite), ("arrange", arrange)):
        if text is not None:
            kwargs[name] = "auto" if text == "auto" else tuple(words(text, name))
    if bind is not None:
        pairs = []
        for item in ([] if bind == "auto" else words(bind, "bind")):
            attribute, sep, noun = (w.strip() for w in item.partition("="))
            if not (sep and attribute and noun):
                raise ValueError(f"--bind {item!r}: expected ATTRIBUTE=NOUN, e.g. red=circle")
            pairs.append((attribute, noun))
        kwargs["bind"] = "auto" if bind == "auto" else tuple(pairs)
    parsed = []
    for item in boxes or []:
        word, sep, numbers = item.partition("=")
        if not (sep and word.strip()):
            raise ValueError(f"--box {item!r}: expected WORD=x0,y0,x1,y1 (fractions of the image)")
        try:
            values = [float(v) for v in numbers.split(",")]
        except ValueError:
            values = []
        if len(values) != 4:
            raise ValueError(f"--box {item!r}: expected WORD=x0,y0,x1,y1, four numbers (fractions of the image)")
        parsed.append((word.strip(), check_box(word.strip(), values)))
    if parsed:
        kwargs["boxes"] = tuple(parsed)
    return Guide(**kwargs)


def check_box(word: str, box) -> Box:
    """A box (x0, y0, x1, y1) as fractions of the image: 0 <= x0 < x1 <= 1, 0 <= y0 < y1 <= 1."""
    try:
        x0, y0, x1, y1 = (float(v) for v in box)
    except (TypeError, ValueError):
        raise ValueError(f"box of {word!r} {box!r}: expected four numbers x0,y0,x1,y1") from None
    if not (0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1):
        raise ValueError(f"box of {word!r} {x0:g},{y0:g},{x1:g},{y1:g}: expected fractions of the image with "
                         "0 <= x0 < x1 <= 1 and 0 <= y0 < y1 <= 1")
    return x0, y0, x1, y1


# ---------------------------------------------------------------------------------------------
# Losses on maps: each takes word maps normalized as Attend-and-Excite does (`text_maps`)
# ---------------------------------------------------------------------------------------------

def text_maps(maps: torch.Tensor, eos: int, temperature: float | None = None) -> torch.Tensor:
    """(S, h, w) token maps -> (S, h, w) with the text tokens 1..eos-1 renormalized per pixel; others 0.

    temperature None: each word's share of the text tokens' attention. A number: the softmax of probability /
    temperature, as Attend-and-Excite (0.01: Stable Diffusion's words get ~1% of the attention each, the start
    token the rest; on a model whose words get 10-30%, as ours, that softmax is an argmax without gradient).
    """
    out = torch.zeros_like(maps)
    text = maps[1:eos]
    if temperature is None:
        out[1:eos] = text / text.sum(0, keepdim=True).clamp_min(1e-8)
    else:
        out[1:eos] = torch.softmax(text / temperature, dim=0)
    return out


def smooth(m: torch.Tensor, sigma: float = 0.5) -> torch.Tensor:
    """A 3x3 Gaussian blur of a (h, w) map (reflected edges), as Attend-and-Excite smooths before its max."""
    x = torch.arange(3, dtype=m.dtype, device=m.device) - 1
    g = torch.exp(-x ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None]) / (g.sum() ** 2)
    padded = F.pad(m[None, None], (1, 1, 1, 1), mode="reflect")
    return F.conv2d(padded, kernel[None, None])[0, 0]


def excite_loss(word_maps: list[torch.Tensor]) -> torch.Tensor:
    """Attend-and-Excite: the weakest word's 1 - (max of its smoothed map)."""
    return torch.stack([1 - smooth(m).max() for m in word_maps]).max()


def _distribution(m: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    m = m.flatten() + eps
    return m / m.sum()


def jsd(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence of two maps as distributions over pixels, in [0, ln 2]."""
    p, q = _distribution(a), _distribution(b)
    mid = (p + q) / 2
    return ((p * (p / mid).log()).sum() + (q * (q / mid).log()).sum()) / 2


def symmetric_kl(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    p, q = _distribution(a), _distribution(b)
    return ((p * (p / q).log()).sum() + (q * (q / p).log()).sum()) / 2


def bind_loss(pairs: list[tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]], kind: str = "jsd") -> torch.Tensor:
    """pairs: (attribute map, its noun's map, the other objects' word maps).

    "jsd" (Divide & Bind's binding term): mean JS divergence of attribute and noun, over ln 2, in [0, 1].
    "syngen" (SynGen): symmetric KL of attribute and noun, minus the mean symmetric KL of the attribute and of
    the noun to the other objects' words.
    """
    if kind == "jsd":
        return torch.stack([jsd(a, n) for a, n, _ in pairs]).mean() / math.log(2)
    if kind != "syngen":
        raise ValueError(f"bind loss {kind!r}; expected one of {BIND_LOSSES}")
    terms = []
    for a, n, others in pairs:
        negative = [symmetric_kl(x, o) for o in others for x in (a, n)]
        terms.append(symmetric_kl(a, n) - (torch.stack(negative).mean() if negative else 0))
    return torch.stack(terms).mean()


def box_mask(box: Box, h: int, w: int, device=None) -> torch.Tensor:
    """(h, w) bool: the map cells whose centers lie inside the box (at least one cell)."""
    x0, y0, x1, y1 = box
    ys = (torch.arange(h, device=device) + 0.5) / h
    xs = (torch.arange(w, device=device) + 0.5) / w
    inside = ((ys >= y0) & (ys <= y1))[:, None] & ((xs >= x0) & (xs <= x1))[None]
    if not inside.any():  # a box smaller than a cell: the cell holding its center
        inside[min(int((y0 + y1) / 2 * h), h - 1), min(int((x0 + x1) / 2 * w), w - 1)] = True
    return inside


def _top_mean(values: torch.Tensor, fraction: float) -> torch.Tensor:
    if values.numel() == 0:
        return values.new_zeros(())
    k = max(1, round(fraction * values.numel()))
    return values.topk(k).values.mean()


def box_loss(m: torch.Tensor, box: Box, top_k: float = 0.2) -> torch.Tensor:
    """BoxDiff on one word's map (h, w), scaled to a peak of 1: inner (1 - mean of the top cells inside the box),
    outer (mean of the top cells outside) and corner constraints (the map's row and column profiles match the
    box's extent), each in [0, 1]; their mean."""
    m = smooth(m)
    m = m / m.max().clamp_min(1e-8)
    inside = box_mask(box, *m.shape, device=m.device)
    inner = 1 - _top_mean(m[inside], top_k)
    outer = _top_mean(m[~inside], top_k)
    corner = ((m.max(0).values - inside.any(0).to(m)).abs().mean()
              + (m.max(1).values - inside.any(1).to(m)).abs().mean()) / 2
    return (inner + outer + corner) / 3


def object_center(m: torch.Tensor) -> tuple[float, float] | None:
    """(x, y), fractions of the image: the centroid of a word map's cells above the map's mean, weighted by their
    excess to the 4th power (the object's peak, little moved by attention spread elsewhere); None for a flat map."""
    found = _peak(m)
    return None if found is None else found[:2]


def object_spread(m: torch.Tensor) -> float:
    """The RMS distance (fraction of the image) of a word map's peak cells from their centroid, weighted as
    `object_center` weighs them: small for one compact object, large for attention in several places (which
    draws the object more than once); 1 for a flat map."""
    found = _peak(m)
    return 1.0 if found is None else found[2]


def _peak(m: torch.Tensor) -> tuple[float, float, float] | None:
    """(x, y, spread) of `object_center` and `object_spread`, or None for a flat map."""
    weight = (m - m.mean()).clamp_min(0) ** 4
    total = weight.sum()
    if not total > 0:
        return None
    h, w = m.shape
    ys = (torch.arange(h, device=m.device, dtype=m.dtype) + 0.5) / h
    xs = (torch.arange(w, device=m.device, dtype=m.dtype) + 0.5) / w
    x, y = (weight.sum(0) * xs).sum() / total, (weight.sum(1) * ys).sum() / total
    spread = ((weight * ((xs[None] - x) ** 2 + (ys[:, None] - y) ** 2)).sum() / total).sqrt()
    return float(x), float(y), float(spread)


def box_move(size: tuple[int, int], center: tuple[float, float], box: Box) -> torch.Tensor | None:
    """The permutation of an (H, W) grid that moves the object at `center` (x, y fractions) to the center of `box`:
    for each pixel (flat index), the pixel whose latents go there; None when the object is centered already.

    The object's window (the box's size and a quarter more, around `center`) is carried by the offset; the pixels
    it covers at the box that lie outside the window go to the pixels the window leaves, each to the first such
    pixel behind it along the offset (two windows apart: they swap). Pixels outside the two windows stay. As a
    permutation it keeps the latents' noise statistics."""
    H, W = size
    x0, y0, x1, y1 = box
    (cx, cy), (tx, ty) = center, ((x0 + x1) / 2, (y0 + y1) / 2)
    dx, dy = round((tx - cx) * W), round((ty - cy) * H)
    if dx == dy == 0:
        return None
    half_w, half_h = 0.625 * (x1 - x0), 0.625 * (y1 - y0)
    cols = range(max(0, math.floor((cx - half_w) * W), -dx), min(W, math.ceil((cx + half_w) * W), W - dx))
    rows = range(max(0, math.floor((cy - half_h) * H), -dy), min(H, math.ceil((cy + half_h) * H), H - dy))
    window = {(r, c) for r in rows for c in cols}  # source pixels whose destination is inside the image
    source = list(range(H * W))
    for r, c in window:
        source[(r + dy) * W + c + dx] = r * W + c
        if (r - dy, c - dx) not in window:  # a pixel the window leaves: the first one ahead outside the window
            k = 1
            while (r + k * dy, c + k * dx) in window:
                k += 1
            source[r * W + c] = (r + k * dy) * W + c + k * dx
    return torch.tensor(source)


def permute_pixels(x: torch.Tensor, index: torch.Tensor | None) -> torch.Tensor:
    """x (..., H, W) with its pixels permuted: pixel i takes x's pixel index[i] (None: x itself)."""
    return x if index is None else x.flatten(-2)[..., index.to(x.device)].view_as(x)


def move_into_box(latents: torch.Tensor, center: tuple[float, float], box: Box) -> torch.Tensor:
    """The latents (..., H, W) with the object at `center` moved to the center of `box` (`box_move`)."""
    return permute_pixels(latents, box_move(latents.shape[-2:], center, box))


def layout_score(word_maps: list[torch.Tensor], relations: list[str | None], spread_weight: float = 4.0) -> float:
    """How well the objects' word maps (h, w) lay out the prompt, from their centers (`object_center`): for each
    consecutive pair, the signed offset along its relation's direction (relations[i] places object i relative to
    object i + 1; None: no relation) plus half the centers' distance up to 0.3 (two places, not one); less
    `spread_weight` times the largest `object_spread` (an object in one place, not two)."""
    from ..data.captions import RELATION_DIRECTIONS

    centers = [object_center(m) or (0.5, 0.5) for m in word_maps]
    score = 0.0
    for ((x1, y1), (x2, y2)), relation in zip(zip(centers, centers[1:]), relations):
        if relation is not None:
            dx, dy = RELATION_DIRECTIONS[relation]
            score += dx * (x2 - x1) + dy * (y2 - y1)
        score += 0.5 * min(0.3, math.hypot(x2 - x1, y2 - y1))
    return score - spread_weight * max((object_spread(m) for m in word_maps), default=0.0)


def _relation(words: list[str]) -> str | None:
    """The relation (a key of RELATION_PHRASES) one of whose phrasings `words` contain, if any."""
    from ..data.captions import RELATION_PHRASES

    words = [w.lower() for w in words]
    for relation, phrases in RELATION_PHRASES.items():
        for phrase in phrases:
            if any(tuple(words[i:i + len(phrase)]) == phrase for i in range(len(words))):
                return relation
    return None


# ---------------------------------------------------------------------------------------------
# Which words each prompt's objectives name
# ---------------------------------------------------------------------------------------------

@dataclass
class _Plan:
    """One prompt's objectives as token positions."""

    eos: int
    excite: list[list[int]] = field(default_factory=list)
    bind: list[tuple[list[int], list[int], list[list[int]]]] = field(default_factory=list)
    boxes: list[tuple[list[int], Box]] = field(default_factory=list)
    arrange: list[list[int]] = field(default_factory=list)  # the objects' words, in the prompt's order
    relations: list[str | None] = field(default_factory=list)  # relations[i]: object i relative to i + 1


def _grammar(prompt: str):
    from ..data.captions import parse_caption_words

    try:
        return parse_caption_words(prompt)
    except ValueError as e:
        raise ValueError(f"'auto' guidance needs a prompt in the shapes scenes' grammar ({e}); name the words "
                         "instead") from None


def plan(tokenizer, prompt: str | TokenizedPrompt, guide: Guide) -> _Plan:
    """The token positions of each objective of `guide` in `prompt`; a word not in the prompt is a ValueError
    naming it and the prompt's words."""
    tokens = TokenizedPrompt.of(tokenizer, prompt)
    if tokens.chunks > 1:
        raise ValueError(f"attention-guided sampling reads one window of the text encoder; {tokens.prompt!r} takes "
                         f"{tokens.chunks} (more than {tokenizer.model_max_length - 2} tokens, or BREAK)")
    keys = word_keys([w for w, _ in tokens.words])
    positions = dict(zip(keys, (p for _, p in tokens.words)))

    def at(word: str, what: str) -> list[int]:
        if word not in positions:
            raise ValueError(f"{what} word {word!r} is not in the prompt {tokens.clean!r}; its words: "
                             f"{', '.join(keys)} (a repeated word is word#2, word#3, ...)")
        return positions[word]

    result = _Plan(eos=len(tokens.ids) - 1)
    excite, bind, arrange = guide.excite, guide.bind, guide.arrange
    words = [w for w, _ in tokens.words]
    if "auto" in (excite, bind, arrange):
        from ..data.captions import COLORS, SIZES

        spec, owners = _grammar(tokens.clean)
        nouns = {o["shape"] for o in spec["objects"]}
        shape_of = {i: k for k, (w, i) in enumerate(zip(words, owners)) if w in nouns and i >= 0}  # object -> word
        shape_words = tuple(keys[k] for k in shape_of.values())
        excite = shape_words if excite == "auto" else excite
        arrange = shape_words if arrange == "auto" else arrange
        if bind == "auto":
            bind = tuple((keys[k], keys[shape_of[i]]) for k, (w, i) in enumerate(zip(words, owners))
                         if (w in COLORS or w in SIZES) and i in shape_of)
    result.excite = [at(w, "excite") for w in excite]
    result.arrange = [at(w, "arrange") for w in arrange]
    order = [keys.index(w) for w in arrange]
    result.relations = [_relation(words[a + 1:b]) for a, b in zip(order, order[1:])]
    for attribute, noun in bind:
        a, n = at(attribute, "bind"), at(noun, "bind")
        others = [at(w, "bind") for pair in bind if noun not in pair for w in pair]
        result.bind.append((a, n, list({tuple(o): o for o in others}.values())))
    result.boxes = [(at(word, "box"), box) for word, box in guide.boxes]
    return result


# ---------------------------------------------------------------------------------------------
# The controller
# ---------------------------------------------------------------------------------------------

class AttentionGuide(ControllerContext):
    """Installs `guide` on `pipe`: `kwargs()` are the pipeline call's step-callback arguments that apply it.

    `shared=True` (prompt-to-prompt edits): the loss is computed on the first image's prompt and its latents'
    change is applied to every image, so a source and its edit keep moving together.
    `losses`: per guided step, the mean loss before its first update (what `bench` and tests read).
    """

    tensor_inputs = ["latents", "prompt_embeds"]

    def __init__(self, pipe, guide: Guide, *, shared: bool = False):
        super().__init__(pipe)
        self.guide, self.shared = guide, shared
        self.plans: list[_Plan] = []
        self.checked = self.probing = self.arranging = False
        self.layout = self.noises = None  # `arrange`'s scores of its candidates, and the candidates
        self.maps: dict[int, list[torch.Tensor]] = defaultdict(list)
        self.losses: dict[int, float] = {}
        self.tensor_inputs = (self.tensor_inputs + (["prompt_attention_mask"] if masks_padding(pipe) else [])
                              + (["add_text_embeds", "add_time_ids"] if takes_pooled(pipe) else []))
        self.added: dict[str, torch.Tensor] | None = None  # SDXL's added_cond_kwargs for the rows `_text` picked

    def check(self, prompts: list[str | TokenizedPrompt]) -> None:
        """Plan the prompts of the next runs now (before sampling), so a word missing from one is an error up front;
        without it, each run plans the prompts the pipeline encodes (not when it is given embeddings)."""
        self.plans = [plan(self.pipe.tokenizer, p, self.guide) for p in prompts[:1 if self.shared else None]]
        self.checked = True

    def on_run_start(self, run: SamplingRun) -> None:
        if not self.checked and run.prompts is not None:
            self.plans = [plan(self.pipe.tokenizer, p, self.guide) for p in run.prompts[:1 if self.shared else None]]
        self.losses = {}

    def wants(self, call: AttnCall) -> bool:  # only this guide's own UNet calls (`alone`), not sampling's
        return call.cross and self.probing

    def observe(self, call: AttnCall, probs: torch.Tensor) -> None:
        b, heads, n, s = probs.shape
        self.maps[call.height].append(probs.mean(1).transpose(1, 2).reshape(b, s, call.height, call.width))

    def kwargs(self) -> dict:
        return {"callback_on_step_end": self.callback, "callback_on_step_end_tensor_inputs": self.tensor_inputs}

    # -- the guided step --
    def callback(self, pipe, i: int, timestep, tensors: dict) -> dict:
        order = getattr(pipe.scheduler, "order", 1)
        step, n = (i + 1) // order, -(-len(pipe.scheduler.timesteps) // order)
        if (i + 1) % order or step >= n or not self.plans:
            return {}
        moving = self.guide.box_method == "move" and any(p.boxes for p in self.plans) and \
            any(round(f * n) == step for f in self.guide.moves)
        gradient = self.guide.steps.contains(step, n) and any(map(self._has_loss, self.plans))
        reading = self.arranging and step == max(1, round(self.guide.arrange_at * n))
        if not (moving or gradient or reading):
            return {}
        t = pipe.scheduler.timesteps[step * order]
        x = tensors["latents"]
        embeds, mask = self._text(tensors, x.shape[0])
        if moving:
            x = self._move(pipe, x, t, embeds, mask)
        if gradient:
            x = self._descend(pipe, x, step, n, t, embeds, mask)
        if reading:
            with torch.no_grad():
                maps = self._probe(pipe, x, t, embeds, mask)
            self.layout = torch.tensor([self._layout(maps[r], self._plan_of(r, len(maps))) for r in range(len(maps))])
            raise _LayoutRead
        return {"latents": x}

    # -- the starting noise picked by the layout --
    def arrange(self, call: dict) -> torch.Tensor | None:
        """The starting latents (B, C, h, w) for the pipeline call `call` (its keyword arguments: a prompt or a
        one-row prompt_embeds, num_images_per_prompt, generator, height, width, ... and step callbacks that run
        this guide's): for each image, the best of `guide.candidates` noises by the layout their maps show at
        `guide.arrange_at` of the steps (`layout_score`), all sampled together to that step in one call. The first
        candidate is the noise the call would draw (its generators advance as the call would advance them); the
        others come from generators seeded with the image's seed + 1000 k (k = 1, 2, ...; one generator for all
        images: its seed + image + 1000 k). None when no prompt names two objects to arrange: the call's own
        noise. `layout` keeps the scores (B, candidates) and `noises` the candidates (B, candidates, C, h, w)."""
        from diffusers.utils.torch_utils import randn_tensor

        from ..inversion import image_size, latent_shape

        if call.get("latents") is not None:
            raise ValueError("arrange picks the starting noise; it cannot start from given latents")
        prompt, n = call.get("prompt"), call.get("num_images_per_prompt") or 1
        prompts = [prompt] if isinstance(prompt, str) or prompt is None else list(prompt)
        if prompt is None and call["prompt_embeds"].shape[0] != 1:
            raise ValueError("arrange takes prompt text or one row of prompt embeddings")
        if not self.checked:
            if prompt is None:
                raise ValueError("arrange with prompt_embeds: call check(prompts) first, so its words are known")
            self.check([p for p in prompts for _ in range(n)])
        if not any(len(p.arrange) > 1 for p in self.plans):
            return None
        k, batch = self.guide.candidates, len(prompts) * n
        height, width = image_size(self.pipe)
        shape = (batch, *latent_shape(self.pipe, call.get("height") or height, call.get("width") or width)[1:])
        device, dtype = self.pipe.unet.device, self.pipe.unet.dtype
        generator = call.get("generator")
        first = randn_tensor(shape, generator=generator, device=device, dtype=dtype)  # as the call draws it
        rows, generators = [], []
        for b in range(batch):
            g = generator[b] if isinstance(generator, list) else generator
            rows.append([first[b]])
            generators.append(_clone(g))
            for j in range(1, k):
                own = None if g is None else torch.Generator(device=g.device).manual_seed(
                    g.initial_seed() + 1000 * j + (0 if isinstance(generator, list) else b))
                rows[-1].append(randn_tensor(shape[1:], generator=own, device=device, dtype=dtype))
                generators.append(own)
        noises = torch.stack([torch.stack(r) for r in rows])  # (B, k, C, h, w): each image's candidates together
        texts = {"prompt": [p for p in prompts for _ in range(n * k)], "num_images_per_prompt": 1} \
            if prompt is not None else {"num_images_per_prompt": batch * k}
        self.arranging, self.layout, self.noises = True, None, noises
        try:
            self.pipe(**{**call, **texts, "latents": noises.flatten(0, 1),
                         "generator": None if generator is None else generators})
        except _LayoutRead:
            pass
        finally:
            self.arranging = False
        if self.layout is None:
            raise RuntimeError("arrange read no layout: the call's step callbacks must run this guide's callback, "
                               "and sampling needs 2 steps or more")
        self.layout = self.layout.view(batch, k)
        return noises[torch.arange(batch), self.layout.argmax(1)]  # ties: the first (the call's own noise)

    def _layout(self, maps: torch.Tensor, p: _Plan) -> float:
        if len(p.arrange) < 2:
            return 0.0
        text = text_maps(maps, p.eos, self.guide.temperature)
        return layout_score([text[w].mean(0) for w in p.arrange], p.relations)

    def _has_loss(self, p: _Plan) -> bool:
        return bool(p.excite or p.bind or (p.boxes and self.guide.box_method == "gradient"))

    def _move(self, pipe, latents, t, embeds, mask) -> torch.Tensor:
        """Each boxed word's object moved into its box (`box_move`), one word after the other, each located by its
        map in a UNet call (without gradient) on the latents as the previous words' moves left them (on the first
        row only when `shared`, its moves applied to every row). A multistep scheduler's stored predictions of
        earlier steps move with the latents, so its next update does not draw the object where it was."""
        state = _scheduler_state(pipe.scheduler, latents.shape)
        for j in range(max(len(p.boxes) for p in self.plans)):
            with torch.no_grad():
                maps = self._probe(pipe, latents[:1] if self.shared else latents, t, embeds, mask)
            moves = []
            for r in range(latents.shape[0]):
                k = 0 if self.shared else r
                p = self._plan_of(k, maps.shape[0])
                center = None
                if j < len(p.boxes):
                    positions, box = p.boxes[j]
                    center = object_center(text_maps(maps[k], p.eos, self.guide.temperature)[positions].mean(0))
                moves.append(None if center is None else box_move(latents.shape[-2:], center, box))
            def moved(x: torch.Tensor) -> torch.Tensor:
                return torch.stack([permute_pixels(row, index) for row, index in zip(x, moves)])

            latents = moved(latents)
            for holder, key in state:
                holder[key] = moved(holder[key])
        return latents

    def _descend(self, pipe, latents, step, n, t, embeds, mask) -> torch.Tensor:
        """Gradient steps on the latents (`refine` steps repeat them up to `iterations` times)."""
        target = dict(self.guide.refine).get(_nearest(step, n, self.guide.refine))
        size = self.guide.step_size * math.sqrt(1 - step / (2 * n))
        x = latents
        for k in range(self.guide.iterations if target is not None else 1):
            loss, grad = self._loss_and_grad(pipe, x, t, embeds, mask)
            if k == 0:
                self.losses[step] = float(loss.mean())
            if target is not None:
                todo = (loss > 1 - target).to(x.dtype)  # rows still above their target
                if not todo.any():
                    break
                grad = grad * todo.view(-1, *[1] * (grad.ndim - 1))
            # per channel, the gradient's mean over the image only tints it (a map's loss cannot want a tint)
            grad = grad - grad.mean((-2, -1), keepdim=True)
            rms = grad.flatten(1).pow(2).mean(1).sqrt().clamp_min(1e-12).view(-1, *[1] * (grad.ndim - 1))
            x = x - size * (grad / rms).expand_as(x)
        return x.detach()

    def _text(self, tensors: dict, batch: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The conditional rows of the text input (negative rows come first under classifier-free guidance); on
        SDXL the same rows of the pooled embeddings and time ids are kept in `added` for `_loss_and_grad`."""
        names = {"prompt_embeds": "embeds", "prompt_attention_mask": "mask", "add_text_embeds": "text_embeds",
                 "add_time_ids": "time_ids"}
        cfg = tensors["prompt_embeds"].shape[0] == 2 * batch
        rows = {key: tensors[name][batch if cfg else 0:] for name, key in names.items() if tensors.get(name) is not None}
        if self.shared:
            rows = {key: value[:1] for key, value in rows.items()}
        self.added = {k: rows[k] for k in ("text_embeds", "time_ids") if k in rows} or None
        return rows["embeds"], rows.get("mask")

    def _loss_and_grad(self, pipe, latents, t, embeds, mask) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-row losses (B,) and the gradient of their sum with respect to the (first, if shared) latents."""
        x = (latents[:1] if self.shared else latents).detach().requires_grad_(True)
        with torch.enable_grad():
            maps = self._probe(pipe, x, t, embeds, mask)
            loss = torch.stack([self._row_loss(maps[r], self._plan_of(r, x.shape[0])) for r in range(x.shape[0])])
            grad, = torch.autograd.grad(loss.sum(), x)
        return loss.detach(), grad

    def _probe(self, pipe, x, t, embeds, mask) -> torch.Tensor:
        """(B, S, h, w): the maps of one UNet call on `x` that only this controller sees (autograd as the caller
        sets it)."""
        self.maps.clear()
        kwargs = {"encoder_attention_mask": mask} if mask is not None else {}
        if self.added is not None:  # SDXL: the pooled text and time ids of the same rows
            kwargs["added_cond_kwargs"] = self.added
        self.probing = True
        try:
            with alone(pipe, self):
                pipe.unet(pipe.scheduler.scale_model_input(x, t), t, encoder_hidden_states=embeds, **kwargs)
                return self._maps()
        finally:
            self.probing = False
            self.maps.clear()

    def _plan_of(self, row: int, rows: int) -> _Plan:
        per_prompt = max(1, rows // len(self.plans))  # rows: each prompt's images in turn
        return self.plans[min(row // per_prompt, len(self.plans) - 1)]

    def _maps(self) -> torch.Tensor:
        """(B, S, h, w): the chosen resolution's maps, mean over its layers."""
        heights = sorted(self.maps)
        if not heights:
            raise RuntimeError("the UNet made no cross-attention call: attention guidance needs cross-attention")
        wanted = self.guide.resolution or (16 if 16 in heights else heights[-1])
        if wanted not in self.maps:
            raise ValueError(f"resolution {wanted}: the UNet's cross-attention maps are {heights} high")
        return torch.stack(self.maps[wanted]).mean(0)

    def _row_loss(self, maps: torch.Tensor, p: _Plan) -> torch.Tensor:
        text = text_maps(maps, p.eos, self.guide.temperature)

        def word(positions: list[int]) -> torch.Tensor:
            return text[positions].mean(0)

        terms = []
        if p.excite:
            terms.append(excite_loss([word(w) for w in p.excite]))
        if p.bind:
            terms.append(bind_loss([(word(a), word(n), [word(o) for o in others]) for a, n, others in p.bind],
                                   self.guide.bind_loss))
        if p.boxes and self.guide.box_method == "gradient":
            terms.append(self.guide.box_weight * torch.stack(
                [box_loss(word(w), box, self.guide.top_k) for w, box in p.boxes]).mean())
        return torch.stack(terms).sum() if terms else maps.sum() * 0


class _LayoutRead(Exception):
    """Ends `arrange`'s partial sampling once the layout is read."""


def _clone(generator: torch.Generator | None) -> torch.Generator | None:
    """A generator in the same state, so a partial run does not advance the caller's."""
    if generator is None:
        return None
    clone = torch.Generator(device=generator.device)
    clone.set_state(generator.get_state())
    return clone


def _scheduler_state(scheduler, shape) -> list[tuple[object, object]]:
    """(holder, key) of each tensor of the latents' shape a multistep scheduler keeps between steps (DPM-Solver's
    and UniPC's `model_outputs`, UniPC's `last_sample`): `holder[key]` reads and replaces it."""
    found = []
    outputs = getattr(scheduler, "model_outputs", None)
    if isinstance(outputs, list):
        found += [(outputs, k) for k, x in enumerate(outputs) if isinstance(x, torch.Tensor) and x.shape == shape]
    if isinstance(getattr(scheduler, "last_sample", None), torch.Tensor) and scheduler.last_sample.shape == shape:
        found.append((scheduler.__dict__, "last_sample"))
    return found


def _nearest(step: int, n: int, refine) -> float | None:
    """The refinement fraction whose step is `step` (each fraction f refines step round(f * n)), if any."""
    for fraction, _ in refine:
        if round(fraction * n) == step:
            return fraction
    return None
