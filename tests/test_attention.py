import torch

from diffxattn.control.processor import attention_layers
from diffxattn.models import attention
from diffxattn.models.attention import TransformerBlock, attention_inputs, attention_probs, make_attention
from conftest import seeded, tiny_pipeline, tiny_unet


def test_padded_tokens_get_exactly_zero_probability():
    torch.manual_seed(0)
    attn = make_attention(16, heads=2, cross_attention_dim=8)
    x, ctx = torch.randn(2, 10, 16), torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    probs = attention_probs(attention_inputs(attn, x, ctx, mask), attn.scale)  # (B, heads, N, S)
    assert probs.shape == (2, 2, 10, 6)
    assert torch.all(probs[0, :, :, 3:] == 0) and torch.all(probs[1, :, :, 5:] == 0)
    assert torch.all(probs[0, :, :, :3] > 0)
    torch.testing.assert_close(probs.sum(-1), torch.ones(2, 2, 10))


def test_sdpa_processor_matches_explicit_softmax():
    torch.manual_seed(0)
    attn = make_attention(16, heads=4, cross_attention_dim=8)
    x, ctx = torch.randn(3, 10, 16), torch.randn(3, 6, 8)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[:, 4:] = False
    inputs = attention_inputs(attn, x, ctx, mask)
    explicit = attention_probs(inputs, attn.scale) @ inputs.v  # (B, heads, N, d)
    explicit = attn.to_out[0](explicit.transpose(1, 2).reshape(3, 10, 16))
    torch.testing.assert_close(attn(x, ctx, attention_mask=mask), explicit, atol=1e-5, rtol=1e-5)


def test_unet_output_ignores_padding_content():
    unet = tiny_unet().eval()
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([10, 500])
    ctx = torch.randn(2, 8, 32)
    mask = torch.ones(2, 8, dtype=torch.bool)
    mask[:, 5:] = False
    other = ctx.clone()
    other[:, 5:] = torch.randn(2, 3, 32) * 100
    with torch.no_grad():
        a = unet(x, t, ctx, encoder_attention_mask=mask).sample
        b = unet(x, t, other, encoder_attention_mask=mask).sample
        c = unet(x, t, other).sample  # unmasked: the padding now matters
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_zero_gate_makes_cross_attention_the_identity():
    torch.manual_seed(0)
    block = TransformerBlock(16, heads=2, cross_attention_dim=8, self_attention=False, gated=True)
    h = torch.randn(2, 16, 4, 4)
    ctx_a, ctx_b = torch.randn(2, 5, 8), torch.randn(2, 5, 8)
    without = TransformerBlock(16, heads=2, cross_attention_dim=None, self_attention=False)
    without.load_state_dict({k: v for k, v in block.state_dict().items() if "attn2" not in k and "norm2" not in k
                             and k != "gate"})
    with torch.no_grad():
        assert torch.equal(block(h, ctx_a), block(h, ctx_b))
        assert torch.equal(block(h, ctx_a), without(h))
        block.gate.fill_(0.5)  # an open gate lets the text in
        assert not torch.allclose(block(h, ctx_a), block(h, ctx_b))


def _counting(monkeypatch, cache: bool) -> list:
    """Count how often the text's keys and values are computed; `cache=False` computes them at every call."""
    calls = []
    compute = attention._keys_values

    def counted(*args):
        calls.append(1)
        return compute(*args)

    monkeypatch.setattr(attention, "_keys_values", counted)
    if not cache:
        monkeypatch.setattr(attention, "text_keys_values", lambda attn, text, fn: fn())
    return calls


def _run(pipe):
    return pipe(["a red circle at the left", "a blue square"], generator=seeded(0, 2), output_type="pt").images


def test_text_keys_values_are_computed_once_per_run_and_images_are_bit_identical(tiny_text, monkeypatch):
    pipe = tiny_pipeline(tiny_text, default_guidance_scale=3.0)
    names = list(attention_layers(pipe.unet))
    layers, self_layers = sum(n.endswith("attn2") for n in names), sum(n.endswith("attn1") for n in names)
    with monkeypatch.context() as m:
        uncached_calls = _counting(m, cache=False)
        uncached = _run(pipe)
    cached_calls = _counting(monkeypatch, cache=True)
    cached = _run(pipe)
    # self-attention's keys and values come from the image: computed at each of the 4 steps either way
    assert len(uncached_calls) == (layers + self_layers) * 4
    assert len(cached_calls) == layers + self_layers * 4  # the text's: once per layer for the run
    assert torch.equal(cached, uncached)
    _run(pipe)  # a new run encodes its prompts again: a new text tensor, computed once more per layer
    assert len(cached_calls) == 2 * (layers + self_layers * 4)


def test_text_keys_values_are_computed_once_per_run_with_a_guidance_interval(tiny_text, monkeypatch):
    """Steps outside the guidance interval run the conditional rows alone: one more text tensor for the run, not
    a new one at every such step."""
    pipe = tiny_pipeline(tiny_text, default_guidance_scale=3.0)
    names = list(attention_layers(pipe.unet))
    layers, self_layers = sum(n.endswith("attn2") for n in names), sum(n.endswith("attn1") for n in names)

    def run():
        return pipe(["a red circle at the left", "a blue square"], generator=seeded(0, 2), output_type="pt",
                    num_inference_steps=6, guidance_interval=(0, 0.5)).images

    with monkeypatch.context() as m:
        _counting(m, cache=False)
        uncached = run()
    calls = _counting(monkeypatch, cache=True)
    assert torch.equal(run(), uncached)
    assert len(calls) == 2 * layers + self_layers * 6  # guided steps' text, then the conditional rows'


def test_text_keys_values_follow_weight_changes(tiny_text, monkeypatch):
    pipe = tiny_pipeline(tiny_text, default_guidance_scale=3.0)
    text = torch.randn(2, 5, 32)
    original = text.clone()
    x = torch.randn(2, 3, 16, 16)
    attn = pipe.unet.down_blocks[0].attentions[0].attn2
    with torch.no_grad():
        before = pipe.unet(x, 10, text).sample
        attn.to_k.weight.mul_(1.5)  # in place, as an optimizer step or load_state_dict does
        after = pipe.unet(x, 10, text).sample
        text.add_(0.1)  # the text itself changed in place
        changed_text = pipe.unet(x, 10, text).sample
        monkeypatch.setattr(attention, "text_keys_values", lambda attn, text, fn: fn())
        assert torch.equal(after, pipe.unet(x, 10, original).sample)
        assert torch.equal(changed_text, pipe.unet(x, 10, text).sample)
    assert not torch.equal(before, after)


def test_text_keys_values_are_not_cached_with_autograd(tiny_text):
    unet = tiny_unet()
    text = torch.randn(1, 5, 32)
    unet(torch.randn(1, 3, 16, 16), 10, text).sample.sum().backward()
    assert unet.down_blocks[0].attentions[0].attn2.to_k.weight.grad.abs().sum() > 0
    assert not any(attn in attention._TEXT_KV for attn in unet.modules())
