"""Text side: transformers' CLIPTextModel + CLIPTokenizer, loaded from a folder / hub id, or built small.

Also the two raw operations on them, `tokenize` (padded ids + mask) and `encode` (ids -> hidden states);
prompts as such (syntax, words, weights, truncation) are `diffxattn.conditioning`'s.

No machine of this project reaches a model hub, so `build_tokenizer` learns a CLIP-format BPE
vocabulary (`vocab.json`, `merges.txt`) from a caption corpus and `build_text_encoder` makes a small
randomly initialised `CLIPTextModel`; both load back with the plain transformers classes.
"""

from __future__ import annotations

import collections
import json
import os
import re
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

BOS, EOS = "<|startoftext|>", "<|endoftext|>"
# CLIP's pre-tokenizer pattern (lower-cased text): words, single digits, runs of other symbols.
_WORD = re.compile(r"'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|[^\s\w]+", re.UNICODE)


def load_text_encoder(name_or_path: str | os.PathLike,
                      dtype: torch.dtype = torch.float32) -> tuple[CLIPTokenizer, CLIPTextModel]:
    """Load a CLIP tokenizer + text model (fp32 unless `dtype` says otherwise) from a hub id or a folder.

    A local pipeline folder (one with `text_encoder/` and `tokenizer/`, like `pipelines/shapes-32` or a
    Stable Diffusion snapshot) is read from those two subfolders.
    """
    root = Path(name_or_path)
    if (root / "text_encoder").is_dir() and (root / "tokenizer").is_dir():
        return (CLIPTokenizer.from_pretrained(str(root / "tokenizer")),
                CLIPTextModel.from_pretrained(str(root / "text_encoder"), dtype=dtype))
    return (CLIPTokenizer.from_pretrained(str(name_or_path)),
            CLIPTextModel.from_pretrained(str(name_or_path), dtype=dtype))


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2/CLIP's reversible byte -> printable unicode character table (the BPE's base alphabet)."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    table, extra = {}, 0
    for b in range(256):
        if b in keep:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def _symbols(word: str, byte_encoder: dict[int, str]) -> tuple[str, ...]:
    chars = [byte_encoder[b] for b in word.encode("utf-8")]
    return tuple(chars[:-1]) + (chars[-1] + "</w>",)


def learn_bpe(captions: list[str], max_merges: int = 1000) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """Learn CLIP-style byte-level BPE merges from captions; returns (vocab, merges).

    The base vocabulary is CLIP's: every byte symbol with and without the end-of-word marker, so any
    text stays encodable; merges are added greedily by pair frequency (ties broken alphabetically so
    the result is deterministic) until `max_merges` or until every word is a single token.
    """
    byte_encoder = bytes_to_unicode()
    counts = collections.Counter(w for c in captions for w in _WORD.findall(c.lower()))
    words = {_symbols(w, byte_encoder): n for w, n in counts.items()}
    base = list(byte_encoder.values())
    vocab_list = base + [b + "</w>" for b in base]
    merges: list[tuple[str, str]] = []
    while len(merges) < max_merges:
        pairs: collections.Counter = collections.Counter()
        for sym, n in words.items():
            for pair in zip(sym, sym[1:]):
                pairs[pair] += n
        if not pairs:
            break
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        vocab_list.append(best[0] + best[1])
        merged = {}
        for sym, n in words.items():
            out, i = [], 0
            while i < len(sym):
                if i + 1 < len(sym) and (sym[i], sym[i + 1]) == best:
                    out.append(sym[i] + sym[i + 1])
                    i += 2
                else:
                    out.append(sym[i])
                    i += 1
            merged[tuple(out)] = n
        words = merged
    vocab_list += [BOS, EOS]
    return {tok: i for i, tok in enumerate(dict.fromkeys(vocab_list))}, merges


def build_tokenizer(captions: list[str], save_dir: str | os.PathLike, max_length: int = 32,
                    max_merges: int = 1000) -> CLIPTokenizer:
    """Learn a BPE vocabulary from `captions`, save it in CLIP's file format and load it with CLIPTokenizer."""
    if not captions:
        raise ValueError("build_tokenizer needs at least one caption to learn a vocabulary from")
    vocab, merges = learn_bpe(captions, max_merges)
    save_dir = Path(save_dir)
    save_dir.mkdir(parents=True, exist_ok=True)
    (save_dir / "vocab.json").write_text(json.dumps(vocab, ensure_ascii=False))
    (save_dir / "merges.txt").write_text("#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges))
    tokenizer = CLIPTokenizer.from_pretrained(str(save_dir), model_max_length=max_length)
    tokenizer.save_pretrained(save_dir)  # adds tokenizer_config.json etc. next to vocab.json / merges.txt
    return tokenizer


def text_encoder_config(tokenizer: CLIPTokenizer, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                        intermediate_size: int | None = None) -> CLIPTextConfig:
    """A small CLIPTextModel's config matching `tokenizer` (vocab, special ids, max length)."""
    return CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        projection_dim=hidden_size,
    )


def build_text_encoder(tokenizer: CLIPTokenizer, hidden_size: int = 128, num_layers: int = 2, num_heads: int = 4,
                       intermediate_size: int | None = None, seed: int | None = 0) -> CLIPTextModel:
    """A small randomly initialised CLIPTextModel matching `tokenizer` (vocab, special ids, max length)."""
    config = text_encoder_config(tokenizer, hidden_size, num_layers, num_heads, intermediate_size)
    if seed is not None:
        torch.manual_seed(seed)
    return CLIPTextModel(config)


def tokenize(tokenizer: CLIPTokenizer, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token ids (B, max_length) padded to the tokenizer's max length, and the mask (B, max_length) of real tokens."""
    enc = tokenizer(prompts, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt")
    return enc.input_ids, enc.attention_mask.bool()


def encode(text_encoder: CLIPTextModel, input_ids: torch.Tensor, hide: torch.Tensor | None = None) -> torch.Tensor:
    """Per-token text embeddings (B, S, D): the last hidden state, as Stable Diffusion uses it.

    CLIP's causal attention means padding after EOS cannot change earlier tokens, so no mask is needed here;
    the UNet masks padding keys instead. `hide` (B, S) bool: tokens no other token may attend to inside the
    encoder (compel's down-weighting), so later tokens carry nothing of them.
    """
    if hide is None:
        return text_encoder(input_ids.to(text_encoder.device))[0]
    return text_encoder(input_ids.to(text_encoder.device), attention_mask=(~hide).long().to(text_encoder.device))[0]
