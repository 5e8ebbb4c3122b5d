import copy
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


def test_load_text_encoder_reads_clip_folders_and_pipeline_folders_in_fp32(tiny_pipe, tmp_path):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    copy.deepcopy(tiny_pipe.text_encoder).half().save_pretrained(tmp_path / "pipe" / "text_encoder")  # as shipped
    tiny_pipe.tokenizer.save_pretrained(tmp_path / "clip")
    tiny_pipe.text_encoder.save_pretrained(tmp_path / "clip")
    ids, _ = text_mod.tokenize(tiny_pipe.tokenizer, ["a blue square"])
    for folder in ("pipe", "clip"):
        tok, enc = text_mod.load_text_encoder(tmp_path / folder)
        assert enc.dtype == torch.float32 and tok("a blue square").input_ids == ids[0, :5].tolist()
        with torch.no_grad():
            expected = text_mod.encode(tiny_pipe.text_encoder, ids)
            torch.testing.assert_close(text_mod.encode(enc, ids), expected, atol=1e-2 if folder == "pipe" else 0, rtol=0)
