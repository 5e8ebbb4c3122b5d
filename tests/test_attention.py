import torch

from diffxattn.models.attention import TransformerBlock, attention_inputs, attention_probs, make_attention
from conftest import tiny_unet


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
