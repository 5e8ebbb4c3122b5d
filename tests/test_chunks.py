r"""Long prompts and BREAK on Stable Diffusion and SDXL, as Automatic1111 reads them: windows of the text encoder's
length (BOS, 75 tokens, EOS on SD), each encoded on its own and concatenated, BREAK starting a new window, the words
after a window's last comma moved to the next one when the comma is at most 20 tokens from its end.

A differential test compares the windows and weights of `TokenizedPrompt` with a reference written here from
A1111's `tokenize_line` (modules/sd_hijack_clip.py) on generated prompts; the pipeline tests run the tiny SD and SDXL
pipelines (16-token windows: 14 tokens each).
"""

import random
import re

import numpy as np
import pytest
import torch

from diffxattn.conditioning import (TokenizedPrompt, _comma_id, embed_texts, embed_weighted, prompt_tokens,
                                    window_ids)
from diffxattn.control import AttentionStore
from diffxattn.control.guided import Guide
from diffxattn.generation import edit, generate
from diffxattn.models import text as text_mod
from conftest import CAPTIONS, seeded
from test_a1111 import reference_weights

KW = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
A, B = "a red circle at the left", "a blue square at the right"


# --- the reference ----------------------------------------------------------------------------------------


def reference_windows(prompt: str, tokenizer, backtrack: int = 20) -> tuple[list[list[int]], list[list[float]]]:
    """A1111's `tokenize_line` on its parse of `prompt` (weighted runs, a marker per top-level BREAK; each run
    tokenized on its own): each window's ids (BOS, tokens, EOS, padding) and multipliers."""
    items = []
    for k, segment in enumerate(re.split(r"\s*\bBREAK\b\s*", prompt)):
        items += ["BREAK"] * (k > 0) + reference_weights(segment)
    length, comma = tokenizer.model_max_length - 2, tokenizer.convert_tokens_to_ids(",</w>")
    windows, multipliers = [], []
    tokens, weights, last_comma = [], [], -1

    def next_chunk():
        nonlocal tokens, weights, last_comma
        pad = length - len(tokens)
        windows.append([tokenizer.bos_token_id, *tokens, tokenizer.eos_token_id] + [tokenizer.pad_token_id] * pad)
        multipliers.append([1.0, *weights, 1.0] + [1.0] * pad)
        tokens, weights, last_comma = [], [], -1

    for item in items:
        if item == "BREAK":
            next_chunk()
            continue
        text, weight = item
        for token in tokenizer(text, add_special_tokens=False).input_ids:
            if token == comma:
                last_comma = len(tokens)
            elif len(tokens) == length and last_comma != -1 and len(tokens) - last_comma <= backtrack:
                moved, moved_weights = tokens[last_comma + 1:], weights[last_comma + 1:]
                tokens, weights = tokens[:last_comma + 1], weights[:last_comma + 1]
                next_chunk()
                tokens, weights = moved, moved_weights
            if len(tokens) == length:
                next_chunk()
            tokens.append(token)
            weights.append(weight)
    if tokens or not windows:
        next_chunk()
    return windows, multipliers


def _written(items: list) -> str:
    """The prompt the items spell, in A1111's syntax."""
    out = []
    for item in items:
        if item == "BREAK":
            out.append("BREAK")
            continue
        text, weight = item
        out.append(text if weight == 1.0 else "(" + text + ")" if weight == 1.1 else f"({text}:{weight:g})")
    return " ".join(out).replace(" ,", ",")


def _random_items(rng: random.Random, words: list[str]) -> list:
    items = []
    for _ in range(rng.choice([0, 3, 20, 60, 75, 76, 90, 150, 230])):
        r = rng.random()
        if r < 0.05:
            items.append("BREAK")
        elif r < 0.25:
            items.append((",", 1.0))
        else:
            items.append((rng.choice(words), rng.choice([1.0, 1.0, 1.0, 1.1, 0.5, 1.3])))
    return items


@pytest.fixture(scope="module")
def tokenizer77(tmp_path_factory):
    """A CLIP tokenizer with SD's 77-token window, whose vocabulary has ',' as a token of its own."""
    tok = text_mod.build_tokenizer(CAPTIONS + ["sky, sun, hill"], tmp_path_factory.mktemp("tok77"), max_length=77)
    assert _comma_id(tok) is not None and tok.pad_token_id == tok.eos_token_id  # SD 1.x's tokenizer pads with EOS
    return tok


def test_windows_and_weights_match_a1111_on_generated_prompts(tokenizer77):
    words = sorted({w for c in CAPTIONS for w in c.split()}) + ["sky", "crimsonish"]  # the last splits in tokens
    rng, chunk_counts, backtracked = random.Random(0), set(), 0
    for _ in range(300):
        items = _random_items(rng, words)
        prompt = _written(items)
        windows, multipliers = reference_windows(prompt, tokenizer77)
        tokens = TokenizedPrompt.of(tokenizer77, prompt, chunked=True)
        assert window_ids(tokenizer77, tokens).tolist() == windows, prompt
        assert tokens.weights == [m for window in multipliers for m in window], prompt
        assert tokens.dropped == [] and tokens.chunks == len(windows)
        flat = [t for window in windows for t in window]
        assert tokens.ids == flat[:len(tokens.ids)] and tokens.ids[-1] == tokenizer77.eos_token_id
        for word, positions in tokens.words:  # every word's positions hold its tokens
            assert [flat[p] for p in positions] == tokenizer77(word, add_special_tokens=False).input_ids
        chunk_counts.add(len(windows))
        backtracked += reference_windows(prompt, tokenizer77, backtrack=0)[0] != windows  # a comma moved words
    assert {1, 2, 3, 4} <= chunk_counts and backtracked


@pytest.mark.parametrize("prompt, expected", [
    ("a red circle", 1), ("a BREAK", 1), ("a BREAK BREAK", 2), ("BREAK a", 2), ("BREAK", 1), ("", 1),
    ("a BREAK BREAK b", 3)])
def test_break_windows_as_a1111_counts_them(tokenizer77, prompt, expected):
    chunks = TokenizedPrompt.of(tokenizer77, prompt, chunked=True).chunks
    assert chunks == len(reference_windows(prompt, tokenizer77)[0]) == expected


def test_a_window_long_prompt_is_the_tokenizers_padded_encoding(tokenizer77):
    text = "a red circle, a blue square"
    tokens = TokenizedPrompt.of(tokenizer77, text, chunked=True)
    assert window_ids(tokenizer77, tokens)[0].tolist() == tokenizer77(text, padding="max_length").input_ids
    unchunked = TokenizedPrompt.of(tokenizer77, text)
    assert (tokens.ids, tokens.weights, tokens.words) == (unchunked.ids, unchunked.weights, unchunked.words)


# --- Stable Diffusion and SDXL ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    from sd_tiny import tiny_sdxl_pipeline

    return tiny_sdxl_pipeline(tmp_path_factory.mktemp("sdxl"))


def test_each_window_is_encoded_on_its_own(sd_pipe, sdxl):
    for pipe in (sd_pipe, sdxl):
        tokens = prompt_tokens(pipe, f"{A} BREAK {B}")
        assert tokens.chunks == 2 and tokens.clean == f"{A} {B}"
        text, a, b = embed_texts(pipe, [tokens]), embed_texts(pipe, [A]), embed_texts(pipe, [B])
        assert text.embeds.shape[1] == 32 and text.mask.all()
        torch.testing.assert_close(text.embeds, torch.cat([a.embeds, b.embeds], dim=1), rtol=0, atol=1e-6)
        if pipe is sdxl:  # the pooled embedding is the first window's
            torch.testing.assert_close(text.pooled, a.pooled, rtol=0, atol=1e-6)
        assert tokens.positions(["square"]) == [16 + 1 + B.split().index("square")]


def test_a_prompt_longer_than_a_window_loses_no_word(sd_pipe):
    long = f"{A} and {B} above"  # a window of this encoder holds 14 tokens: "above" would be cut off
    assert prompt_tokens(sd_pipe, long).chunks == 2 and prompt_tokens(sd_pipe, long).dropped == []
    assert TokenizedPrompt.of(sd_pipe.tokenizer, long).dropped == ["above"]  # without chunking (our pipeline)


def test_generate_with_break_samples_the_concatenated_windows(sd_pipe, sdxl):
    for pipe in (sd_pipe, sdxl):
        image = generate(pipe, f"{A} BREAK {B}", generator=seeded(), **KW).images
        text, empty = embed_texts(pipe, [A, B]), embed_texts(pipe, [""])
        embeds = torch.cat([text.embeds[:1], text.embeds[1:]], dim=1)
        negative, extra = torch.cat([empty.embeds, empty.embeds], dim=1), {}
        if pipe is sdxl:  # no negative prompt: SDXL's zeros, as the pipeline makes them
            negative = torch.zeros_like(embeds)
            extra = {"pooled_prompt_embeds": text.pooled[:1], "negative_pooled_prompt_embeds": 0 * text.pooled[:1]}
        direct = pipe(prompt_embeds=embeds, negative_prompt_embeds=negative, generator=seeded(), **extra, **KW).images
        np.testing.assert_allclose(image, direct, atol=1e-5)
        assert not np.allclose(image, generate(pipe, f"{A} {B}", generator=seeded(), **KW).images, atol=1e-3)


def test_a_long_negative_prompt_gets_the_prompt_as_many_windows(sd_pipe):
    negative = f"{B} and {A} above all"  # longer than a window
    image = generate(sd_pipe, A, negative_prompt=negative, generator=seeded(), **KW).images
    text, empty, long = (embed_texts(sd_pipe, [A]), embed_texts(sd_pipe, [""]),
                         embed_texts(sd_pipe, [prompt_tokens(sd_pipe, negative)]))
    assert long.embeds.shape[1] == 32
    direct = sd_pipe(prompt_embeds=torch.cat([text.embeds, empty.embeds], dim=1), negative_prompt_embeds=long.embeds,
                     generator=seeded(), **KW).images
    np.testing.assert_allclose(image, direct, atol=1e-5)


def test_words_of_every_window_have_maps_and_weights(sd_pipe):
    prompt = f"{A} BREAK a (blue:1.8) square"
    with AttentionStore(sd_pipe) as store:
        generate(sd_pipe, prompt, generator=seeded(), **KW)
    maps = store.word_maps(prompt=prompt)
    assert set(maps) >= {"red", "circle", "blue", "square"} and all(m.sum() > 0 for m in maps.values())
    assert store.token_maps().shape[0] == 32
    weighted = generate(sd_pipe, prompt, generator=seeded(), **KW).images
    plain = generate(sd_pipe, f"{A} BREAK a blue square", generator=seeded(), **KW).images
    assert not np.allclose(weighted, plain, atol=1e-4)


@pytest.mark.parametrize("mode", ["a1111", "compel"])
def test_embedding_weights_act_inside_their_window(sd_pipe, mode):
    weighted = embed_weighted(sd_pipe, [f"a (red:0.5) circle BREAK {B}"], mode).embeds
    plain = embed_texts(sd_pipe, [prompt_tokens(sd_pipe, f"a red circle BREAK {B}")]).embeds
    assert weighted.shape == plain.shape == (1, 32, 32)
    torch.testing.assert_close(weighted[:, 16:], plain[:, 16:], rtol=0, atol=1e-6)  # the second window: unweighted
    assert not torch.allclose(weighted[:, :16], plain[:, :16], atol=1e-3)
    if mode == "a1111":  # Original emphasis keeps each window's mean
        torch.testing.assert_close(weighted[:, :16].mean(), plain[:, :16].mean(), rtol=1e-5, atol=1e-7)


def test_break_on_our_pipeline_and_chunked_edits_and_guides_are_refused(tiny_pipe, sd_pipe):
    with pytest.raises(ValueError, match="BREAK at column 13 of 'a red circle BREAK a blue square': it starts a new "
                                         "75-token window"):
        generate(tiny_pipe, "a red circle BREAK a blue square", **KW)
    with pytest.raises(ValueError, match="prompt-to-prompt edits read one window of the text encoder; "
                                         f"'{A} BREAK {B}' takes 2"):
        edit(sd_pipe, f"{A} BREAK {B}", f"{A} BREAK {B.replace('blue', 'green')}", **KW)
    with pytest.raises(ValueError, match="attention-guided sampling reads one window"):
        generate(sd_pipe, f"{A} BREAK {B}", guide=Guide(excite=("circle",)), **KW)


def test_the_negative_prompt_is_read_with_its_weights(tiny_pipe, sd_pipe):
    kw = dict(num_inference_steps=2, guidance_scale=5.0, output_type="np")
    for pipe in (tiny_pipe, sd_pipe):
        plain = generate(pipe, A, negative_prompt="a blue square", generator=seeded(), **kw).images
        assert np.array_equal(plain, pipe(A, negative_prompt="a blue square", generator=seeded(), **kw).images)
        weighted = generate(pipe, A, negative_prompt="a (blue:1.6) square", generator=seeded(), **kw).images
        negative = embed_weighted(pipe, ["a (blue:1.6) square"], "a1111")  # "Original" emphasis in attention mode
        direct = pipe(**embed_texts(pipe, [A]).pipeline_kwargs(pipe), generator=seeded(), **kw,
                      **{f"negative_{k}": v for k, v in negative.pipeline_kwargs(pipe).items()}).images
        np.testing.assert_allclose(weighted, direct, atol=1e-6)
        assert not np.allclose(weighted, plain, atol=1e-4)
        compel = generate(pipe, A, negative_prompt="a (blue:0.5) square", weight_mode="embedding",
                          generator=seeded(), **kw).images
        negative = embed_weighted(pipe, ["a (blue:0.5) square"], "compel")
        direct = pipe(**embed_texts(pipe, [A]).pipeline_kwargs(pipe), generator=seeded(), **kw,
                      **{f"negative_{k}": v for k, v in negative.pipeline_kwargs(pipe).items()}).images
        np.testing.assert_allclose(compel, direct, atol=1e-6)
    broken = generate(sd_pipe, A, negative_prompt=f"{B} BREAK {A}", generator=seeded(), **kw).images
    empty, two = embed_texts(sd_pipe, [""]), embed_texts(sd_pipe, [B, A])
    direct = sd_pipe(prompt_embeds=torch.cat([embed_texts(sd_pipe, [A]).embeds, empty.embeds], dim=1),
                     negative_prompt_embeds=torch.cat([two.embeds[:1], two.embeds[1:]], dim=1), generator=seeded(),
                     **kw).images
    np.testing.assert_allclose(broken, direct, atol=1e-5)
