r"""Automatic1111 prompts read as Automatic1111 reads them: lenient brackets, [a|b] alternation, AND, BREAK,
emphasis modes, and a differential test of `parse_weights` against a reference written here from A1111's
documented attention semantics (wiki, Features > Attention/emphasis):

(x) ×1.1, [x] ÷1.1, (x:w) = w, nesting multiplies, \( \) \[ \] \\ are literal, brackets still open at the end
are closed there, a closing bracket with none of its kind open is text, adjacent runs of one weight merge.
"""

import random
import re
import warnings

import numpy as np
import pytest
import torch

from diffxattn.cli import main, weight_options
from diffxattn.conditioning import TokenizedPrompt, encode, weighted_embeddings
from diffxattn.generation import generate
from diffxattn.prompt_syntax import (PromptSyntaxError, PromptSyntaxWarning, WeightedSpan, break_columns,
                                     parse_schedule, parse_weights, split_and, split_breaks)

HOUSE = "a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."  # A1111's own example: the '(' at 2 stays open
UNCLOSED = "unclosed '(': expected ')' before the end of the prompt"

# --- the reference ----------------------------------------------------------------------------------

_REF_WEIGHT = re.compile(r":\s*([+-]?(?:\d+\.?\d*|\.\d+))\s*\)")


def reference_weights(prompt: str) -> list[tuple[str, float]]:
    """A1111's documented attention-weight semantics, character by character, then merged into runs."""
    chars: list[str] = []
    weights: list[float] = []
    open_round: list[int] = []  # where each open bracket's text starts in `chars`
    open_square: list[int] = []

    def scale(start: int, factor: float) -> None:
        for k in range(start, len(weights)):
            weights[k] *= factor

    i = 0
    while i < len(prompt):
        c = prompt[i]
        if c == "\\" and prompt[i + 1 : i + 2] in ("(", ")", "[", "]", "\\"):
            chars.append(prompt[i + 1])
            weights.append(1.0)
            i += 2
            continue
        m = _REF_WEIGHT.match(prompt, i) if c == ":" and open_round else None
        if m:  # ':w)' gives the latest '(' the weight w instead of 1.1
            scale(open_round.pop(), float(m.group(1)))
            i = m.end()
            continue
        if c == "(":
            open_round.append(len(chars))
        elif c == "[":
            open_square.append(len(chars))
        elif c == ")" and open_round:
            scale(open_round.pop(), 1.1)
        elif c == "]" and open_square:
            scale(open_square.pop(), 1 / 1.1)
        else:  # text, stray closers included
            chars.append(c)
            weights.append(1.0)
        i += 1
    for start in open_round:  # still open at the end: closed there
        scale(start, 1.1)
    for start in open_square:
        scale(start, 1 / 1.1)
    runs: list[tuple[str, float]] = []
    for ch, w in zip(chars, weights):
        if runs and abs(runs[-1][1] - w) < 1e-9:
            runs[-1] = (runs[-1][0] + ch, runs[-1][1])
        else:
            runs.append((ch, w))
    return runs


def per_char(runs) -> tuple[str, list[float]]:
    pairs = [(r.text, r.weight) if isinstance(r, WeightedSpan) else r for r in runs]
    return "".join(t for t, _ in pairs), [w for t, w in pairs for _ in t]


def assert_same_weights(prompt: str) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptSyntaxWarning)
        ours = per_char(parse_weights(prompt))
    ref = per_char(reference_weights(prompt))
    assert ours[0] == ref[0], prompt
    assert np.allclose(ours[1], ref[1], rtol=0, atol=1e-6), prompt


# --- A1111's documentation examples -----------------------------------------------------------------

DOCUMENTED = [  # prompt, A1111's documented reading
    ("normal text", [("normal text", 1.0)]),
    ("an (important) word", [("an ", 1.0), ("important", 1.1), (" word", 1.0)]),
    ("(unbalanced", [("unbalanced", 1.1)]),
    (r"\(literal\]", [("(literal]", 1.0)]),
    ("(unnecessary)(parens)", [("unnecessaryparens", 1.1)]),
    (HOUSE, [("a ", 1.0), ("house", 1.573), (" ", 1.1), ("on", 1.0), (" a ", 1.1), ("hill", 0.55),
             (", sun, ", 1.1), ("sky", 1.4641), (".", 1.1)]),
    ("a (word)", [("a ", 1.0), ("word", 1.1)]),
    ("a ((word))", [("a ", 1.0), ("word", 1.21)]),
    ("a [word]", [("a ", 1.0), ("word", 1 / 1.1)]),
    ("a (word:1.5)", [("a ", 1.0), ("word", 1.5)]),
    ("a (word:0.25)", [("a ", 1.0), ("word", 0.25)]),
    (r"a \(word\)", [("a (word)", 1.0)]),
    ("a word) here]", [("a word) here]", 1.0)]),
    ("[[dim", [("dim", 1 / 1.21)]),
]


@pytest.mark.parametrize("prompt, runs", DOCUMENTED)
def test_documented_examples_read_as_a1111_documents_them(prompt, runs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", PromptSyntaxWarning)
        ours = per_char(parse_weights(prompt))
    expected = per_char(runs)
    assert ours[0] == expected[0] and np.allclose(ours[1], expected[1], rtol=0, atol=1e-6)
    assert_same_weights(prompt)


WORDS = ["cat", "red hat", "a", "sky", "tall tree", "x"]


def random_prompt(rng: random.Random, *, lenient: bool) -> str:
    """Well-nested A1111 syntax; with `lenient`, also brackets left open at the end and stray closers where
    no bracket of their kind is open. No compel syntax: no '+'/'-', no number right after ')'."""
    out, stack = [], []
    for _ in range(rng.randint(1, 14)):
        r = rng.random()
        if r < 0.22 and len(stack) < 4:
            stack.append(rng.choice("(["))
            out.append(stack[-1])
        elif r < 0.42 and stack:
            opener = stack.pop()
            if opener == "(" and rng.random() < 0.4:
                out.append(rng.choice([":{:.2f}", ": {:.1f} ", ":{:g}", ":{:.1f}"]).format(rng.uniform(0.1, 1.6)) + ")")
            else:
                out.append(")" if opener == "(" else "]")
        elif r < 0.5:
            out.append(rng.choice([r"\(", r"\)", r"\[", r"\]", "\\\\"]))
        elif r < 0.55 and lenient:
            kinds = [c for c, o in ((")", "("), ("]", "[")) if o not in stack]
            out.append(rng.choice(kinds) if kinds else " ")
        else:
            out.append(rng.choice(WORDS) + rng.choice(["", " ", ", "]))
    if not lenient:
        out += [")" if o == "(" else "]" for o in reversed(stack)]
    return "".join(out)


@pytest.mark.parametrize("lenient", [False, True])
def test_parse_weights_matches_the_reference_on_random_prompts(lenient):
    rng = random.Random(1111 + lenient)
    prompts = [random_prompt(rng, lenient=lenient) for _ in range(300)]
    assert sum("(" in p for p in prompts) > 150 and sum(":" in p for p in prompts) > 30
    for prompt in prompts:
        assert_same_weights(prompt)


def test_compel_syntax_is_where_the_readings_differ():
    # documented difference: A1111 has no compel syntax, so '(a)1.3' and 'a+' are text there
    assert parse_weights("(red)1.3") == [WeightedSpan("red", 1.3)]
    assert reference_weights("(red)1.3") == [("red", 1.1), ("1.3", 1.0)]
    assert parse_weights("red+ car") == [WeightedSpan("red", 1.1), WeightedSpan(" car", 1.0)]
    assert reference_weights("red+ car") == [("red+ car", 1.0)]


def test_crossed_brackets_are_read_as_a_stray_closer():
    # A1111 pairs the ']' with the outer '['; here a closer that does not close the innermost bracket is text
    with pytest.warns(PromptSyntaxWarning):
        assert per_char(parse_weights("[a (b] c)"))[0] == "a b] c"


# --- lenient readings warn; strict ones raise --------------------------------------------------------


def warned(call, *args, **kwargs):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = call(*args, **kwargs)
    return result, [str(w.message).splitlines() for w in caught if w.category is PromptSyntaxWarning]


def caret(prompt: str, column: int, problem: str) -> list[str]:
    return [f"column {column}: {problem}", prompt, " " * column + "^"]


@pytest.mark.parametrize("prompt, runs, column, problem", [
    ("a (red", [("a ", 1.0), ("red", 1.1)], 2, UNCLOSED),
    ("a [red", [("a ", 1.0), ("red", 0.909091)], 2, "unclosed '[': expected ']' before the end of the prompt"),
    ("red) car", [("red) car", 1.0)], 3, "unmatched ')': expected an opening '(' before it"),
    ("(red:abc)", [("red:abc", 1.1)], 5, "expected a weight number after ':'"),
    ("(red:1.5 car)", [("red:1.5 car", 1.1)], 9, "expected ')' after the weight"),
    ("(red:1.5)+", [("red", 1.5), ("+", 1.0)], 9, "weight given twice: use either '(text:w)' or '(text)w', not both"),
])
def test_what_a1111_accepts_is_read_its_way_with_a_caret_warning(prompt, runs, column, problem):
    result, messages = warned(parse_weights, prompt)
    assert result == [WeightedSpan(t, w) for t, w in runs]
    assert messages[0] == caret(prompt, column, problem)
    with pytest.raises(PromptSyntaxError) as info:
        parse_weights(prompt, strict=True)
    assert str(info.value).splitlines() == caret(prompt, column, problem)


def test_the_house_example_warns_once_at_the_open_bracket_and_strict_refuses_it():
    _, messages = warned(parse_weights, HOUSE)
    assert messages == [caret(HOUSE, 2, UNCLOSED)]
    schedule, messages = warned(parse_schedule, HOUSE, 10)
    assert messages == [caret(HOUSE, 2, UNCLOSED)] and schedule == [(10, HOUSE + ")")]
    assert warned(parse_weights, schedule[0][1])[1] == []  # the text spells the reading out: no second warning
    with pytest.raises(PromptSyntaxError, match="column 2: unclosed"):
        parse_schedule(HOUSE, 10, strict=True)


def test_weights_out_of_range_stay_errors():
    with pytest.raises(PromptSyntaxError, match=r"weight 11 is outside the allowed range \[0, 10\]"):
        parse_weights("(red:11)")


@pytest.mark.parametrize("prompt, texts, column, problem", [
    ("a (red [dog:cat:5]", ["a (red dog)", "a (red cat)"], 2, UNCLOSED),
    ("[time: 5pm]", [r"[time\: 5pm]"], 8, "expected ']' after the step"),
    ("[a:b:5", [r"[a\:b\:5]"], 0, "unclosed '[': expected ']' before the end of the prompt"),
    ("a [cat|dog", [r"a [cat\|dog]"], 2, "unclosed '[': expected ']' before the end of the prompt"),
    ("x] [a:b:5]", [r"x\] a", r"x\] b"], 1, "unmatched ']': expected an opening '[' before it"),
])
def test_schedules_read_malformed_brackets_leniently(prompt, texts, column, problem):
    schedule, messages = warned(parse_schedule, prompt, 10)
    assert [t for _, t in schedule] == texts and messages[0] == caret(prompt, column, problem)
    with pytest.raises(PromptSyntaxError) as info:
        parse_schedule(prompt, 10, strict=True)
    assert str(info.value).splitlines() == caret(prompt, column, problem)


def test_a_schedule_text_reads_as_the_prompt_does_without_a_second_warning():
    rng = random.Random(7)
    for _ in range(200):
        prompt = random_prompt(rng, lenient=True)
        direct, _ = warned(parse_weights, prompt)
        ((_, text),), _ = warned(parse_schedule, prompt, 3)
        again, messages = warned(parse_weights, text)
        assert again == direct and messages == [], prompt


# --- [a|b] alternation ------------------------------------------------------------------------------------


def texts_per_step(prompt: str, steps: int) -> list[str]:
    schedule = parse_schedule(prompt, steps)
    return [next(t for end, t in schedule if s < end) for s in range(steps)]


def test_alternation_switches_every_step():
    assert texts_per_step("a [cat|dog]", 5) == ["a cat", "a dog", "a cat", "a dog", "a cat"]
    assert texts_per_step("[a|b|c]", 4) == ["a", "b", "c", "a"]
    assert texts_per_step("[a|]x", 3) == ["ax", "x", "ax"]
    # a nested alternation counts the same steps: at odd steps it is at its second option too
    assert texts_per_step("[(cat:1.5)|[dog|bird]]", 4) == ["(cat:1.5)", "bird", "(cat:1.5)", "bird"]
    assert texts_per_step("[a|[b|c|d]]", 4) == ["a", "c", "a", "b"]
    assert texts_per_step("[[cat|dog]:bird:3]", 4) == ["cat", "dog", "cat", "bird"]
    assert parse_schedule("a [cat|dog]", 4) == [(1, "a cat"), (2, "a dog"), (3, "a cat"), (4, "a dog")]


def test_an_escaped_or_outside_pipe_is_text():
    assert parse_schedule(r"[cat\|dog] a | b", 3) == [(3, r"[cat\|dog] a | b")]
    assert parse_weights(r"[cat\|dog] a | b") == [WeightedSpan("cat|dog", 0.909091), WeightedSpan(" a | b", 1.0)]


def test_generate_alternates_the_prompt(tiny_pipe):
    image = lambda prompt: generate(tiny_pipe, prompt, generator=_seed(), num_inference_steps=4, guidance_scale=1.0,
                                    output_type="np").images
    red, blue, both = image("a red circle"), image("a blue circle"), image("a [red|blue] circle")
    assert not np.array_equal(both, red) and not np.array_equal(both, blue)
    assert np.array_equal(image("a [red|red] circle"), red)


# --- AND and BREAK ------------------------------------------------------------------------------------


def test_split_and_gives_sub_prompts_and_weights():
    assert split_and("a cat AND a dog :0.5") == [("a cat", 1.0), ("a dog", 0.5)]
    assert split_and("(red:1.5) cat:1.2 AND dog :-0.5 AND [a:b:5]") == [("(red:1.5) cat", 1.2), ("dog", -0.5),
                                                                        ("[a:b:5]", 1.0)]
    assert split_and("a cat and a dog, ANDROID") == [("a cat and a dog, ANDROID", 1.0)]


@pytest.mark.parametrize("prompt, column", [("a cat AND a dog :", 17), ("a cat :0.5x AND dog", 7)])
def test_a_malformed_and_weight_is_text_with_a_warning_naming_the_column(prompt, column):
    parts, messages = warned(split_and, prompt)
    assert messages == [caret(prompt, column, "expected a weight number after ':'")]
    assert all(w == 1.0 for _, w in parts)
    with pytest.raises(PromptSyntaxError, match=f"column {column}: "):
        split_and(prompt, strict=True)


def test_break_splits_the_weighted_text_into_chunks():
    prompt = "a (red BREAK circle) BREAK sky, BREAKFAST break"
    assert break_columns(prompt) == [7, 21]
    assert split_breaks(prompt) == [[WeightedSpan("a ", 1.0), WeightedSpan("red", 1.1)],
                                    [WeightedSpan("circle", 1.1)], [WeightedSpan("sky, BREAKFAST break", 1.0)]]


# --- emphasis modes and the command line ----------------------------------------------------------------


def test_a1111_emphasis_names_map_to_weight_modes(tiny_pipe):
    kw = dict(num_inference_steps=2, guidance_scale=1.0, output_type="np")
    image = lambda prompt, **options: generate(tiny_pipe, prompt, generator=_seed(), **options, **kw).images
    plain, prompt = image("a red circle"), "a (red:1.8) circle"
    assert np.array_equal(image(prompt, **weight_options("ignore")), plain)
    original = image(prompt, **weight_options("original"))
    assert np.array_equal(original, image(prompt, weight_mode="embedding-a1111")) and not np.array_equal(original, plain)
    assert not np.array_equal(image(prompt, **weight_options("no-norm")), plain)


def test_no_norm_scales_the_embeddings_and_keeps_the_scale(tiny_pipe):
    tokens = TokenizedPrompt.of(tiny_pipe.tokenizer, "a (red:1.8) circle")
    z, _ = encode(tiny_pipe, [tokens.clean])
    no_norm, _ = weighted_embeddings(tiny_pipe, [tokens], "a1111-no-norm")
    assert torch.equal(no_norm, z * torch.tensor(tokens.weights)[None, :, None])
    assert tokens.weights[tokens.positions("red")[0]] == 1.8
    # Original restores the mean over the prompt; this encoder's final LayerNorm has no bias, so every token's
    # embedding has mean 0 and the two coincide here (CLIP's do not)


def _seed():
    return torch.Generator().manual_seed(0)


def test_cli_warns_once_and_goes_on_or_refuses_when_strict(tiny_pipe, tmp_path, capsys):
    tiny_pipe.save_pretrained(tmp_path / "pipe")
    capsys.readouterr()
    args = ["generate", "a (red circle", "--pipeline", str(tmp_path / "pipe"), "--steps", "2",
            "--weight-mode", "No norm", "-o", str(tmp_path / "x.png")]
    assert main(args) == 0 and (tmp_path / "x.png").is_file()
    err = capsys.readouterr().err.splitlines()
    assert err == ["diffxattn generate: warning: column 2: " + UNCLOSED, "a (red circle", "  ^"]
    assert main([*args, "--strict"]) == 2
    assert capsys.readouterr().err.splitlines() == ["diffxattn generate: error: column 2: " + UNCLOSED,
                                                    "a (red circle", "  ^"]
