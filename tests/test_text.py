import json

import torch
from transformers import CLIPTextModel, CLIPTokenizer

from diffxattn.models import text as text_mod
from conftest import CAPTIONS


def test_tokenizer_vocabulary_is_learned_from_captions_in_clip_files(tmp_path):
    tok = text_mod.build_tokenizer(CAPTIONS, tmp_path, max_length=16)
    vocab = json.loads((tmp_path / "vocab.json").read_text())
    assert (tmp_path / "merges.txt").read_text().startswith("#version")
    for word in ("red", "circle", "triangle", "above"):  # frequent caption words become single tokens
        assert tok.tokenize(word) == [word + "</w>"] and word + "</w>" in vocab
    assert len(tok.tokenize("crimson")) > 1  # an unseen word still encodes, from byte-level pieces
    reloaded = CLIPTokenizer.from_pretrained(tmp_path)  # plain transformers class, files unchanged
    assert reloaded("a red circle").input_ids == tok("a red circle").input_ids
    assert reloaded.model_max_length == 16


def test_tokenize_pads_to_max_length_and_masks_padding(tiny_text):
    tok, _ = tiny_text
    ids, mask = text_mod.tokenize(tok, ["a red circle", ""])
    assert ids.shape == mask.shape == (2, 16)
    assert mask[0].tolist() == [True] * 5 + [False] * 11  # BOS a red circle EOS, then padding
    assert mask[1].sum() == 2 and ids[0, 0] == tok.bos_token_id and ids[0, 4] == tok.eos_token_id


def test_text_encoder_round_trips_through_a_folder(tiny_text, tmp_path):
    tok, enc = tiny_text
    enc.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path / "tokenizer")
    loaded = CLIPTextModel.from_pretrained(tmp_path)
    ids, _ = text_mod.tokenize(tok, ["a blue square"])
    with torch.no_grad():
        assert torch.equal(text_mod.encode(enc, ids), text_mod.encode(loaded, ids))
