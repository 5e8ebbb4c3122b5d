"""Prompt syntax: weights in both dialects, prompt editing, and word ↔ token alignment."""

import json
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from diffxattn.conditioning import token_weights, word_token_map
from diffxattn.prompt_syntax import MAX_WEIGHT, MIN_WEIGHT, PromptSyntaxError, clean_text, parse_schedule, parse_weights
from diffxattn.prompt_syntax import WeightedSpan as Run

os.environ.setdefault("HF_HUB_OFFLINE", "1")

DOWN = 0.909091  # 1 / 1.1, rounded like every weight


@pytest.mark.parametrize(
    "prompt, runs",
    [
        ("a red circle", [("a red circle", 1.0)]),
        ("  spaced\ttext \n", [("  spaced\ttext \n", 1.0)]),
        ("", []),
        ("()", []),
        # Automatic1111
        ("a (red) circle", [("a ", 1.0), ("red", 1.1), (" circle", 1.0)]),
        ("((red))", [("red", 1.21)]),
        ("[red]", [("red", DOWN)]),
        ("(red:1.5)", [("red", 1.5)]),
        ("( red : 1.5 )", [(" red ", 1.5)]),
        ("(red:0)", [("red", 0.0)]),
        ("(a red circle:0.8)", [("a red circle", 0.8)]),
        ("((red:1.5))", [("red", 1.65)]),
        ("(a (red:2) circle:0.5)", [("a ", 0.5), ("red", 1.0), (" circle", 0.5)]),
        ("(red)(car)", [("redcar", 1.1)]),
        ("a:b", [("a:b", 1.0)]),
        (r"\(red\) \[1\] a\\b", [(r"(red) [1] a\b", 1.0)]),
        (r"a \n b\\", [(r"a \n b" + "\\", 1.0)]),
        (r"C\+\+ (at 5\:30) x\-", [("C++ ", 1.0), ("at 5:30", 1.1), (" x-", 1.0)]),
        (r"C\+\+ (at 5\:30) x\-", [("C++ ", 1.0), ("at 5:30", 1.1), (" x-", 1.0)]),
        # compel
        ("red++ car", [("red", 1.21), (" car", 1.0)]),
        ("a red-", [("a ", 1.0), ("red", 0.9)]),
        ("red+, car", [("red", 1.1), (", car", 1.0)]),
        ("(a red circle)1.3", [("a red circle", 1.3)]),
        ("(red)+", [("red", 1.1)]),
        ("(red)--", [("red", 0.81)]),
        ("(red+)", [("red", 1.21)]),
        ("(a)b+ c", [("ab", 1.1), (" c", 1.0)]),
        # literal '+' and '-'
        ("a left-of b", [("a left-of b", 1.0)]),
        ("red+car", [("red+car", 1.0)]),
        ("a - b +c", [("a - b +c", 1.0)]),
        ("red+-", [("red+-", 1.0)]),
        ("(red)-+", [("red", 1.1), ("-+", 1.0)]),
        ("[red]+", [("red", DOWN), ("+", 1.0)]),
        ("(cat)3d render", [("cat", 1.1), ("3d render", 1.0)]),
        # mixed
        ("(a red+ circle:0.8), blue-- [sky]", [("a ", 0.8), ("red", 0.88), (" circle", 0.8),
                                               (", ", 1.0), ("blue", 0.81), (" ", 1.0), ("sky", DOWN)]),
    ],
)
def test_parse_weights_gives_the_expected_runs(prompt, runs):
    assert parse_weights(prompt) == [Run(text, weight) for text, weight in runs]
    assert clean_text(prompt) == "".join(text for text, _ in runs)


@pytest.mark.parametrize(
    "prompt, column, problem",
    [
        ("a (red", 2, "unclosed '(': expected ')' before the end of the prompt"),
        ("a [red", 2, "unclosed '[': expected ']' before the end of the prompt"),
        ("((red)", 0, "unclosed '(': expected ')' before the end of the prompt"),
        ("red) car", 3, "unmatched ')': expected an opening '(' before it"),
        ("red]", 3, "unmatched ']': expected an opening '[' before it"),
        ("a (red]", 6, "expected ')' to close the '(' at column 2, found ']'"),
        ("(red:abc)", 5, "expected a weight number after ':'"),
        ("(red:)", 5, "expected a weight number after ':'"),
        ("(red: x)", 6, "expected a weight number after ':'"),
        ("(red:1.5 car)", 9, "expected ')' after the weight"),
        ("(red:1.5", 8, "expected ')' after the weight"),
        ("(red:1.5)+", 9, "weight given twice: use either '(text:w)' or '(text)w', not both"),
        ("[red:blue:5]", 4, "prompt editing '[a:b:when]' must be expanded by parse_schedule() first"),
    ],
)
def test_malformed_weights_raise_with_a_caret_under_the_column_when_strict(prompt, column, problem):
    with pytest.raises(PromptSyntaxError) as info:
        parse_weights(prompt, strict=True)
    assert str(info.value).splitlines() == [f"column {column}: {problem}", prompt, " " * column + "^"]
    assert info.value.column == column


@pytest.mark.parametrize(
    "prompt, column, weight",
    [("(red:11)", 5, "11"), ("(red:-1)", 5, "-1"), ("(red)12", 5, "12"), ("a ((red:9.5))", 4, "10.45")],
)
def test_weights_outside_the_range_are_refused_naming_it(prompt, column, weight):
    with pytest.raises(PromptSyntaxError) as info:
        parse_weights(prompt)
    problem = f"weight {weight} is outside the allowed range [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}]"
    assert str(info.value).splitlines() == [f"column {column}: {problem}", prompt, " " * column + "^"]


def test_caret_accounts_for_control_characters_shown_escaped():
    with pytest.raises(PromptSyntaxError) as info:
        parse_weights("a\tb)", strict=True)
    assert str(info.value).splitlines()[1:] == [r"a\tb)", "    ^"]


@pytest.mark.parametrize(
    "prompt, expected",
    [
        ("a cat", [(10, "a cat")]),
        ("a [dog:cat:5]", [(5, "a dog"), (10, "a cat")]),
        ("a [dog:cat: 5 ]", [(5, "a dog"), (10, "a cat")]),
        ("a [dog:cat:0.3]", [(3, "a dog"), (10, "a cat")]),
        ("a [dog:cat:2.7]", [(2, "a dog"), (10, "a cat")]),
        ("a [hat:2] cat", [(2, "a  cat"), (10, "a hat cat")]),
        ("a [hat::0.5] cat", [(5, "a hat cat"), (10, "a  cat")]),
        ("[a:b:0]", [(10, "b")]),
        ("[a:b:20]", [(10, "a")]),
        ("[a:b:3] [c:d:7]", [(3, "a c"), (7, "b c"), (10, "b d")]),
        ("[a:[b:c:7]:3]", [(3, "a"), (7, "b"), (10, "c")]),
        ("[[b:c:7]:a:3]", [(3, "b"), (10, "a")]),
        ("[[a:b:5]]", [(5, "[a]"), (10, "[b]")]),
        ("(red:1.5) [(blue:2):green:5]", [(5, "(red:1.5) (blue:2)"), (10, "(red:1.5) green")]),
        (r"\[a:b:5\] [red]", [(10, r"\[a:b:5\] [red]")]),
        (r"[at 5\:30]", [(10, r"[at 5\:30]")]),
        (r"[at 5\:30]", [(10, r"[at 5\:30]")]),
    ],
)
def test_parse_schedule_expands_prompt_editing(prompt, expected):
    assert parse_schedule(prompt, steps=10) == expected


@pytest.mark.parametrize(
    "prompt, column, problem",
    [
        ("[a:b:x]", 5, "expected a step number or a fraction of the steps"),
        ("[a:b:]", 5, "expected a step number or a fraction of the steps"),
        ("[time: 5pm]", 8, "expected ']' after the step"),
        ("[a:b:5", 0, "unclosed '[': expected ']' before the end of the prompt"),
        ("a [b:c:5]]", 9, "unmatched ']': expected an opening '[' before it"),
        ("([a:b:5]", 0, "unclosed '(': expected ')' before the end of the prompt"),
        ("[a:(b]:5]", 5, "expected ')' to close the '(' at column 3, found ']'"),
    ],
)
def test_malformed_schedules_raise_with_a_caret_under_the_column_when_strict(prompt, column, problem):
    with pytest.raises(PromptSyntaxError) as info:
        parse_schedule(prompt, steps=10, strict=True)
    assert str(info.value).splitlines() == [f"column {column}: {problem}", prompt, " " * column + "^"]


def test_schedule_texts_feed_parse_weights():
    texts = [text for _, text in parse_schedule("a [(red:1.5):blue+:4] car", steps=8)]
    assert [parse_weights(t)[1] for t in texts] == [Run("red", 1.5), Run("blue", 1.1)]


SYNTAX_CHARS = list("()[]:\\+-.019 ab") + ["😀", "\x00", "\n"]
SYNTAX_HEAVY = st.text(alphabet=st.sampled_from(SYNTAX_CHARS), max_size=30)
ANY_TEXT = st.one_of(st.text(), SYNTAX_HEAVY)
PLAIN_TEXT = st.text(
    alphabet=st.characters(blacklist_characters="()[]\\+-", blacklist_categories=["Cs"]), min_size=1
)


@pytest.mark.filterwarnings("ignore::diffxattn.prompt_syntax.PromptSyntaxWarning")  # lenient readings
@settings(max_examples=200, deadline=None)
@given(ANY_TEXT)
def test_parse_weights_returns_runs_or_raises_prompt_syntax_error(prompt):
    try:
        runs = parse_weights(prompt)
    except PromptSyntaxError as err:
        assert str(err).splitlines()[-1].endswith("^")
        return
    assert all(r.text and MIN_WEIGHT <= r.weight <= MAX_WEIGHT for r in runs)
    assert all(a.weight != b.weight for a, b in zip(runs, runs[1:]))


@pytest.mark.filterwarnings("ignore::diffxattn.prompt_syntax.PromptSyntaxWarning")  # lenient readings
@settings(max_examples=200, deadline=None)
@given(ANY_TEXT, st.integers(1, 50))
def test_parse_schedule_returns_a_schedule_or_raises_prompt_syntax_error(prompt, steps):
    try:
        schedule = parse_schedule(prompt, steps)
    except PromptSyntaxError:
        return
    ends = [end for end, _ in schedule]
    assert ends == sorted(set(ends)) and ends[-1] == steps and ends[0] >= 1


@settings(max_examples=200, deadline=None)
@given(PLAIN_TEXT)
def test_text_without_syntax_is_one_unweighted_run(prompt):
    assert parse_weights(prompt) == [Run(prompt, 1.0)]
    assert parse_schedule(prompt, steps=7) == [(7, prompt)]


# --- token alignment on a tiny real CLIP tokenizer --------------------------------------------

MERGES = ["r e", "re d</w>", "c r", "i m", "s o", "so n</w>"]  # "red</w>" one token; "crimson" three


@pytest.fixture(scope="module")
def clip_tokenizer(tmp_path_factory):
    from transformers import CLIPTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    base = list(bytes_to_unicode().values())
    vocab: dict[str, int] = {}
    for token in base + [b + "</w>" for b in base] + [m.replace(" ", "") for m in MERGES]:
        vocab.setdefault(token, len(vocab))
    vocab.update({"<|startoftext|>": len(vocab), "<|endoftext|>": len(vocab) + 1})
    folder = tmp_path_factory.mktemp("clip")
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(MERGES) + "\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


class SlowView:
    """The slow-tokenizer surface (no offsets) over the real tokenizer, to test that path."""

    is_fast = False

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text):
        return self.tokenizer.tokenize(text)

    def convert_tokens_to_ids(self, tokens):
        return self.tokenizer.convert_tokens_to_ids(tokens)

    def convert_tokens_to_string(self, tokens):
        return self.tokenizer.convert_tokens_to_string(tokens)


def test_tiny_tokenizer_splits_crimson_but_not_red(clip_tokenizer):
    assert clip_tokenizer.tokenize("red crimson") == ["red</w>", "cr", "im", "son</w>"]


@pytest.mark.parametrize("view", [lambda t: t, SlowView], ids=["fast", "slow"])
def test_word_token_map_gives_every_token_of_a_multi_token_word(clip_tokenizer, view):
    assert word_token_map("A Crimson red", view(clip_tokenizer)) == [
        ("A", [1]), ("Crimson", [2, 3, 4]), ("red", [5]),
    ]


@pytest.mark.parametrize("view", [lambda t: t, SlowView], ids=["fast", "slow"])
def test_word_token_map_lists_a_repeated_word_per_occurrence(clip_tokenizer, view):
    words = word_token_map("red, it's red", view(clip_tokenizer))
    assert words == [("red", [1]), (",", [2]), ("it", [3, 4]), ("'s", [5, 6]), ("red", [7])]


@pytest.mark.parametrize("view", [lambda t: t, SlowView], ids=["fast", "slow"])
def test_token_weights_put_each_runs_weight_on_its_tokens(clip_tokenizer, view):
    ids, weights, tokens = token_weights("a (crimson:1.5) red+", view(clip_tokenizer))
    assert ids == clip_tokenizer("a crimson red", add_special_tokens=False)["input_ids"]
    assert tokens == ["a</w>", "cr", "im", "son</w>", "red</w>"]
    assert weights == [1.0, 1.5, 1.5, 1.5, 1.1]


@pytest.mark.parametrize("view", [lambda t: t, SlowView], ids=["fast", "slow"])
def test_a_word_split_across_runs_takes_its_first_characters_weight(clip_tokenizer, view):
    ids, weights, tokens = token_weights("(cr)imson [crim]son", view(clip_tokenizer))
    assert tokens == ["cr", "im", "son</w>"] * 2
    assert weights == [1.1] * 3 + [DOWN] * 3
