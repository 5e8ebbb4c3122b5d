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
from .prompt_syntax import WeightedSpan, break_columns, parse_weights, split_breaks

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
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)  # no length warning:
    # a prompt longer than the encoder's window is chunked, or its dropped words are named (`check_length`)
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


CHUNK_COMMA_BACKTRACK = 20  # Automatic1111's default "comma padding backtrack", in tokens


@dataclass(frozen=True)
class TokenizedPrompt:
    """A prompt as the text encoder reads it. Positions count BOS as 0, so they index the encoder's sequence.

    A chunked prompt (Stable Diffusion and SDXL, as Automatic1111 reads prompts) is `chunks` windows of the
    encoder's length side by side, each BOS, up to max_length - 2 tokens, EOS and padding, encoded separately and
    concatenated: a prompt longer than one window or with ``BREAK`` (which starts a new window) loses no word.
    """

    prompt: str  # as written, weight syntax included
    clean: str  # weight syntax (and BREAK) removed: what the tokenizer sees
    ids: list[int]  # the token at each position up to the last window's EOS: BOS, tokens, EOS (earlier windows'
    # padding included)
    weights: list[float]  # one per position of the padded windows; BOS, EOS, padding and cut tokens 1
    words: list[tuple[str, list[int]]]  # each word whose tokens all fit inside the window(s), and their positions
    dropped: list[str]  # words with a token past the window: truncation cuts them (or their end) off
    token_positions: list[int | None]  # the position of each token of `clean`; None: cut off
    chunks: int = 1  # windows of the encoder's max_length

    @classmethod
    def of(cls, tokenizer, prompt: str | TokenizedPrompt, *, syntax: bool = True,
           chunked: bool = False) -> TokenizedPrompt:
        """Parse and tokenize `prompt` once (a TokenizedPrompt is returned as it is); `syntax=False`: the
        text as the tokenizer sees it, brackets and all (what a pipeline's `encode_prompt` gets).

        Each word's tokens all take the weight of the span holding the word's *first character*:
        "(cr)imson" weights every token of "crimson" 1.1. `chunked`: Automatic1111's windows (`_chunk_positions`)
        instead of truncation, with ``BREAK`` read (when `syntax`) as the start of a new window.
        """
        if isinstance(prompt, TokenizedPrompt):
            return prompt
        if not syntax:
            segments = [[WeightedSpan(prompt, 1.0)]]
        else:
            segments = split_breaks(prompt) if chunked else [parse_weights(prompt)]
        spans, breaks = [], []  # breaks: where each BREAK's window starts, as a column of the clean text
        for k, segment in enumerate(segments):
            if k:
                spans.append(WeightedSpan(" ", 1.0))  # keeps the words on both sides of a BREAK apart
                breaks.append(sum(len(span.text) for span in spans))
            spans += segment
        clean = "".join(span.text for span in spans)
        char_weights = [span.weight for span in spans for _ in span.text]
        size = tokenizer.model_max_length
        words = _words(clean, tokenizer)
        token_ids = [i for word in words for i in word.ids]
        if chunked:
            firsts = list(itertools.accumulate([len(word.ids) for word in words], initial=0))
            at = [next((first for word, first in zip(words, firsts) if word.start >= column), len(token_ids))
                  for column in breaks]
            positions, chunks = _chunk_positions(token_ids, at, _comma_id(tokenizer), size)
        else:  # the encoder's window, truncated: size - 1 is EOS's
            positions, chunks = [p if p < size - 1 else None for p in range(1, len(token_ids) + 1)], 1
        weights, kept_words, dropped = [1.0] * (size * chunks), [], []
        first = 0
        for word in words:
            pos = positions[first:first + len(word.ids)]
            first += len(word.ids)
            kept = [p for p in pos if p is not None]  # the encoder reads a cut word's first tokens...
            for p in kept:
                weights[p] = char_weights[word.start] if word.start < len(char_weights) else 1.0
            if len(kept) == len(pos):
                kept_words.append((word.text, kept))
            else:  # ...but the word is dropped whole, as the too-long-prompt warning says: it gets no map
                dropped.append(word.text)
        ids, eos = _windows(tokenizer, token_ids, positions, chunks)
        return cls(prompt, clean, ids[:eos + 1], weights, kept_words, dropped, positions, chunks)

    def positions(self, words: list[str]) -> list[int]:
        """Token positions of every occurrence of the given words."""
        words = [words] if isinstance(words, str) else words
        return [p for w, pos in self.words if w in words for p in pos]

    def word_weights(self) -> dict[str, float]:
        """{word: weight} of the words weighted other than 1 (by their first token)."""
        return {w: self.weights[pos[0]] for w, pos in self.words if self.weights[pos[0]] != 1.0}


def _comma_id(tokenizer) -> int | None:
    """CLIP's ',' token (Automatic1111 moves the words after the last comma to the next window)."""
    found = tokenizer.convert_tokens_to_ids(",</w>")
    return None if found == tokenizer.unk_token_id else found


def _chunk_positions(token_ids: list[int], breaks: list[int], comma: int | None, size: int
                     ) -> tuple[list[int], int]:
    """Automatic1111's windows for a prompt's tokens: each token's position and the number of windows.

    A window holds size - 2 tokens between BOS and EOS. When a window is full, the next token starts a new one;
    if the window's last comma is at most `CHUNK_COMMA_BACKTRACK` tokens from its end, the tokens after the comma
    move to the new window with it. `breaks`: token indices a ``BREAK`` comes before (len(token_ids): at the end);
    each BREAK closes the current window, even an empty one, and an empty last window is not kept.
    """
    length, chunks, last_comma = size - 2, [[]], -1
    for k in range(len(token_ids) + 1):
        for _ in range(breaks.count(k)):
            chunks.append([])
            last_comma = -1
        if k == len(token_ids):
            break
        chunk = chunks[-1]
        if token_ids[k] == comma:
            last_comma = len(chunk)
        elif len(chunk) == length and last_comma != -1 and len(chunk) - last_comma <= CHUNK_COMMA_BACKTRACK:
            chunks.append(chunk[last_comma + 1:])
            del chunk[last_comma + 1:]
            last_comma = -1
        if len(chunks[-1]) == length:
            chunks.append([])
            last_comma = -1
        chunks[-1].append(k)
    if len(chunks) > 1 and not chunks[-1]:
        chunks.pop()
    positions = [0] * len(token_ids)
    for c, chunk in enumerate(chunks):
        for slot, k in enumerate(chunk):
            positions[k] = c * size + 1 + slot
    return positions, len(chunks)


def _windows(tokenizer, token_ids: list[int], positions: list[int | None], chunks: int) -> tuple[list[int], int]:
    """The encoder's input ids, `chunks` windows of max_length side by side (each BOS, its tokens at their
    positions, EOS, the tokenizer's padding), and the position of the last EOS."""
    size = tokenizer.model_max_length
    pad = tokenizer.eos_token_id if tokenizer.pad_token_id is None else tokenizer.pad_token_id
    ids, eos = [pad] * (size * chunks), [c * size + 1 for c in range(chunks)]
    for tid, p in zip(token_ids, positions):
        if p is not None:
            ids[p] = tid
            eos[p // size] = max(eos[p // size], p + 1)
    for c, end in enumerate(eos):
        ids[c * size], ids[end] = tokenizer.bos_token_id, tokenizer.eos_token_id
    return ids, eos[-1]


def window_ids(tokenizer, tokens: TokenizedPrompt) -> torch.Tensor:
    """(chunks, max_length) input ids of `tokens` for `tokenizer` (the prompt's own or, on SDXL, the other one,
    which splits every word into as many tokens: `prompt_tokens` checks), padded as the tokenizer pads."""
    token_ids = [i for word in _words(tokens.clean, tokenizer) for i in word.ids]
    ids, _ = _windows(tokenizer, token_ids, tokens.token_positions, tokens.chunks)
    return torch.tensor(ids).view(tokens.chunks, tokenizer.model_max_length)


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
    """`TokenizedPrompt.of` with the pipeline's (first) tokenizer, chunked as Automatic1111 reads prompts on
    Stable Diffusion and SDXL (our pipeline reads one window: ``BREAK`` is a ValueError there). On SDXL the second
    tokenizer must split the prompt into the same words, each into as many tokens, or maps and weights would
    address the wrong tokens of one encoder: a ValueError names the first word they split differently."""
    first, *others = tokenizers(pipe)
    chunked = getattr(pipe, "unet", None) is not None and not masks_padding(pipe)  # SD and SDXL, not SD3
    if syntax and not chunked and isinstance(prompt, str) and break_columns(prompt):
        raise ValueError(f"BREAK at column {break_columns(prompt)[0]} of {shorten(prompt, 80)!r}: it starts a new "
                         "75-token window of Stable Diffusion's text encoder, and this pipeline's text encoder reads "
                         f"one window of {first.model_max_length} tokens; remove it")
    tokens = TokenizedPrompt.of(first, prompt, syntax=syntax, chunked=chunked)
    for other in others:
        if other.model_max_length != first.model_max_length:
            raise ValueError(f"the pipeline's tokenizers read {first.model_max_length} and {other.model_max_length} "
                             "tokens: per-token weights and maps need one length")
        second = TokenizedPrompt.of(other, tokens.clean, syntax=False, chunked=chunked)
        if [(w, len(p)) for w, p in second.words] != [(w, len(p)) for w, p in tokens.words]:
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


def embed_texts(pipe, texts: list[str | TokenizedPrompt], chunks: int = 1, max_sequence_length: int = 256
                ) -> TextEmbeddings:
    """Embeddings of texts (strings without weight syntax, or `TokenizedPrompt`s, whose clean text is read)
    through the pipeline's own `encode_prompt`, so they are the bits the pipeline itself would use: ours masks
    padding keys; Stable Diffusion attends to every position; SDXL adds its pooled embedding.

    Chunked prompts (`TokenizedPrompt.chunks` > 1), or `chunks` > 1, are encoded as Automatic1111 does: every
    row in max(chunks) windows, each window encoded on its own and the windows concatenated; a row with fewer
    windows is filled with the empty prompt's; SDXL's pooled embedding is the first window's.
    `max_sequence_length`: SD3's T5 tokens after the CLIP window (its pipeline's argument and default).
    """
    count = max([chunks] + [t.chunks for t in texts if isinstance(t, TokenizedPrompt)])
    if count > 1:
        return _embed_windows(pipe, [prompt_tokens(pipe, t, syntax=False) for t in texts], count)
    texts = [t.clean if isinstance(t, TokenizedPrompt) else t for t in texts]
    if masks_padding(pipe):
        return TextEmbeddings(*pipe.encode_prompt(texts))
    if getattr(pipe, "unet", None) is None:  # SD3: the CLIP window (both encoders), then T5's tokens
        embeds, _, pooled, _ = pipe.encode_prompt(prompt=texts, prompt_2=None, prompt_3=None,
                                                  device=pipe._execution_device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False,
                                                  max_sequence_length=max_sequence_length)
    elif takes_pooled(pipe):
        embeds, _, pooled, _ = pipe.encode_prompt(texts, device=pipe._execution_device, num_images_per_prompt=1,
                                                  do_classifier_free_guidance=False)
    else:
        (embeds, _), pooled = pipe.encode_prompt(texts, pipe._execution_device, 1, False), None
    return TextEmbeddings(embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device), pooled)


def _embed_windows(pipe, rows: list[TokenizedPrompt], count: int) -> TextEmbeddings:
    """`embed_texts` of chunked prompts, `count` windows per row (Stable Diffusion and SDXL)."""
    empty, _ = _encode_windows(pipe, prompt_tokens(pipe, "", syntax=False))
    embeds, pooled = [], []
    for tokens in rows:
        z, p = _encode_windows(pipe, tokens)
        z = torch.cat([z, empty.expand(count - len(z), -1, -1)])
        embeds.append(z.reshape(-1, z.shape[-1]))
        pooled.append(None if p is None else p[0])
    embeds = torch.stack(embeds)
    return TextEmbeddings(embeds, torch.ones(embeds.shape[:2], dtype=torch.bool, device=embeds.device),
                          None if pooled[0] is None else torch.stack(pooled))


def encode(pipe, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Embeddings (B, S, D) and key mask (B, S) of texts (no weight syntax) on any pipeline (`embed_texts`)."""
    text = embed_texts(pipe, texts)
    return text.embeds, text.mask


def _encode_windows(pipe, tokens: TokenizedPrompt, hide: torch.Tensor | None = None, window: int | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(chunks, max_length, D) embeddings of each window of `tokens` (or of the one `window`), and on SDXL the
    pooled embedding of each (chunks, P): the last hidden state (ours, Stable Diffusion), or on SDXL both
    encoders' penultimate ones side by side, as its `encode_prompt` takes them. `hide` (1, max_length) bool:
    tokens hidden from the others inside each text encoder (compel's down-weighting)."""
    chosen = slice(None) if window is None else slice(window, window + 1)
    if not takes_pooled(pipe):
        return text_mod.encode(pipe.text_encoder, window_ids(pipe.tokenizer, tokens)[chosen], hide), None
    encoders = [e for e in (getattr(pipe, "text_encoder", None), pipe.text_encoder_2) if e is not None]
    states, pooled = [], None
    for tokenizer, encoder in zip(tokenizers(pipe), encoders):
        mask = None if hide is None else (~hide).long().to(encoder.device)
        out = encoder(window_ids(tokenizer, tokens)[chosen].to(encoder.device), attention_mask=mask,
                      output_hidden_states=True)
        states.append(out.hidden_states[-2])
        pooled = out[0] if out[0].ndim == 2 else pooled
    return torch.cat(states, dim=-1), pooled


def weight_rows(prompts: list[TokenizedPrompt], chunks: int = 1) -> torch.Tensor:
    """(B, S) weights per token position (BOS, EOS and padding 1), every row over max(chunks) windows."""
    count = max([chunks] + [t.chunks for t in prompts])
    width = count * len(prompts[0].weights) // prompts[0].chunks
    return torch.tensor([t.weights + [1.0] * (width - len(t.weights)) for t in prompts])


def embed_weighted(pipe, prompts: list[str | TokenizedPrompt], mode: str = "compel", chunks: int = 1
                   ) -> TextEmbeddings:
    """Text embeddings with prompt weights applied to the token embeddings (the pooled one, SDXL's, stays the
    unweighted prompt's, as compel leaves it); `chunks` as in `embed_texts`.

    mode "compel", as compel does it: every weighted token becomes z_empty + w * (z - z_empty); then each run
    of tokens weighted below 1 is also faded out of the whole prompt by lerping towards the prompt encoded
    with that run hidden from the other tokens (otherwise the later tokens of a causal text encoder still
    carry it): lerp weight tan((1 - w) * pi / 2), so w = 0.5 is half-way and w = 0 removes the run.
    mode "a1111": z * w, then rescaled so the mean over each window's embeddings is unchanged (Automatic1111's
    "Original" emphasis); "a1111-no-norm": z * w alone (its "No norm").
    """
    if mode not in ("compel", "a1111", "a1111-no-norm"):
        raise ValueError(f"embedding weight mode {mode!r}; expected 'compel', 'a1111' or 'a1111-no-norm'")
    tokens = [prompt_tokens(pipe, p) for p in prompts]
    text = embed_texts(pipe, tokens, chunks)
    z = text.embeds
    weights = weight_rows(tokens, chunks)
    w = weights.to(z)[..., None]  # (B, S, 1)
    size = len(tokens[0].weights) // tokens[0].chunks  # one window
    if mode in ("a1111", "a1111-no-norm"):
        scaled = z * w
        if mode == "a1111":
            windows, scaled = z.unflatten(1, (-1, size)), scaled.unflatten(1, (-1, size))
            scaled = (scaled * (windows.mean(dim=(2, 3), keepdim=True) / scaled.mean(dim=(2, 3), keepdim=True))
                      ).flatten(1, 2)
        text.embeds = scaled
        return text
    z_empty, _ = encode(pipe, [""] * len(prompts))
    z_empty = z_empty.repeat(1, z.shape[1] // size, 1)
    out = torch.where(w == 1, z, z_empty + w * (z - z_empty))  # weight 1 keeps z bit for bit
    for i, row in enumerate(weights.tolist()):
        runs = [r for r in _equal_runs(row) if r[2] < 1]  # BOS and EOS weigh 1: a run stays in its window
        if not runs:
            continue
        total, norm = out[i].clone(), 1.0
        for start, length, v in runs:
            hide = torch.zeros(1, size, dtype=torch.bool)
            hide[0, start % size:start % size + length] = True
            without = z[i].clone()
            window = start // size * size
            without[window:window + size] = _encode_windows(pipe, tokens[i], hide, start // size)[0][0].to(z)
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
