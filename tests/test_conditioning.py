"""Text conditioning: one prompt parsed and tokenized once, encoded the same way on both pipelines."""

import importlib

import pytest
import torch

from diffxattn.conditioning import TokenizedPrompt, encode, masks_padding, weight_rows

LONG = "a red circle left of a blue square above a green triangle below a yellow diamond"


def test_a_tokenized_prompt_has_clean_text_ids_words_and_weights(tiny_pipe):
    tok = tiny_pipe.tokenizer
    t = TokenizedPrompt.of(tok, "a (red:1.5) crimson circle")
    assert t.clean == "a red crimson circle" and t.ids == tok("a red crimson circle").input_ids
    assert [w for w, _ in t.words] == ["a", "red", "crimson", "circle"] and t.words[1] == ("red", [2])
    crimson = t.words[2][1]
    assert len(crimson) > 1 and t.words[3][1] == [crimson[-1] + 1]
    assert len(t.weights) == 16 and t.weights[2] == 1.5 and sum(w != 1 for w in t.weights) == 1
    assert t.word_weights() == {"red": 1.5} and t.positions(["red", "circle"]) == [2, t.words[3][1][0]]
    assert TokenizedPrompt.of(tok, t) is t
    assert weight_rows([t, TokenizedPrompt.of(tok, "a circle")]).tolist() == [t.weights, [1.0] * 16]
    assert weight_rows([t], chunks=2).tolist() == [t.weights + [1.0] * 16]  # as many windows as asked


def test_truncation_keeps_the_words_inside_the_window_and_names_the_rest(tiny_pipe):
    tok = tiny_pipe.tokenizer
    t = TokenizedPrompt.of(tok, LONG)
    assert t.ids == tok(LONG, truncation=True, max_length=16).input_ids and len(t.ids) == 16
    assert [w for w, _ in t.words][-2:] == ["below", "a"] and t.words[-1][1] == [14]  # 15 is EOS
    assert t.dropped == ["yellow", "diamond"]


@pytest.mark.parametrize("which", ["tiny_pipe", "sd_pipe"])
def test_encode_gives_each_pipelines_own_embeddings(which, request):
    pipe = request.getfixturevalue(which)
    embeds, mask = encode(pipe, ["a red circle"])
    if masks_padding(pipe):  # ours: padding keys are masked out
        own, own_mask = pipe.encode_prompt(["a red circle"])
        assert torch.equal(mask, own_mask) and mask[0].tolist() == [True] * 5 + [False] * 11
    else:  # Stable Diffusion: its encode_prompt, every position attended
        own, _ = pipe.encode_prompt(["a red circle"], pipe._execution_device, 1, False)
        assert mask.all()
    assert torch.equal(embeds, own)


def test_old_module_and_class_names_still_import():
    from diffxattn import editing, generation, prompt_syntax, prompts
    from diffxattn.models import AttnProcessor, SDPAProcessor

    assert editing.edit is generation.edit and editing.generate is generation.generate
    assert prompts.Run is prompt_syntax.WeightedSpan and prompts.parse_weights is prompt_syntax.parse_weights
    assert prompts.word_token_map is importlib.import_module("diffxattn.conditioning").word_token_map
    assert AttnProcessor is SDPAProcessor


def test_text_without_syntax_keeps_its_brackets(tiny_pipe):
    tok = tiny_pipe.tokenizer
    raw = TokenizedPrompt.of(tok, "a [red circle", syntax=False)  # what encode_prompt gets: no weight syntax
    assert raw.clean == "a [red circle" and raw.ids == tok("a [red circle").input_ids and raw.word_weights() == {}
    assert TokenizedPrompt.of(tok, "a [red] circle").word_weights() == {"red": pytest.approx(1 / 1.1, abs=1e-6)}
