r"""Prompt syntax: per-word weights and prompt editing over steps (text in, text and numbers out).

Weights (both dialects may be mixed in one prompt):

* Automatic1111: ``(word)`` ×1.1, ``[word]`` ÷1.1, ``(a phrase:1.5)``; nesting multiplies;
  ``\(`` ``\)`` ``\[`` ``\]`` ``\\`` (and ``\:`` ``\+`` ``\-`` ``\|``) are literal characters; any other
  backslash is literal.
* compel: ``word+`` ×1.1 and ``word-`` ×0.9 per sign, ``(a phrase)1.3``, ``(a phrase)+``.

Prompt editing (Automatic1111) ``[from:to:when]`` and alternation ``[a|b]`` are expanded first by
:func:`parse_schedule`; the texts it returns still carry weight syntax for :func:`parse_weights`.

Malformed prompts are read as Automatic1111 reads them: a bracket still open at the end is closed there,
a closing bracket that closes nothing is text, a ':' that starts no weight is text. Each such reading is a
:class:`PromptSyntaxWarning`; ``strict=True`` makes it a :class:`PromptSyntaxError`. Weights outside
[MIN_WEIGHT, MAX_WEIGHT] are always errors (Automatic1111 takes any number).

Composable diffusion's ``AND`` (:func:`split_and`) and the ``BREAK`` keyword (:func:`split_breaks`) are
parsed here; sampling does not use them yet. Order: ``split_and`` the prompt, ``parse_schedule`` each part,
``parse_weights`` (or ``split_breaks``) each text.

>>> parse_weights("(red:1.5) car+")
[WeightedSpan(text='red', weight=1.5), WeightedSpan(text=' ', weight=1.0), WeightedSpan(text='car', weight=1.1)]
>>> parse_schedule("a [dog:cat:0.5]", steps=10)
[(5, 'a dog'), (10, 'a cat')]
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, field

MIN_WEIGHT = 0.0
MAX_WEIGHT = 10.0
MAX_NESTING = 100  # bounds recursion in the schedule parser; no real prompt nests this deep
ERROR_CONTEXT = 60  # characters of the prompt an error shows on each side of the column
PAREN_FACTOR = 1.1
PLUS_FACTOR = 1.1
MINUS_FACTOR = 0.9

_ESCAPABLE = "()[]\\:+-|"  # A1111's five, plus ':' '+' '-' '|' so that C\+\+ and [at 5\:30] are text
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_SIGNED_WEIGHT = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*")
_STEP = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*")
_SIGNS = re.compile(r"[+-]+")
_CLOSERS = {"(": ")", "[": "]"}


def _caret_message(prompt: str, column: int, problem: str) -> str:
    # a window of the prompt around the column: a 1 MB prompt is not repeated in full
    start, end = max(0, column - ERROR_CONTEXT), min(len(prompt), column + ERROR_CONTEXT)
    lead, tail = "…" * (start > 0), "…" * (end < len(prompt))
    shown = [ch if ch.isprintable() else repr(ch)[1:-1] for ch in prompt[start:end]]
    caret = len(lead) + sum(len(s) for s in shown[:column - start])  # escaped control chars widen the line
    return f"column {column}: {problem}\n{lead}{''.join(shown)}{tail}\n{' ' * caret}^"


class PromptSyntaxError(ValueError):
    """Malformed prompt. The message is three lines: the problem, the prompt, a caret under it."""

    def __init__(self, prompt: str, column: int, problem: str):
        self.prompt, self.column, self.problem = prompt, column, problem
        super().__init__(_caret_message(prompt, column, problem))


class PromptSyntaxWarning(UserWarning):
    """A malformed prompt read as Automatic1111 reads it (an unclosed '(' closed at the end, a stray ')' kept as
    text). The message is PromptSyntaxError's three lines; the parse functions raise that error when strict."""

    def __init__(self, prompt: str, column: int, problem: str):
        self.prompt, self.column, self.problem = prompt, column, problem
        super().__init__(_caret_message(prompt, column, problem))


class _Problems:
    """What a parse reads leniently, as Automatic1111 does: raised at once when strict, else warned by `warn`,
    once each, in column order."""

    def __init__(self, prompt: str, strict: bool):
        self.prompt, self.strict, self.found = prompt, strict, set()

    def lenient(self, column: int, problem: str) -> None:
        if self.strict:
            raise PromptSyntaxError(self.prompt, column, problem)
        self.found.add((column, problem))  # a set: a bracket re-read as text reports its contents once

    def warn(self) -> None:
        """Warn each problem; called by the public function, so the warning names its caller's line."""
        for column, problem in sorted(self.found):
            warnings.warn(PromptSyntaxWarning(self.prompt, column, problem), stacklevel=3)


def _check_nesting(prompt: str, column: int, depth: int) -> None:
    if depth > MAX_NESTING:
        raise PromptSyntaxError(prompt, column, f"brackets nested deeper than {MAX_NESTING}")


def _unexpected_closer(prompt: str, column: int, opener: str, opener_column: int) -> tuple[int, str]:
    closer = prompt[column]
    if not opener:
        wanted = {")": "(", "]": "["}[closer]
        return column, f"unmatched '{closer}': expected an opening '{wanted}' before it"
    wanted = _CLOSERS[opener]
    return column, f"expected '{wanted}' to close the '{opener}' at column {opener_column}, found '{closer}'"


def _unclosed(prompt: str, column: int) -> tuple[int, str]:
    opener = prompt[column]
    return column, f"unclosed '{opener}': expected '{_CLOSERS[opener]}' before the end of the prompt"


def _weight_problem(prompt: str, i: int) -> tuple[int, str] | None:
    """What is wrong with the ':w)' of '(text:w)' at prompt[i] == ':', if anything."""
    m = _SIGNED_WEIGHT.match(prompt, i + 1)
    if not m:
        return i + 1 + len(prompt[i + 1 :]) - len(prompt[i + 1 :].lstrip()), "expected a weight number after ':'"
    if m.end() == len(prompt) or prompt[m.end()] != ")":
        return m.end(), "expected ')' after the weight"
    return None


def _check_range(prompt: str, column: int, weight: float) -> None:
    if not MIN_WEIGHT <= weight <= MAX_WEIGHT:
        problem = f"weight {weight:g} is outside the allowed range [{MIN_WEIGHT:g}, {MAX_WEIGHT:g}]"
        raise PromptSyntaxError(prompt, column, problem)


# ---------------------------------------------------------------------------------------------
# Weights
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WeightedSpan:
    """A stretch of prompt text that carries one attention weight."""

    text: str
    weight: float


@dataclass
class _Char:
    ch: str
    column: int  # where it came from in the prompt, for error carets
    weight: float = 1.0


@dataclass
class _Group:
    """An open '(' or '[' (or the whole prompt, opener ''), collecting its characters."""

    opener: str
    column: int
    chars: list[_Char] = field(default_factory=list)
    word_start: int = 0  # chars[word_start:] is the word a compel '+'/'-' would weight
    weight: float | None = None  # explicit '(text:w)'

    def add(self, ch: str, column: int) -> None:
        self.chars.append(_Char(ch, column))
        if ch.isspace():
            self.word_start = len(self.chars)

    def absorb(self, child: _Group, factor: float) -> None:
        for c in child.chars:
            c.weight *= factor
        self.chars.extend(child.chars)
        self.word_start = len(self.chars)  # "(a)b+" weights only "b"


def _ends_weight(prompt: str, i: int) -> bool:
    """A compel suffix counts only before a word boundary: 'left-of' and 'C++x' stay literal."""
    return i == len(prompt) or prompt[i].isspace() or prompt[i] in ",:)]"


def _is_sign_weight(prompt: str, m: re.Match) -> bool:
    # One kind of sign only: a mixed run like "+-" is more likely text than a weight.
    return len(set(m.group())) == 1 and _ends_weight(prompt, m.end())


def _sign_factor(signs: str) -> float:
    return (PLUS_FACTOR if signs[0] == "+" else MINUS_FACTOR) ** len(signs)


def _compel_suffix(prompt: str, i: int) -> tuple[float, int] | None:
    """Weight written right after a ')' ('+', '--', '1.3') and the index after it, if any."""
    m = _SIGNS.match(prompt, i)
    if m and _is_sign_weight(prompt, m):
        return _sign_factor(m.group()), m.end()
    m = _NUMBER.match(prompt, i)
    if m and _ends_weight(prompt, m.end()):
        _check_range(prompt, i, float(m.group()))
        return float(m.group()), m.end()
    return None


def _read_explicit_weight(prompt: str, i: int, top: _Group, problems: _Problems) -> int:
    """Parse ':w' in '(text:w)' at prompt[i] == ':'; returns the index of the closing ')', or of the character
    after a ':' that starts no weight and is text (Automatic1111's reading)."""
    problem = _weight_problem(prompt, i)
    if problem:
        problems.lenient(*problem)
        top.add(":", i)
        return i + 1
    m = _SIGNED_WEIGHT.match(prompt, i + 1)
    top.weight = float(m.group(1))
    _check_range(prompt, m.start(1), top.weight)
    return m.end()


def _close_group(prompt: str, i: int, stack: list[_Group], problems: _Problems) -> int:
    """Handle the ')' or ']' at prompt[i], which closes stack[-1]; returns the index after it and any compel
    suffix."""
    top = stack.pop()
    end = i + 1
    if top.opener == "[":
        factor = 1 / PAREN_FACTOR
    elif (suffix := _compel_suffix(prompt, end)) and top.weight is not None:
        problems.lenient(end, "weight given twice: use either '(text:w)' or '(text)w', not both")
        factor = top.weight  # Automatic1111 reads the suffix as text
    elif suffix:
        factor, end = suffix  # compel parens only group: "(red)+" is 1.1, not 1.21
    else:
        factor = PAREN_FACTOR if top.weight is None else top.weight
    stack[-1].absorb(top, factor)
    return end


def _word_suffix(prompt: str, i: int, top: _Group) -> int:
    """Handle a '+'/'-' run at prompt[i]: compel weight on the word before it, else literal."""
    m = _SIGNS.match(prompt, i)
    word = top.chars[top.word_start :]
    if word and _is_sign_weight(prompt, m):
        for c in word:
            c.weight *= _sign_factor(m.group())
        top.word_start = len(top.chars)
    else:
        for k in range(m.start(), m.end()):
            top.add(prompt[k], k)
    return m.end()


def _merge_runs(prompt: str, chars: list[_Char]) -> list[WeightedSpan]:
    runs: list[tuple[float, list[str]]] = []  # characters joined once at the end: linear in a 1 MB prompt
    for c in chars:
        # Rounding lets equal weights written differently ("((a))", "(a:1.21)") merge.
        weight = round(c.weight, 6)
        _check_range(prompt, c.column, weight)
        if runs and runs[-1][0] == weight:
            runs[-1][1].append(c.ch)
        else:
            runs.append((weight, [c.ch]))
    return [WeightedSpan("".join(text), weight) for weight, text in runs]


def _weighted_chars(prompt: str, problems: _Problems) -> list[_Char]:
    """Each character of the clean text with its weight and its column in the prompt."""
    stack = [_Group("", 0)]
    i = 0
    while i < len(prompt):
        c, top = prompt[i], stack[-1]
        if c == "\\" and i + 1 < len(prompt) and prompt[i + 1] in _ESCAPABLE:
            top.add(prompt[i + 1], i + 1)
            i += 2
        elif c in "([":
            _check_nesting(prompt, i, len(stack))
            stack.append(_Group(c, i))
            i += 1
        elif c in ")]" and _CLOSERS.get(top.opener) == c:
            i = _close_group(prompt, i, stack, problems)
        elif c in ")]":  # closes nothing open: text, as Automatic1111 reads it
            problems.lenient(*_unexpected_closer(prompt, i, top.opener, top.column))
            top.add(c, i)
            i += 1
        elif c == ":" and top.opener == "(":
            i = _read_explicit_weight(prompt, i, top, problems)
        elif c == ":" and top.opener == "[":
            problem = "prompt editing '[a:b:when]' must be expanded by parse_schedule() first"
            raise PromptSyntaxError(prompt, i, problem)
        elif c in "+-":
            i = _word_suffix(prompt, i, top)
        else:
            top.add(c, i)
            i += 1
    while len(stack) > 1:  # Automatic1111 closes what is still open at the end of the prompt
        top = stack.pop()
        problems.lenient(*_unclosed(prompt, top.column))
        stack[-1].absorb(top, PAREN_FACTOR if top.opener == "(" else 1 / PAREN_FACTOR)
    return stack[0].chars


def parse_weights(prompt: str, *, strict: bool = False) -> list[WeightedSpan]:
    """Split a prompt into weighted runs, with the syntax characters removed.

    Adjacent runs of equal weight are merged and whitespace is kept, so
    ``"".join(r.text for r in runs) == clean_text(prompt)``. Weights are rounded to 1e-6.
    Raises PromptSyntaxError for bad numbers, weights outside [MIN_WEIGHT, MAX_WEIGHT] and unexpanded
    prompt editing ('[a:b:when]'). Unbalanced brackets are read as Automatic1111 reads them (an open '('
    weights the rest of the prompt, a stray ')' is text) with a PromptSyntaxWarning each; `strict`: errors.

    >>> parse_weights("((red)) car--")
    [WeightedSpan(text='red', weight=1.21), WeightedSpan(text=' ', weight=1.0),
     WeightedSpan(text='car', weight=0.81)]
    >>> parse_weights("a (red")  # PromptSyntaxWarning: column 2: unclosed '(' ...
    [WeightedSpan(text='a ', weight=1.0), WeightedSpan(text='red', weight=1.1)]
    """
    problems = _Problems(prompt, strict)
    runs = _merge_runs(prompt, _weighted_chars(prompt, problems))
    problems.warn()
    return runs


def clean_text(prompt: str, *, strict: bool = False) -> str:
    """The prompt with weight syntax removed: the text the tokenizer sees."""
    return "".join(span.text for span in parse_weights(prompt, strict=strict))


def has_weights(prompt: str, *, strict: bool = False) -> bool:
    """Whether any part of the prompt is weighted other than 1."""
    return any(span.weight != 1.0 for span in parse_weights(prompt, strict=strict))


# ---------------------------------------------------------------------------------------------
# Prompt editing and alternation over steps
# ---------------------------------------------------------------------------------------------


@dataclass
class _Edit:
    """'[before:after:when]'; before/after are lists of text pieces and nested edits."""

    before: list
    after: list
    when: float

    def step(self, steps: int) -> int:
        # Automatic1111's rule: below 1 is a fraction of the steps, else a step number (truncated).
        return min(steps, int(self.when * steps if self.when < 1 else self.when))


@dataclass
class _Alternation:
    """'[a|b|c]': step 0 reads a, step 1 b, step 2 c, step 3 a again..."""

    options: list[list]


class _ScheduleParser:
    """Reads a prompt into pieces: text (weight syntax kept, escaped where Automatic1111 reads a syntax
    character as text), `_Edit`s and `_Alternation`s."""

    def __init__(self, prompt: str, problems: _Problems):
        self.prompt, self.problems = prompt, problems
        self.brackets: dict[int, tuple[list, int]] = {}  # re-reading a bracket as text costs nothing twice

    def scan(self, i: int, stops: str, opener: str, opener_column: int, depth: int, literal: str = ""
             ) -> tuple[list, int]:
        """Read pieces from prompt[i] up to a char of `stops` (or the end); returns (pieces, its index).
        Characters of `literal` are text here (escaped)."""
        prompt, pieces = self.prompt, []
        while i < len(prompt) and prompt[i] not in stops:
            c = prompt[i]
            if c == "\\" and i + 1 < len(prompt) and prompt[i + 1] in _ESCAPABLE:
                pieces.append(prompt[i : i + 2])  # kept escaped: parse_weights reads it next
                i += 2
            elif c in literal:
                pieces.append("\\" + c)
                i += 1
            elif c == "(":
                _check_nesting(prompt, i, depth + 1)
                inner, j = self.scan(i + 1, ")", "(", i, depth + 1)  # ':' here is a weight
                if j == len(prompt):  # Automatic1111 closes it at the end
                    self.problems.lenient(*_unclosed(prompt, i))
                pieces += ["(", *inner, ")"]
                i = min(j + 1, len(prompt))
            elif c == "[":
                _check_nesting(prompt, i, depth + 1)
                inner, i = self.bracket(i, depth + 1)
                pieces += inner
            elif c in ")]":  # closes nothing open: text
                self.problems.lenient(*_unexpected_closer(prompt, i, opener, opener_column))
                pieces.append("\\" + c)
                i += 1
            elif c == ":" and opener == "(" and not self.problems.strict and self._not_a_weight(i):
                pieces.append("\\:")  # '(a:b)': Automatic1111 reads the ':' as text
                i += 1
            else:
                pieces.append(c)
                i += 1
        return pieces, i

    def _not_a_weight(self, i: int) -> bool:
        """Whether the ':' at prompt[i] inside '(' cannot start a weight, whatever step renders it (a weight
        written with prompt editing, '(a:[1:2:5])', is read after expansion)."""
        prompt, problem = self.prompt, _weight_problem(self.prompt, i)
        close = prompt.find(")", i)
        if not problem or "[" in prompt[i : close if close >= 0 else len(prompt)]:
            return False
        self.problems.lenient(*problem)
        return True

    def bracket(self, i: int, depth: int) -> tuple[list, int]:
        """Read '[...]' at prompt[i]: an edit with a top-level ':', an alternation with a top-level '|',
        else a de-weight kept as text."""
        if i not in self.brackets:
            self.brackets[i] = self._bracket(i, depth)
        return self.brackets[i]

    def _bracket(self, i: int, depth: int) -> tuple[list, int]:
        prompt, end = self.prompt, len(self.prompt)
        first, j = self.scan(i + 1, ":|]", "[", i, depth)
        if j == end:  # Automatic1111 closes it at the end
            self.problems.lenient(*_unclosed(prompt, i))
            return ["[", *first, "]"], j
        if prompt[j] == "]":
            return ["[", *first, "]"], j + 1
        if prompt[j] == "|":
            return self._alternation(i, first, j, depth)
        second, k = self.scan(j + 1, ":]", "[", i, depth)
        if k == end:
            self.problems.lenient(*_unclosed(prompt, i))
            return self._text(i, depth)
        if prompt[k] == "]":  # '[to:when]'
            before, after, when_start, close = [], first, j + 1, k
        else:
            before, after, when_start, close = first, second, k + 1, prompt.find("]", k + 1)
            if close < 0:
                self.problems.lenient(*_unclosed(prompt, i))
                return self._text(i, depth)
        when = self._step(when_start, close)
        if when is None:
            return self._text(i, depth)
        return [_Edit(before, after, when)], close + 1

    def _alternation(self, i: int, first: list, j: int, depth: int) -> tuple[list, int]:
        options = [first]
        while True:
            option, j = self.scan(j + 1, "|]", "[", i, depth)
            options.append(option)
            if j == len(self.prompt):
                self.problems.lenient(*_unclosed(self.prompt, i))
                return self._text(i, depth)
            if self.prompt[j] == "]":
                return [_Alternation(options)], j + 1

    def _text(self, i: int, depth: int) -> tuple[list, int]:
        """'[...]' at prompt[i] that is no edit (no step, or never closed): Automatic1111 reads its ':' and
        '|' as text and the brackets as a de-weight."""
        inner, j = self.scan(i + 1, "]", "[", i, depth, literal=":|")
        if j == len(self.prompt):
            self.problems.lenient(*_unclosed(self.prompt, i))
            return ["[", *inner, "]"], j
        return ["[", *inner, "]"], j + 1

    def _step(self, start: int, end: int) -> float | None:
        """The 'when' of an edit, written in prompt[start:end] (end is the closing ']'); None if it is none."""
        prompt = self.prompt
        m = _STEP.match(prompt, start, end)
        if m and m.end() == end:
            return float(m.group(1))
        if m:
            self.problems.lenient(m.end(), "expected ']' after the step")
        else:
            column = start + len(prompt[start:end]) - len(prompt[start:end].lstrip())
            self.problems.lenient(column, "expected a step number or a fraction of the steps")
        return None


def _nodes(pieces: list):
    for p in pieces:
        if isinstance(p, _Edit):
            yield p
            yield from _nodes(p.before)
            yield from _nodes(p.after)
        elif isinstance(p, _Alternation):
            yield p
            for option in p.options:
                yield from _nodes(option)


def _render(pieces: list, end: int, steps: int) -> str:
    """The text of the steps just before `end` (edits and alternations change only at ends)."""
    out = []
    for p in pieces:
        if isinstance(p, _Edit):
            p = _render(p.before if end <= p.step(steps) else p.after, end, steps)
        elif isinstance(p, _Alternation):
            p = _render(p.options[(end - 1) % len(p.options)], end, steps)
        out.append(p)
    return "".join(out)


def parse_schedule(prompt: str, steps: int, *, strict: bool = False) -> list[tuple[int, str]]:
    r"""Expand Automatic1111 prompt editing and alternation into ``[(end_step_exclusive, prompt_text), ...]``.

    ``[from:to:when]`` swaps at `when`, ``[to:when]`` adds, ``[from::when]`` removes; `when` is a
    step number, or a fraction of `steps` when below 1. ``[a|b|c]`` alternates: step 0 reads a, step 1 b,
    step 2 c, step 3 a...; options may be empty or hold any syntax, ``\|`` is a literal '|'.
    Entries cover steps 0..steps-1 in order (step s uses the first entry with s < end); consecutive equal
    texts are merged. Texts keep their weight syntax; '[word]' without a top-level ':' or '|' is a
    de-weight and is kept as is.

    Malformed brackets are read as Automatic1111 reads them, with a PromptSyntaxWarning naming the column
    (a PromptSyntaxError when `strict`): one still open at the end is closed there, a stray closer is text,
    '[a:b:x]' without a step is text. The texts then spell that reading out ('a (red' gives 'a (red)'), so
    `parse_weights` of them does not warn again.

    >>> parse_schedule("[a:[b:c:7]:3]", steps=10)
    [(3, 'a'), (7, 'b'), (10, 'c')]
    >>> parse_schedule("a [cat|dog]", steps=3)
    [(1, 'a cat'), (2, 'a dog'), (3, 'a cat')]
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    problems = _Problems(prompt, strict)
    pieces, _ = _ScheduleParser(prompt, problems).scan(0, "", "", 0, 0)
    problems.warn()
    nodes = list(_nodes(pieces))
    if any(isinstance(n, _Alternation) for n in nodes):
        ends = list(range(1, steps + 1))
    else:
        ends = sorted({steps} | {s for e in nodes if (s := e.step(steps)) >= 1})
    schedule: list[tuple[int, str]] = []
    for end in ends:
        text = _render(pieces, end, steps)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (end, text)
        else:
            schedule.append((end, text))
    return schedule


# ---------------------------------------------------------------------------------------------
# AND (composable diffusion) and BREAK
# ---------------------------------------------------------------------------------------------

_AND = re.compile(r"\bAND\b")
_AND_WEIGHT = re.compile(r"\s*:\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*$")
_LOOKS_NUMERIC = re.compile(r"\s*(?:[-+.0-9]\S*)?\s*$")  # '', '0.5x', '-': a weight meant, not text
_BREAK = re.compile(r"\s*\bBREAK\b\s*")


def _top_level_colon(text: str) -> int:
    """Index of the last ':' outside brackets and escapes in `text`, or -1."""
    depth, found, i = 0, -1, 0
    while i < len(text):
        c = text[i]
        if c == "\\":
            i += 1
        elif c in "([":
            depth += 1
        elif c in ")]":
            depth = max(0, depth - 1)
        elif c == ":" and depth == 0:
            found = i
        i += 1
    return found


def split_and(prompt: str, *, strict: bool = False) -> list[tuple[str, float]]:
    """Composable diffusion: the sub-prompts between the word ``AND`` (capitals, a word of its own), each with
    its weight, written ``:w`` at its end (1 without; any sign, no range). Sub-prompts are stripped and keep
    their other syntax. A ':' at a sub-prompt's end followed by something that is no number ('a dog :', 'a dog
    :0.5x') is text, as Automatic1111 reads it, with a PromptSyntaxWarning naming the column (an error when
    `strict`).

    >>> split_and("a cat AND a dog :0.5")
    [('a cat', 1.0), ('a dog', 0.5)]
    """
    problems = _Problems(prompt, strict)
    starts = [0] + [m.end() for m in _AND.finditer(prompt)]
    ends = [m.start() for m in _AND.finditer(prompt)] + [len(prompt)]
    parts = []
    for start, end in zip(starts, ends):
        text = prompt[start:end]
        m = _AND_WEIGHT.search(text)
        if m:
            parts.append((text[: m.start()].strip(), float(m.group(1))))
            continue
        colon = _top_level_colon(text)
        if colon >= 0 and _LOOKS_NUMERIC.match(text, colon + 1):
            after = text[colon + 1 :]
            problems.lenient(start + colon + 1 + len(after) - len(after.lstrip()),
                             "expected a weight number after ':'")
        parts.append((text.strip(), 1.0))
    problems.warn()
    return parts


def break_columns(prompt: str) -> list[int]:
    """Columns of the ``BREAK`` keywords in `prompt` (capitals, a word of its own): where Automatic1111 starts
    a new 75-token chunk of the text encoder."""
    return [m.start() + len(m.group()) - len(m.group().lstrip()) for m in _BREAK.finditer(prompt)]


def split_breaks(prompt: str, *, strict: bool = False) -> list[list[WeightedSpan]]:
    """`parse_weights` of the prompt split at each ``BREAK``: one list of weighted runs per chunk, the keyword
    and the whitespace around it removed. Weights carry across: ``(a BREAK b)`` weights both a and b 1.1.

    >>> split_breaks("a (red BREAK circle)")
    [[WeightedSpan(text='a ', weight=1.0), WeightedSpan(text='red', weight=1.1)],
     [WeightedSpan(text='circle', weight=1.1)]]
    """
    cuts = [(m.start(), m.end()) for m in _BREAK.finditer(prompt)]
    chunks: list[list[_Char]] = [[] for _ in range(len(cuts) + 1)]
    k, problems = 0, _Problems(prompt, strict)
    for c in _weighted_chars(prompt, problems):
        while k < len(cuts) and c.column >= cuts[k][1]:
            k += 1
        if k < len(cuts) and c.column >= cuts[k][0]:
            continue  # the keyword, or whitespace around it
        chunks[k].append(c)
    runs = [_merge_runs(prompt, chunk) for chunk in chunks]
    problems.warn()
    return runs
