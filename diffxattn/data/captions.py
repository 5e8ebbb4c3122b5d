"""The language of the shapes scenes: its vocabulary, and captions built from / parsed into clauses.

A caption is a chain of objects joined by relations, or one object with an optional position:

    a [size] color shape [at|on|in the position]
    a [size] color shape (relation a [size] color shape)+     relation i: object i relative to i+1

Building and parsing live side by side so that every caption the generator writes parses back
to exactly the scene it describes (tests check the round trip), and so that evaluation can read
a user's prompt with the same grammar.
"""

from __future__ import annotations

# Every color has a max channel of 255: foreground is then "max channel above half", the same
# rule for every color, and hues sit >= 30 degrees apart so blurry samples still classify.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 40, 40),
    "orange": (255, 136, 0),
    "yellow": (255, 235, 0),
    "green": (40, 255, 40),
    "blue": (40, 90, 255),
    "purple": (176, 48, 255),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = ("small", "large")
POSITIONS = ("left", "right", "top", "bottom", "center")
RELATIONS = ("left of", "right of", "above", "below")
# Where object i+1 lies from object i when "object i <relation> object i+1": (dx, dy), image y pointing down.
RELATION_DIRECTIONS = {"left of": (1, 0), "right of": (-1, 0), "above": (0, 1), "below": (0, -1)}

# Synonymous phrasings; the first one is canonical (used by `canonical=True` captions).
POSITION_PHRASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "left": (("at", "the"), ("on", "the")),
    "right": (("at", "the"), ("on", "the")),
    "top": (("at", "the"),),
    "bottom": (("at", "the"),),
    "center": (("at", "the"), ("in", "the")),
}
RELATION_PHRASES: dict[str, tuple[tuple[str, ...], ...]] = {
    "left of": (("left", "of"), ("to", "the", "left", "of")),
    "right of": (("right", "of"), ("to", "the", "right", "of")),
    "above": (("above",),),
    "below": (("below",),),
}
_ARTICLES = ("a", "an")
_PREPOSITIONS = ("at", "on", "in")

# Every word a caption can contain, sorted: a complete tokenizer vocabulary without sampling.
WORDS: tuple[str, ...] = tuple(sorted(
    {*_ARTICLES, *_PREPOSITIONS, "the", *COLORS, *SHAPES, *SIZES, *POSITIONS}
    | {w for phrases in RELATION_PHRASES.values() for p in phrases for w in p}
))


def object_words(color: str, shape: str, size: str | None) -> list[str]:
    """'a [size] color shape', with 'an' before a vowel ("an orange circle")."""
    words = ([size] if size else []) + [color, shape]
    return ["an" if words[0][0] in "aeiou" else "a"] + words


def build_caption(
    objects: list[dict], position: str | None, relations: list[str], phrase_choice=None
) -> tuple[list[str], list[int]]:
    """Caption words and, per word, the index of the object it describes (-1: none).

    objects: dicts with color, shape, size (None = size word omitted). `phrase_choice(n)` picks
    one of n synonymous phrasings (e.g. `rng.integers`); None takes the canonical one.
    """
    pick = phrase_choice or (lambda n: 0)
    words: list[str] = []
    owners: list[int] = []

    def add(new: list[str], owner: int) -> None:
        words.extend(new)
        owners.extend([owner] * len(new))

    for i, obj in enumerate(objects):
        if i > 0:
            phrases = RELATION_PHRASES[relations[i - 1]]
            add(list(phrases[int(pick(len(phrases)))]), -1)
        ws = object_words(obj["color"], obj["shape"], obj.get("size"))
        add(ws[:1], -1)  # the article describes no object
        add(ws[1:], i)
    if position is not None:
        phrases = POSITION_PHRASES[position]
        add(list(phrases[int(pick(len(phrases)))]), -1)
        add([position], 0)  # a single object's position word points at it
    return words, owners


_MIRROR = {"left": "right", "right": "left", "top": "bottom", "bottom": "top", "above": "below", "below": "above"}


def binding_negatives(caption: str) -> dict[str, str]:
    """Captions with the words of `caption` bound or placed differently, by kind: NegCLIP's hard negatives
    (Yuksekgonul et al. 2023), which a bag-of-words text encoder cannot tell from the caption.

    >>> binding_negatives("a red circle left of a blue square")
    {'colors': 'a blue circle left of a red square', 'shapes': 'a red square left of a blue circle',
     'relation': 'a red circle right of a blue square'}

    Two objects: their colors swapped, their shapes swapped, the relation mirrored. One object: its position
    mirrored (none for "center" or no position).
    """
    spec, owners = parse_caption_words(caption)
    words = caption.split()
    out = {}
    if len(spec["objects"]) == 2:
        for kind, vocab in (("colors", COLORS), ("shapes", SHAPES)):
            i, j = (k for k, (w, o) in enumerate(zip(words, owners)) if o >= 0 and w in vocab)
            if words[i] != words[j]:
                swapped = list(words)
                swapped[i], swapped[j] = words[j], words[i]
                out[kind] = " ".join(_fix_articles(swapped))
    mirrored = [_MIRROR.get(w, w) if o < 0 or w in POSITIONS else w for w, o in zip(words, owners)]
    if mirrored != words:
        out["relation" if spec["relations"] else "position"] = " ".join(mirrored)
    return out


def _fix_articles(words: list[str]) -> list[str]:
    """'a'/'an' before each object as its next word needs ("an orange", "a red")."""
    return [("an" if words[k + 1][0] in "aeiou" else "a") if w in _ARTICLES else w for k, w in enumerate(words)]


def parse_caption(caption: str) -> dict:
    """Clauses of a caption written in the scenes' grammar.

    Returns {"objects": [{"color", "shape", "size" (None if unsaid)}], "position": str | None,
    "relations": [str] (relations[i] places objects[i] relative to objects[i + 1]),
    "relation": the single relation of a two-object caption (objects[0] is its subject) or None}.

    >>> parse_caption("a small blue square above a green triangle")["relation"]
    'above'
    """
    return parse_caption_words(caption)[0]


def parse_caption_words(caption: str) -> tuple[dict, list[int]]:
    """`parse_caption` plus, per word of `caption.split()`, the index of the object it describes."""
    words = caption.split()
    for w in words:
        if w not in WORDS:
            raise ValueError(f"unknown word {w!r} in caption {caption!r}; known words: {', '.join(WORDS)}")
    parser = _Parser(words, caption)
    return parser.parse(), parser.owners


class _Parser:
    """Recursive descent over the grammar in the module docstring; errors say what was expected."""

    def __init__(self, words: list[str], caption: str):
        self.words, self.caption, self.i = words, caption, 0
        self.owners: list[int] = []

    def parse(self) -> dict:
        objects = [self._object(0)]
        relations: list[str] = []
        position = None
        while self.i < len(self.words):
            relation = self._match(RELATION_PHRASES)
            if relation is not None:
                relations.append(relation)
                objects.append(self._object(len(objects)))
            elif not relations and position is None and self._peek() in _PREPOSITIONS:
                position = self._position()
            else:
                self._fail("a relation" if position is None else "the end of the caption")
        return {
            "objects": objects,
            "position": position,
            "relations": relations,
            "relation": relations[0] if len(relations) == 1 else None,
        }

    def _peek(self) -> str | None:
        return self.words[self.i] if self.i < len(self.words) else None

    def _take(self, allowed, what: str, owner: int) -> str:
        word = self._peek()
        if word not in allowed:
            self._fail(what)
        self.i += 1
        self.owners.append(owner)
        return word

    def _object(self, index: int) -> dict:
        self._take(_ARTICLES, "'a' or 'an'", -1)
        size = self._take(SIZES, "", index) if self._peek() in SIZES else None
        color = self._take(COLORS, "a color", index)
        shape = self._take(SHAPES, "a shape", index)
        return {"color": color, "shape": shape, "size": size}

    def _position(self) -> str:
        self._take(_PREPOSITIONS, "'at', 'on' or 'in'", -1)
        self._take(("the",), "'the'", -1)
        return self._take(POSITIONS, "a position", 0)

    def _match(self, phrases: dict[str, tuple[tuple[str, ...], ...]]) -> str | None:
        for name, options in phrases.items():
            for option in options:
                if tuple(self.words[self.i : self.i + len(option)]) == option:
                    self.i += len(option)
                    self.owners.extend([-1] * len(option))
                    return name
        return None

    def _fail(self, expected: str):
        got = self._peek()
        got = "the end" if got is None else repr(got)
        raise ValueError(f"caption {self.caption!r}: expected {expected} at word {self.i + 1}, got {got}")
