r"""Prompt syntax: per-word weights and prompt editing over steps (text in, text and numbers out).

Weights (both dialects may be mixed in one prompt):

* Automatic1111: ``(word)`` ×1.1, ``[word]`` ÷1.1, ``(a phrase:1.5)``; nesting multiplies;
  ``\(`` ``\)`` ``\[`` ``\]`` ``\\`` (and ``\:`` ``\+`` ``\-``) are literal characters; any other
  backslash is literal.
* compel: ``word+`` ×1.1 and ``word-`` ×0.9 per sign, ``(a phrase)1.3``, ``(a phrase)+``.

Prompt editing (Automatic1111) ``[from:to:when]`` is expanded first by :func:`parse_schedule`;
the texts it returns still carry weight syntax for :func:`parse_weights`.

>>> parse_weights("(red:1.5) car+")
[WeightedSpan(text='red', weight=1.5), WeightedSpan(text=' ', weight=1.0), WeightedSpan(text='car', weight=1.1)]
>>> parse_schedule("a [dog:cat:0.5]", steps=10)
[(5, 'a dog'), (10, 'a cat')]
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

MIN_WEIGHT = 0.0
MAX_WEIGHT = 10.0
MAX_NESTING = 100  # bounds recursion in the schedule parser; no real prompt nests this deep
ERROR_CONTEXT = 60  # characters of the prompt an error shows on each side of the column
PAREN_FACTOR = 1.1
PLUS_FACTOR = 1.1
MINUS_FACTOR = 0.9

_ESCAPABLE = "()[]\\:+-"  # A1111's five, plus ':' '+' '-' so that C\+\+ and [at 5\:30] are text
_NUMBER = re.compile(r"[0-9]+(?:\.[0-9]*)?|\.[0-9]+")
_SIGNED_WEIGHT = re.compile(r"\s*([+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+))\s*")
_STEP = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*")
_SIGNS = re.compile(r"[+-]+")
_CLOSERS = {"(": ")", "[": "]"}


class PromptSyntaxError(ValueError):
    """Malformed prompt. The message is three lines: the problem, the prompt, a caret under it."""

    def __init__(self, prompt: str, column: int, problem: str):
        self.prompt, self.column, self.problem = prompt, column, problem
        # a window of the prompt around the column: a 1 MB prompt is not repeated in full
        start, end = max(0, column - ERROR_CONTEXT), min(len(prompt), column + ERROR_CONTEXT)
        lead, tail = "…" * (start > 0), "…" * (end < len(prompt))
        shown = [ch if ch.isprintable() else repr(ch)[1:-1] for ch in prompt[start:end]]
        caret = len(lead) + sum(len(s) for s in shown[:column - start])  # escaped control chars widen the line
        super().__init__(f"column {column}: {problem}\n{lead}{''.join(shown)}{tail}\n{' ' * caret}^")


def _check_nesting(prompt: str, column: int, depth: int) -> None:
    if depth > MAX_NESTING:
        raise PromptSyntaxError(prompt, column, f"brackets nested deeper than {MAX_NESTING}")


def _unexpected_closer(prompt: str, column: int, opener: str, opener_column: int) -> PromptSyntaxError:
    closer = prompt[column]
    if not opener:
        wanted = {")": "(", "]": "["}[closer]
        problem = f"unmatched '{closer}': expected an opening '{wanted}' before it"
        return PromptSyntaxError(prompt, column, problem)
    wanted = _CLOSERS[opener]
    problem = f"expected '{wanted}' to close the '{opener}' at column {opener_column}, found '{closer}'"
    return PromptSyntaxError(prompt, column, problem)


def _unclosed(prompt: str, column: int) -> PromptSyntaxError:
    opener = prompt[column]
    problem = f"unclosed '{opener}': expected '{_CLOSERS[opener]}' before the end of the prompt"
    return PromptSyntaxError(prompt, column, problem)


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


def _read_explicit_weight(prompt: str, i: int, top: _Group) -> int:
    """Parse ':w' in '(text:w)' at prompt[i] == ':'; returns the index of the closing ')'."""
    m = _SIGNED_WEIGHT.match(prompt, i + 1)
    if not m:
        column = i + 1 + len(prompt[i + 1 :]) - len(prompt[i + 1 :].lstrip())
        raise PromptSyntaxError(prompt, column, "expected a weight number after ':'")
    if m.end() == len(prompt) or prompt[m.end()] != ")":
        raise PromptSyntaxError(prompt, m.end(), "expected ')' after the weight")
    top.weight = float(m.group(1))
    _check_range(prompt, m.start(1), top.weight)
    return m.end()


def _close_group(prompt: str, i: int, stack: list[_Group]) -> int:
    """Handle the ')' or ']' at prompt[i]; returns the index after it and any compel suffix."""
    top = stack[-1]
    if _CLOSERS.get(top.opener) != prompt[i]:
        raise _unexpected_closer(prompt, i, top.opener, top.column)
    stack.pop()
    end = i + 1
    if top.opener == "[":
        factor = 1 / PAREN_FACTOR
    elif suffix := _compel_suffix(prompt, end):
        if top.weight is not None:
            problem = "weight given twice: use either '(text:w)' or '(text)w', not both"
            raise PromptSyntaxError(prompt, end, problem)
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


def parse_weights(prompt: str) -> list[WeightedSpan]:
    """Split a prompt into weighted runs, with the syntax characters removed.

    Adjacent runs of equal weight are merged and whitespace is kept, so
    ``"".join(r.text for r in runs) == clean_text(prompt)``. Weights are rounded to 1e-6.
    Raises PromptSyntaxError for unbalanced brackets, bad numbers, weights outside
    [MIN_WEIGHT, MAX_WEIGHT] and unexpanded prompt editing ('[a:b:when]').

    >>> parse_weights("((red)) car--")
    [WeightedSpan(text='red', weight=1.21), WeightedSpan(text=' ', weight=1.0),
     WeightedSpan(text='car', weight=0.81)]
    """
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
        elif c in ")]":
            i = _close_group(prompt, i, stack)
        elif c == ":" and top.opener == "(":
            i = _read_explicit_weight(prompt, i, top)
        elif c == ":" and top.opener == "[":
            problem = "prompt editing '[a:b:when]' must be expanded by parse_schedule() first"
            raise PromptSyntaxError(prompt, i, problem)
        elif c in "+-":
            i = _word_suffix(prompt, i, top)
        else:
            top.add(c, i)
            i += 1
    if len(stack) > 1:
        raise _unclosed(prompt, stack[-1].column)
    return _merge_runs(prompt, stack[0].chars)


def clean_text(prompt: str) -> str:
    """The prompt with weight syntax removed: the text the tokenizer sees."""
    return "".join(span.text for span in parse_weights(prompt))


def has_weights(prompt: str) -> bool:
    """Whether any part of the prompt is weighted other than 1."""
    return any(span.weight != 1.0 for span in parse_weights(prompt))


# ---------------------------------------------------------------------------------------------
# Prompt editing over steps
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


def _read_step(prompt: str, start: int, end: int) -> float:
    """The 'when' of an edit, written in prompt[start:end] (end is the closing ']')."""
    m = _STEP.match(prompt, start, end)
    if m and m.end() == end:
        return float(m.group(1))
    if m:
        raise PromptSyntaxError(prompt, m.end(), "expected ']' after the step")
    column = start + len(prompt[start:end]) - len(prompt[start:end].lstrip())
    raise PromptSyntaxError(prompt, column, "expected a step number or a fraction of the steps")


def _scan(prompt: str, i: int, stops: str, opener: str, opener_column: int, depth: int) -> tuple[list, int]:
    """Read pieces from prompt[i] up to a char of `stops` (or the end); returns (pieces, its index)."""
    pieces: list = []
    while i < len(prompt) and prompt[i] not in stops:
        c = prompt[i]
        if c == "\\" and i + 1 < len(prompt) and prompt[i + 1] in _ESCAPABLE:
            pieces.append(prompt[i : i + 2])  # kept escaped: parse_weights reads it next
            i += 2
        elif c == "(":
            _check_nesting(prompt, i, depth + 1)
            inner, j = _scan(prompt, i + 1, ")", "(", i, depth + 1)  # ':' here is a weight
            if j == len(prompt):
                raise _unclosed(prompt, i)
            pieces += ["(", *inner, ")"]
            i = j + 1
        elif c == "[":
            _check_nesting(prompt, i, depth + 1)
            inner, i = _scan_bracket(prompt, i, depth + 1)
            pieces += inner
        elif c in ")]":
            raise _unexpected_closer(prompt, i, opener, opener_column)
        else:
            pieces.append(c)
            i += 1
    return pieces, i


def _scan_bracket(prompt: str, i: int, depth: int) -> tuple[list, int]:
    """Read '[...]' at prompt[i]: an edit if it has a top-level ':', else a de-weight kept as text."""
    first, j = _scan(prompt, i + 1, ":]", "[", i, depth)
    if j == len(prompt):
        raise _unclosed(prompt, i)
    if prompt[j] == "]":
        return ["[", *first, "]"], j + 1
    second, k = _scan(prompt, j + 1, ":]", "[", i, depth)
    if k == len(prompt):
        raise _unclosed(prompt, i)
    if prompt[k] == "]":  # '[to:when]'
        return [_Edit([], first, _read_step(prompt, j + 1, k))], k + 1
    close = prompt.find("]", k + 1)
    if close < 0:
        raise _unclosed(prompt, i)
    return [_Edit(first, second, _read_step(prompt, k + 1, close))], close + 1


def _edits(pieces: list):
    for p in pieces:
        if isinstance(p, _Edit):
            yield p
            yield from _edits(p.before)
            yield from _edits(p.after)


def _render(pieces: list, step: int, steps: int) -> str:
    out = []
    for p in pieces:
        if isinstance(p, _Edit):
            p = _render(p.before if step <= p.step(steps) else p.after, step, steps)
        out.append(p)
    return "".join(out)


def parse_schedule(prompt: str, steps: int) -> list[tuple[int, str]]:
    """Expand Automatic1111 prompt editing into ``[(end_step_exclusive, prompt_text), ...]``.

    ``[from:to:when]`` swaps at `when`, ``[to:when]`` adds, ``[from::when]`` removes; `when` is a
    step number, or a fraction of `steps` when below 1. Entries cover steps 0..steps-1 in order
    (step s uses the first entry with s < end); consecutive equal texts are merged. Texts keep
    their weight syntax; '[word]' without a top-level ':' is a de-weight and is kept as is.

    >>> parse_schedule("[a:[b:c:7]:3]", steps=10)
    [(3, 'a'), (7, 'b'), (10, 'c')]
    """
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    pieces, _ = _scan(prompt, 0, "", "", 0, 0)
    ends = sorted({steps} | {s for e in _edits(pieces) if (s := e.step(steps)) >= 1})
    schedule: list[tuple[int, str]] = []
    for end in ends:
        text = _render(pieces, end, steps)
        if schedule and schedule[-1][1] == text:
            schedule[-1] = (end, text)
        else:
            schedule.append((end, text))
    return schedule
