"""Text conditioning: from one prompt to what the UNet attends to.

A prompt is parsed (weight syntax, `prompt_syntax`), tokenized and aligned with its words once, as a
`TokenizedPrompt`; generation, heatmaps, edits and the evaluation read its clean text, token ids, word ->
token positions, per-token weights and truncation from there. `encode` turns texts into embeddings on
any of the pipelines (ours, Stable Diffusion, SDXL), `weighted_embeddings` applies prompt weights to the
embeddings (compel / Automatic1111).

    tokens = prompt_tokens(pipe, "a (red:1.5) crimson circle")   # TokenizedPrompt.of(pipe.tokenizer, ...)
    tokens.clean     # 'a red crimson circle', the text the tokenizer sees
    tokens.words     # [('a', [1]), ('red', [2]), ('crimson', [3, 4]), ('circle', [5])]  (BOS is 0)
    tokens.weights   # one per position of the padded window: 1.5 at 2, 1 elsewhere
    embeds, mask = encode(pipe, [tokens.clean])
    text = embed_texts(pipe, [tokens.clean])  # the same, with SDXL's pooled embedding: text.pooled

SDXL has two tokenizers and text encoders: word positions come from the first (`tokenizer`; the refiner has only
`tokenizer_2`) and `prompt_tokens` checks that the other splits the prompt the same way; the per-token embeddings
are both encoders' penultimate hidden states side by side, and the second encoder's pooled output conditions the
UNet next to the time ids (`added_cond_kwargs`).
"""

from __future__ import annotations

import itertools
import math
import warnings
from dataclasses import dataclass

import torch

from .errors import shorten
from .models import text as text_mod
from .prompt_syntax import WeightedSpan, parse_weights

# ---------------------------------------------------------------------------------------------
# Word <-> token alignment
# ---------------------------------------------------------------------------------------------


@dataclass
class _Word:
    """One word as the tokenizer splits it: its span in the text and its tokens."""

    text: str
    start: int
    ids: list[int]
    tokens: list[str]


def _words_from_offsets(text: str, tokenizer) -> list[_Word]:
    """Fast tokenizers report each token's word and character span: use them as they are."""
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    tokens = tokenizer.convert_ids_to_tokens(ids)
    words: list[_Word] = []
    spans: list[list[int]] = []
    last = object()
    for tid, tok, wid, (s, e) in zip(ids, tokens, enc.word_ids(), enc["offset_mapping"]):
        if wid is None or wid != last:
            words.append(_Word("", s, [], []))
            spans.append([s, e])
        words[-1].ids.append(tid)
        words[-1].tokens.append(tok)
        spans[-1][1] = max(spans[-1][1], e)
        last = wid
    for w, (s, e) in zip(words, spans):
        w.text = text[s:e]
    return words


def _words_from_end_markers(text: str, tokenizer) -> list[_Word]:
    """Slow CLIP tokenizers give no offsets: group tokens at CLIP's '</w>' word-end marker, then
    find each word in the lowercased text (CLIP lowercases) to recover where it starts."""
    tokens = tokenizer.tokenize(text)
    ids = tokenizer.convert_tokens_to_ids(tokens)
    lowered, origin = [], []
    for k, ch in enumerate(text):  # lower() may change length ('İ'), so map back per char
        lowered.append(ch.lower())
        origin += [k] * len(lowered[-1])
    lowered_text, origin = "".join(lowered), origin + [len(text)]
    words, cursor, first = [], 0, 0
    for k, tok in enumerate(tokens):
        if not tok.endswith("</w>") and k + 1 < len(tokens):
            continue
        span = ids[first : k + 1], tokens[first : k + 1]
        piece = tokenizer.convert_tokens_to_string(span[1]).replace("</w>", " ").strip()
        found = lowered_text.find(piece.lower(), cursor) if piece else -1
        if found < 0:  # text the tokenizer normalised away: keep the word, place it at the cursor
            words.append(_Word(piece, origin[cursor], *span))
        else:
            cursor = found + len(piece)
            start = origin[found]
            words.append(_Word(text[start : origin[cursor]], start, *span))
        first = k + 1
    return words


def _words(text: str, tokenizer) -> list[_Word]:
    if getattr(tokenizer, "is_fast", False):
        return _words_from_offsets(text, tokenizer)
    return _words_from_end_markers(text, tokenizer)


# ---------------------------------------------------------------------------------------------
# One prompt, tokenized
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as the text encoder reads it. Positions count BOS as 0, so they index the encoder's sequence."""

    prompt: str  # as written, weight syntax included
    clean: str  # weight syntax removed: what the tokenizer sees
    ids: list[int]  # BOS, the tokens inside the encoder's window (max_length), EOS
    weights: list[float]  # one per position of the padded window; BOS, EOS, padding and cut tokens 1
    words: list[tuple[str, list[int]]]  # each word whose tokens all fit inside the window, and their positions
    dropped: list[str]  # words with a token past the window: truncation cuts them (or their end) off

    @classmethod
    def of(cls, tokenizer, prompt: str | TokenizedPrompt, *, syntax: bool = True) -> TokenizedPrompt:
        """Parse and tokenize `prompt` once (a TokenizedPrompt is returned as it is); `syntax=False`: the
        text as the tokenizer sees it, brackets and all (what a pipeline's `encode_prompt` gets).

        Each word's tokens all take the weight of the span holding the word's *first character*:
        "(cr)imson" weights every token of "crimson" 1.1.
        """
        if isinstance(prompt, TokenizedPrompt):
            return prompt
        spans = parse_weights(prompt) if syntax else [WeightedSpan(prompt, 1.0)]
        clean = "".join(span.text for span in spans)
        char_weights = [span.weight for span in spans for _ in span.text]
        size = tokenizer.model_max_length
        ids, weights, words, dropped = [tokenizer.bos_token_id], [1.0] * size, [], []
        position = 1
        for word in _words(clean, tokenizer):
            kept = [p for p in range(position, position + len(word.ids)) if p < size - 1]  # size - 1: EOS
            ids += word.ids[:len(kept)]  # the encoder reads a cut word's first tokens (truncation)...
            if len(kept) == len(word.ids):
                words.append((word.text, kept))
            else:  # ...but the word is dropped whole, as the too-long-prompt warning says: it gets no map
                dropped.append(word.text)
            for p in kept:
                weights[p] = char_weights[word.start] if word.start < len(char_weights) else 1.0
            position += len(word.ids)
        return cls(prompt, clean, ids + [tokenizer.eos_token_id], weights, words, dropped)

    def positions(self, words: list[str]) -> list[int]:
        """Token positions of every occurrence of the given words."""
        words = [words] if isinstance(words, str) else words
        return [p for w, pos in self.words if w in words for p in pos]

    def word_weights(self) -> dict[str, float]:
        """{word: weight} of the words weighted other than 1 (by their first token)."""
        return {w: self.weights[pos[0]] for w, pos in self.words if self.weights[pos[0]] != 1.0}


def token_weights(prompt: str, tokenizer) -> tuple[list[int], list[float], list[str]]:
    """Token ids, one weight per token, and token strings for the cleaned prompt (no BOS/EOS, not truncated).

    The clean text is tokenized once, so ids equal ``tokenizer(clean_text(prompt),
    add_special_tokens=False).input_ids``; weights as in `TokenizedPrompt.of`.
    """
    spans = parse_weights(prompt)
    char_weights = [span.weight for span in spans for _ in span.text]
    ids: list[int] = []
    weights: list[float] = []
    tokens: list[str] = []
    for word in _words("".join(span.text for span in spans), tokenizer):
        ids += word.ids
        tokens += word.tokens
        weights += [char_weights[word.start] if word.start < len(char_weights) else 1.0] * len(word.ids)
    return ids, weights, tokens


def word_token_map(prompt_clean: str, tokenizer) -> list[tuple[str, list[int]]]:
    """Each word of a clean prompt (as the tokenizer splits words) with its token positions, not truncated.

    Positions count the BOS token as 0, so they index the text encoder's sequence directly;
    positions past the encoder's context (77 for CLIP) are the caller's to drop (`TokenizedPrompt` drops
    them). A repeated word appears once per occurrence. Words are substrings of `prompt_clean` (original case).

    >>> word_token_map("a crimson car", clip_tokenizer)  # doctest: +SKIP
    [('a', [1]), ('crimson', [2, 3]), ('car', [4])]
    """
    out = []
    position = 1
    for word in _words(prompt_clean, tokenizer):
        out.append((word.text, list(range(position, position + len(word.ids)))))
        position += len(word.ids)
    return out


def tokenizers(pipe) -> list:
    """The pipeline's tokenizers, the one word positions come from first: `tokenizer`, then SDXL's `tokenizer_2`
    (the SDXL refiner has only `tokenizer_2`)."""
    found = [t for t in (getattr(pipe, "tokenizer", None), getattr(pipe, "tokenizer_2", None)) if t is not None]
    if not found:
        raise ValueError(f"{type(pipe).__name__} has no tokenizer: attention control needs the prompt's tokens")
    return found


def prompt_tokens(pipe, prompt: str | TokenizedPrompt, *, syntax: bool = True) -> TokenizedPrompt:
    """`TokenizedPrompt.of` with the pipeline's (first) tokenizer. On SDXL the second tokenizer must split the
    prompt into the same words at the same positions, or maps and weights would address the wrong tokens of one
    encoder: a ValueError names the first word they split differently."""
    first, *others = tokenizers(pipe)
    tokens = TokenizedPrompt.of(first, prompt, syntax=syntax)
    for other in others:
        if other.model_max_length != first.model_max_length:
            raise ValueError(f"the pipeline's tokenizers read {first.model_max_length} and {other.model_max_length} "
                             "tokens: per-token weights and maps need one length")
        second = TokenizedPrompt.of(other, tokens.clean, syntax=False)
        if second.words != tokens.words:
            (word, a), (other_word, b) = next((x, y) for x, y in itertools.zip_longest(
                tokens.words, second.words, fillvalue=("", [])) if x != y)
            raise ValueError(f"the pipeline's two tokenizers split the word {shorten(word or other_word, 40)!r} of "
                             f"{shorten(tokens.clean, 80)!r} differently (token positions {a} vs {b}); word maps "
                             "and weights need both to agree")
    return tokens


class PromptTooLongError(ValueError):
    """A prompt has more tokens than the text encoder reads (raised instead of a warning when strict)."""


def dropped_words(tokenizer, text: str) -> list[str]:
    """The words of `text` (read as is, no weight syntax) that do not fit into the encoder's max length (BOS and
    EOS included)."""
    return TokenizedPrompt.of(tokenizer, text, syntax=False).dropped


def check_length(tokenizer, prompts: list[str], strict: bool = False) -> None:
    """Warn (or raise PromptTooLongError when strict) naming the words a too-long prompt loses."""
    for prompt in prompts:
        if len(prompt) < tokenizer.model_max_length // 2:  # cannot overflow: every token has >= 1 character
            continue
        lost = dropped_words(tokenizer, prompt)
        if lost:
            message = (f"prompt is longer than the text encoder's {tokenizer.model_max_length} tokens; "
                       f"these words are dropped: {shorten(' '.join(lost), 200)}")
            if strict:
                raise PromptTooLongError(message)
            warnings.warn(message, stacklevel=3)


# ---------------------------------------------------------------------------------------------
# Embeddings
# ---------------------------------------------------------------------------------------------


def encode_texts(tokenizer, text_encoder, texts: list[str], *, strict: bool = False,
                 dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Text embeddings (B, S, D) and the mask (B, S) of real tokens, for texts without weight syntax.

    Words past the encoder's max length are dropped with a warning naming them (an error if `strict`).
    """
    check_length(tokenizer, texts, strict)
    ids, mask = text_mod.tokenize(tokenizer, texts)
    embeds = text_mod.encode(text_encoder, ids)
    return embeds.to(dtype or embeds.dtype), mask.to(embeds.device)


def masks_padding(pipe) -> bool:
    """Whether the pipeline's UNet takes a key mask (ours: padding gets no attention) rather than attending
    to every position (Stable Diffusion): its step callbacks then also see `prompt_attention_mask`."""
    return "prompt_attention_mask" in getattr(pipe, "_callback_tensor_inputs", ())


def takes_pooled(pipe) -> bool:
    """Whether the pipeline's UNet also reads a pooled text embedding and time ids (SDXL's `added_cond_kwargs`):
    its step callbacks then also see `add_text_embeds` and `add_time_ids`."""
    return "add_text_embeds" in getattr(pipe, "_callback_tensor_inputs", ())


@dataclass
class TextEmbeddings:
    """What a pipeline's UNet reads of a batch of texts."""

    embeds: torch.Tensor  # (B, S, D) per-token embeddings: the keys and values of cross-attention
    mask: torch.Tensor  # (B, S) bool, the keys attended to (all of them on Stable Diffusion)
    pooled: torch.Tensor | None = None  # (B, P) SDXL's pooled embedding of its second text encoder; else None

    def __getitem__(self, rows) -> TextEmbeddings:
        return TextEmbeddings(self.embeds[rows], self.mask[rows], None if self.pooled is None else self.pooled[rows])

    def pipeline_kwargs(self, pipe) -> dict:
        """The pipeline call's text arguments: `prompt_embeds`, and the mask or the pooled embedding where the
        pipeline takes them."""
        kwargs = {"prompt_embeds": self.embeds}
        if masks_padding(pipe):
            kwargs["prompt_attention_mask"] = self.mask
        if self.pooled is not None:
            kwargs["pooled_prompt_embeds"] = self.pooled
        return kwargs


def embed_texts(pipe, texts: list[str]) -> TextEmbeddings:
    """Embeddings of texts (no weight syntax) through the pipeline's own `encode_prompt`, so they are the bits
    the pipeline itself would use: ours masks padding keys; Stable Diffusion attends to every position; SDXL
    adds its pooled embedding."""
    if masks_padding(pipe):
        return TextEmbeddings(*pipe.encode_prompt(texts))
    if takes_pooled(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(texts, device=pipe._execution_device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    else:
        (embeds, _), pooled = pipe.encode_prompt(texts, pipe._execution_device, 1, False), None
    return TextEmbeddings(embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device), pooled)


def encode(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (B, S, D) and key mask (B, S) of texts (no weight syntax) on any pipeline (`embed_texts`)."""
    text = embed_texts(pipe, texts)
    return text.embeds, text.mask


def _encode_hiding(pipe, text: str, hide: torch.Tensor) -> torch.Tensor:
    """(1, S, D) embeddings of `text` with the tokens `hide` (1, S) hidden from the others inside each text
    encoder: the last hidden state (ours, Stable Diffusion), or on SDXL both encoders' penultimate ones side by
    side, as its `encode_prompt` takes them."""
    if not takes_pooled(pipe):
        ids, _ = text_mod.tokenize(pipe.tokenizer, [text])
        return text_mod.encode(pipe.text_encoder, ids, hide)
    encoders = [e for e in (getattr(pipe, "text_encoder", None), pipe.text_encoder_2) if e is not None]
    states = []
    for tokenizer, encoder in zip(tokenizers(pipe), encoders):
        ids, _ = text_mod.tokenize(tokenizer, [text])
        out = encoder(ids.to(encoder.device), attention_mask=(~hide).long().to(encoder.device),
                      output_hidden_states=True)
        states.append(out.hidden_states[-2])
    return torch.cat(states, dim=-1)


def token_weight_rows(tokenizer, prompts: list[str | TokenizedPrompt]) -> torch.Tensor:
    """(B, S) weights per token position (BOS, EOS and padding 1), from each prompt's weight syntax."""
    return torch.tensor([TokenizedPrompt.of(tokenizer, p).weights for p in prompts])


def embed_weighted(pipe, prompts: list[str | TokenizedPrompt], mode: str = "compel") -> TextEmbeddings:
    """Text embeddings with prompt weights applied to the token embeddings (the pooled one, SDXL's, stays the
    unweighted prompt's, as compel leaves it).

    mode "compel", as compel does it: every weighted token becomes z_empty + w * (z - z_empty); then each run
    of tokens weighted below 1 is also faded out of the whole prompt by lerping towards the prompt encoded
    with that run hidden from the other tokens (otherwise the later tokens of a causal text encoder still
    carry it): lerp weight tan((1 - w) * pi / 2), so w = 0.5 is half-way and w = 0 removes the run.
    mode "a1111": z * w, then rescaled so the mean over the prompt's embeddings is unchanged (Automatic1111's
    "Original" emphasis); "a1111-no-norm": z * w alone (its "No norm").
    """
    if mode not in ("compel", "a1111", "a1111-no-norm"):
        raise ValueError(f"embedding weight mode {mode!r}; expected 'compel', 'a1111' or 'a1111-no-norm'")
    tokens = [prompt_tokens(pipe, p) for p in prompts]
    text = embed_texts(pipe, [t.clean for t in tokens])
    z = text.embeds
    weights = torch.tensor([t.weights for t in tokens])
    w = weights.to(z)[..., None]  # (B, S, 1)
    if mode in ("a1111", "a1111-no-norm"):
        scaled = z * w
        text.embeds = scaled if mode == "a1111-no-norm" else scaled * (z.mean(dim=(1, 2), keepdim=True) /
                                                                       scaled.mean(dim=(1, 2), keepdim=True))
        return text
    z_empty, _ = encode(pipe, [""] * len(prompts))
    out = torch.where(w == 1, z, z_empty + w * (z - z_empty))  # weight 1 keeps z bit for bit
    for i, row in enumerate(weights.tolist()):
        runs = [r for r in _equal_runs(row) if r[2] < 1]
        if not runs:
            continue
        total, norm = out[i].clone(), 1.0
        for start, length, v in runs:
            hide = torch.zeros(1, z.shape[1], dtype=torch.bool)
            hide[0, start:start + length] = True
            without = _encode_hiding(pipe, tokens[i].clean, hide)[0].to(z)
            lerp = math.tan((1.0 - max(v, 1e-5)) * math.pi / 2)
            total, norm = total + lerp * without, norm + lerp
        out[i] = total / norm
    text.embeds = out
    return text


def weighted_embeddings(pipe, prompts: list[str | TokenizedPrompt], mode: str = "compel"
                        ) -> tuple[torch.Tensor, torch.Tensor]:
    """`embed_weighted`'s embeddings (B, S, D) and mask (B, S)."""
    text = embed_weighted(pipe, prompts, mode)
    return text.embeds, text.mask


def _equal_runs(row: list[float]):
    """(start, length, weight) of each run of equal consecutive weights."""
    start = 0
    for value, group in itertools.groupby(row):
        length = len(list(group))
        yield start, length, value
        start += length


def with_word_weights(tokenizer, prompt: str, weights: dict[int, float]) -> str:
    """`prompt` rewritten so that word k (of `TokenizedPrompt.of(tokenizer, prompt).words`) has weight
    `weights[k]`; the other words keep theirs. Weights are written as ``(word:1.5)``, literal syntax characters
    escaped, so ``parse_weights`` of the result gives back every word's weight:

    >>> with_word_weights(tok, "a red++ circle", {2: 0.5})
    'a (red:1.21) (circle:0.5)'
    """
    from .prompt_syntax import _ESCAPABLE

    spans = parse_weights(prompt)
    clean = "".join(span.text for span in spans)
    char_weights = [span.weight for span in spans for _ in span.text]
    words = _words(clean, tokenizer)
    unknown = [k for k in weights if not 0 <= k < len(words)]
    if unknown:
        raise ValueError(f"word {unknown[0]} is not in the prompt, which has {len(words)} words")
    per_char = [1.0] * len(clean)  # characters outside every word (spaces) carry no weight: written plainly
    for k, word in enumerate(words):
        weight = weights.get(k, char_weights[word.start] if word.start < len(clean) else 1.0)
        for c in range(word.start, min(word.start + len(word.text), len(clean))):
            per_char[c] = round(float(weight), 4)
    pieces, start = [], 0
    for end in range(1, len(clean) + 1):  # runs of one weight
        if end == len(clean) or per_char[end] != per_char[start]:
            text = "".join("\\" + ch if ch in _ESCAPABLE else ch for ch in clean[start:end])
            pieces.append(text if per_char[start] == 1.0 else f"({text}:{per_char[start]:g})")
            start = end
    return "".join(pieces)
