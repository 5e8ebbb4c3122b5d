"""Contrastive CLIP pre-training with NegCLIP's hard negatives, and the binding retrieval it is measured by."""

import torch

from diffxattn.clip_pretrain import contrastive_loss, train_clip
from diffxattn.config import load_config
from diffxattn.data.captions import binding_negatives


def test_binding_negatives_swap_attributes_between_objects_and_mirror_places():
    assert binding_negatives("a red circle left of a blue square") == {
        "colors": "a blue circle left of a red square", "shapes": "a red square left of a blue circle",
        "relation": "a red circle right of a blue square"}
    assert binding_negatives("a small orange square to the left of a red circle")["colors"] == (
        "a small red square to the left of an orange circle")  # articles follow the new words
    assert binding_negatives("a red circle above a blue circle") == {  # same shape: no shape swap
        "colors": "a blue circle above a red circle", "relation": "a red circle below a blue circle"}
    assert binding_negatives("a red circle on the left") == {"position": "a red circle on the right"}
    assert binding_negatives("a red circle in the center") == {} and binding_negatives("a red circle") == {}


def test_hard_negatives_compete_only_for_the_images(tmp_path):
    """The negatives add columns to each image's softmax (image -> text) and nothing to text -> image."""
    cfg = load_config("configs/tiny.yaml")
    from diffxattn.clip_pretrain import clip_config
    from diffxattn.models import text as text_mod

    tokenizer = text_mod.build_tokenizer(["a red circle left of a blue square", "a blue circle left of a red square",
                                          "a green triangle at the top"], tmp_path, 16)
    torch.manual_seed(0)
    from transformers import CLIPModel

    model = CLIPModel(clip_config(cfg, tokenizer))
    pixels = torch.randn(2, 3, 16, 16)
    texts = ["a red circle left of a blue square", "a green triangle at the top"]
    plain, logits = contrastive_loss(model, tokenizer, pixels, texts)
    hard, logits_hard = contrastive_loss(model, tokenizer, pixels, texts, ["a blue circle left of a red square"])
    assert torch.equal(logits, logits_hard) and logits.shape == (2, 2)
    ids, mask = text_mod.tokenize(tokenizer, texts)  # without negatives: transformers' own CLIP loss
    torch.testing.assert_close(plain, model(input_ids=ids, attention_mask=mask, pixel_values=pixels, return_loss=True).loss)
    assert hard > plain  # one more competitor in each image's softmax raises its loss


def test_train_clip_reports_held_out_binding_retrieval(tmp_path):
    cfg = load_config("configs/tiny.yaml", ["text.vocab_captions=200"])
    metrics = train_clip(cfg, tmp_path / "clip", steps=3, batch_size=16, log_every=3, hard_negatives=True)
    retrieval = metrics["binding_retrieval"]
    assert set(retrieval) >= {"colors", "relation", "position", "all"}
    assert all(0.0 <= v <= 1.0 for v in retrieval.values())
    assert (tmp_path / "clip" / "config.json").is_file() and (tmp_path / "clip" / "vocab.json").is_file()
