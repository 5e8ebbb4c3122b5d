"""Heatmaps on Stable Diffusion 3: its MMDiT has no cross-attention but joint attention (image and text tokens in one
softmax); the control layer reads the image-query, text-key block of it. Tested on a tiny SD3 pipeline built
offline (two CLIP encoders, no T5): capture changes no bit, the maps are the layer's own probabilities (checked
against the processor's SDPA inputs), processors come back; word weights (attention mode) scale the image-to-text
block and change the image rows' output exactly as the explicit joint softmax would.
"""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffxattn import heatmaps
from diffxattn.control import AttentionStore, attention_layers
from diffxattn.control.edits import AttentionReweight
from diffxattn.control.processor import _INSTALLED, joint_text_probs
from diffxattn.generation import generate
from conftest import seeded

KW = dict(num_inference_steps=3, guidance_scale=5.0, output_type="np", max_sequence_length=8)
PROMPT = "a red circle at the left"


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from sd_tiny import tiny_sd3_pipeline

    return tiny_sd3_pipeline(tmp_path_factory.mktemp("sd3"))


def _text_length(pipe, max_sequence_length: int) -> int:
    """Text tokens SD3's own call embeds: the 16 CLIP positions, then T5's zeros (this pipeline has no T5), as
    many as `max_sequence_length` says (diffusers 0.35: the tokenizer's length, whatever it says)."""
    embeds = pipe.encode_prompt(PROMPT, None, None, do_classifier_free_guidance=False,
                                max_sequence_length=max_sequence_length)[0]
    return embeds.shape[1]


def _processors(pipe) -> dict:
    return {n: m.processor for n, m in attention_layers(pipe.transformer).items()}


def test_capture_is_bit_identical_and_maps_every_word(sd3):
    before = _processors(sd3)
    plain = sd3(PROMPT, generator=seeded(), **KW).images
    with AttentionStore(sd3) as store:
        captured = sd3(PROMPT, generator=seeded(), **KW).images
    assert np.array_equal(plain, captured)
    assert _processors(sd3) == before and id(sd3.transformer) not in _INSTALLED
    tokens = store.token_maps()  # (S, H, W): 16 CLIP positions, then the (zero) T5 ones
    length = _text_length(sd3, KW["max_sequence_length"])
    assert length > 16 and tokens.shape == (length, 16, 16) and store.captured_resolutions == [8 // 2]
    assert store.steps_seen == {0, 1, 2}
    maps = store.word_maps(prompt=PROMPT)
    assert list(maps) == PROMPT.split() and all(m.min() >= 0 and m.sum() > 0 for m in maps.values())


def test_maps_are_the_joint_softmax_of_the_layer(sd3, monkeypatch):
    """The image-to-text block `joint_text_probs` computes equals SDPA on the processor's own q, k with one-hot
    values on the text keys (so SDPA returns exactly that block)."""
    layer = next(m for m in attention_layers(sd3.transformer).values() if m.add_k_proj is not None)
    seen, sdpa = {}, F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.setdefault("qk", (q, k))
        return sdpa(q, k, v, **kw)

    hidden, context = torch.randn(2, 16, 16), torch.randn(2, 5, 16)
    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    layer.processor(layer, hidden, encoder_hidden_states=context)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    q, k = seen["qk"]
    onehot = torch.cat([torch.zeros(16, 5), torch.eye(5)])[None, None].expand(2, q.shape[1], -1, -1)
    expected = sdpa(q, k, onehot)[:, :, :16]  # image queries' attention on the 5 text keys
    probs = joint_text_probs(layer, hidden, context)
    assert probs.shape == (2, 2, 16, 5)
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-6)
    assert (probs.sum(-1) < 1).all()  # the rest of each row goes to the image tokens


def test_heatmap_export_on_sd3(sd3, tmp_path):
    with AttentionStore(sd3) as store:
        image = sd3(PROMPT, generator=seeded(), **{**KW, "output_type": "pil"}).images[0]
    meta = heatmaps.export(tmp_path, store, image, PROMPT)
    assert meta["words"] == PROMPT.split() and meta["word_tokens"]["red"] == [2]
    assert (tmp_path / "grid.png").is_file() and (tmp_path / "index.html").is_file()


def test_a_reweight_edits_the_image_rows_as_the_explicit_joint_softmax_would(sd3, monkeypatch):
    """Under a reweight, the layer's image output equals to_out(E @ V) with E the joint probabilities whose
    image-to-text block is scaled by the weights, computed here from the processor's own q, k, v."""
    layer = next(m for m in attention_layers(sd3.transformer).values() if m.add_k_proj is not None)
    hidden, context = torch.randn(2, 16, 16), torch.randn(2, 5, 16)
    weights = torch.tensor([[1.0, 2.0, 0.5, 1.0, 3.0]])
    seen, sdpa = {}, F.scaled_dot_product_attention

    def recording(q, k, v, **kw):
        seen.setdefault("qkv", (q, k, v))
        return sdpa(q, k, v, **kw)

    monkeypatch.setattr(F, "scaled_dot_product_attention", recording)
    with AttentionReweight(sd3, weights):
        out, context_out = layer.processor(layer, hidden, encoder_hidden_states=context)
    monkeypatch.setattr(F, "scaled_dot_product_attention", sdpa)
    q, k, v = (t.double() for t in seen["qkv"])
    probs = (q @ k.transpose(-1, -2) * layer.scale).softmax(-1)[:, :, :16]  # the image queries' rows
    probs[..., 16:] *= weights.double()
    expected = layer.to_out[0]((probs @ v).transpose(1, 2).reshape(2, 16, -1).float())
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
    plain, plain_context = layer.processor(layer, hidden, encoder_hidden_states=context)
    assert torch.equal(context_out, plain_context) and not torch.allclose(out, plain, atol=1e-3)


def test_word_weights_on_sd3(sd3):
    # generate embeds the prompt with the T5 length it is given (KW's), as the pipeline's own call does
    plain = sd3(PROMPT, generator=seeded(), **KW).images
    assert np.array_equal(generate(sd3, PROMPT, generator=seeded(), **KW).images, plain)
    assert np.array_equal(generate(sd3, "a (red:1) circle at the left", generator=seeded(), **KW).images, plain)
    ones = torch.ones(1, _text_length(sd3, KW["max_sequence_length"]))
    with AttentionReweight(sd3, ones):  # the edit path, changing nothing: not a bit
        assert np.array_equal(sd3(PROMPT, generator=seeded(), **KW).images, plain)
    weighted = generate(sd3, "a (red:3) circle at the left", generator=seeded(), **KW).images
    assert not np.allclose(weighted, plain, atol=1e-3)
    with pytest.raises(ValueError, match="on SD3 .* not weight mode 'embedding', AND sub-prompts"):
        generate(sd3, "a red circle AND a square", weight_mode="embedding", **KW)
