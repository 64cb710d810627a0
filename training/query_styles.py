"""Queries as people type them, derived from Flickr8k-style captions.

A caption ("A black dog is running through the grass .") is a full sentence; a person searching
their photos types "black dog", "dog grass", "any pictures of a dog running?" or makes typos.
`styled_queries` turns every caption into one query of a style, so retrieval can be measured on
what users type beside the standard caption protocol. Pure Python heuristics, deterministic for a
seed; no tagger or downloaded data.
"""
from __future__ import annotations

import random
import re

QUERY_STYLES: tuple[str, ...] = ("caption", "keywords", "short", "photos-of", "question", "typos")
# styles whose queries are drawn (which nouns, which template, which slips): one seed is one draw
DRAWN_STYLES = frozenset({"keywords", "question", "typos"})

ARTICLES = frozenset({"a", "an", "the"})
PREPOSITIONS = frozenset({
    "in", "on", "at", "with", "through", "near", "by", "under", "over", "of", "from", "into",
    "onto", "down", "up", "across", "along", "behind", "beside", "next", "around", "towards",
    "toward", "against", "above", "below", "inside", "outside", "between", "while", "for", "to",
    "during", "after", "before", "off", "out", "past", "among", "beneath", "underneath", "as",
    "like", "who", "that", "which",
})
# words that end a subject phrase without being verbs in -ing/-s ("a girl covered in paint")
PARTICIPLES = frozenset({"wearing", "dressed", "covered", "surrounded", "filled", "seated",
                         "holding", "carrying", "using"})
AUXILIARIES = frozenset({"is", "are", "was", "were", "be", "being", "been", "has", "have", "had",
                         "does", "do", "did", "can", "will"})
# frequent third-person verbs of Flickr8k captions ("A dog runs ..."); an -s word alone is too
# often a plural noun to count as a verb
VERBS_S = frozenset({
    "runs", "jumps", "sits", "stands", "plays", "walks", "holds", "looks", "rides", "wears",
    "climbs", "swims", "smiles", "poses", "carries", "throws", "catches", "lies", "lays", "waits",
    "leans", "eats", "drinks", "watches", "splashes", "kicks", "hangs", "skates", "skis", "surfs",
    "performs", "reads", "stares", "chases", "races", "leaps", "flies", "goes", "makes", "takes",
    "bites", "pulls", "pushes", "digs", "shakes", "swings", "slides", "grabs", "dives", "kneels",
    "crosses", "prepares", "attempts", "tries", "works", "uses", "gets", "laughs", "sleeps",
    "fights", "dances", "sings", "paddles", "rests", "bends", "hugs", "kisses", "wades", "points",
})
# -ing words that are nouns, not verbs
ING_NOUNS = frozenset({"clothing", "building", "buildings", "ceiling", "evening", "morning",
                       "something", "anything", "nothing", "thing", "things", "king", "ring",
                       "swing", "swings", "spring", "string", "wing", "wings", "painting",
                       "railing", "railings", "sibling", "siblings", "pudding", "wedding",
                       "ping", "bring", "sing", "sling", "stocking", "stockings", "icing"})
STOPWORDS = ARTICLES | PREPOSITIONS | PARTICIPLES | AUXILIARIES | frozenset({
    "and", "or", "but", "his", "her", "its", "their", "him", "them", "he", "she", "it", "they",
    "this", "these", "those", "there", "here", "some", "another", "other", "each", "one", "two",
    "three", "four", "five", "several", "many", "very", "just", "what", "where", "someone", "'s",
    "s", "while", "front", "so", "then", "too", "own", "all", "both", "few", "more", "most",
})

_PUNCT = re.compile(r"[^\w\s'-]|_")
_SPACES = re.compile(r"\s+")

# QWERTY neighbours: the keys a finger slips onto
_ROWS = ("qwertyuiop", "asdfghjkl", "zxcvbnm")
_NEIGHBOURS: dict[str, str] = {}
for _r, _row in enumerate(_ROWS):
    for _c, _ch in enumerate(_row):
        near = [_row[i] for i in (_c - 1, _c + 1) if 0 <= i < len(_row)]
        for _other in (_r - 1, _r + 1):
            if 0 <= _other < len(_ROWS):
                near += [_ROWS[_other][i] for i in (_c - 1, _c, _c + 1)
                         if 0 <= i < len(_ROWS[_other])]
        _NEIGHBOURS[_ch] = "".join(near)


def words(text: str) -> list[str]:
    """Lower-case words without punctuation (inner apostrophes and hyphens kept: "man's",
    "tri-colored")."""
    return [w.strip("'-") for w in _PUNCT.sub(" ", text.lower()).split() if w.strip("'-")]


def is_verb_like(word: str) -> bool:
    return (word in AUXILIARIES or word in VERBS_S
            or (word.endswith("ing") and len(word) > 4 and word not in ING_NOUNS))


def _drop_leading_article(ws: list[str]) -> list[str]:
    return ws[1:] if len(ws) > 1 and ws[0] in ARTICLES else ws


def _content(ws: list[str]) -> list[str]:
    return [w for w in ws if w not in STOPWORDS and not w.isdigit()]


def _is_boundary(word: str) -> bool:
    return is_verb_like(word) or word in PREPOSITIONS or word in PARTICIPLES


def _subject_end(ws: list[str]) -> int:
    """Index of the first word after the subject phrase: a verb-like word or a preposition."""
    for i, w in enumerate(ws):
        if i > 0 and _is_boundary(w):
            return i
    return len(ws)


def _head(subject: list[str]) -> str | None:
    """The noun the subject is about: its last content word before any preposition."""
    cut = next((i for i, w in enumerate(subject) if i and _is_boundary(w)), len(subject))
    content = _content(subject[:cut])
    return content[-1] if content else None


def subject_phrase(caption: str) -> list[str]:
    """The caption's subject, 2-4 words without articles ("black dog", "man and woman",
    "child in pink dress")."""
    ws = words(caption)
    end = _subject_end(ws)
    subject = [w for w in ws[:end] if w not in ARTICLES]
    if len(subject) > 4 and "and" in subject[1:]:  # "black dog and a spotted dog": the first
        subject = subject[:subject.index("and", 1)]
    if len(subject) > 4:  # the head noun ends an English noun phrase
        subject = subject[-4:]
    # one word ("dog runs ...", "child in a pink dress ..."): carry on to the next boundary
    for w in ws[end:]:
        if len(subject) >= 4:
            break
        if w in ARTICLES or w in AUXILIARIES:
            continue
        if (len(subject) >= 2 and (_is_boundary(w) or w == "and")
                and not (subject[-1] in PREPOSITIONS or subject[-1] in PARTICIPLES)):
            break
        subject.append(w)
    if subject and subject[-1] in PREPOSITIONS | PARTICIPLES | {"and"}:
        subject = subject[:-1]
    if len(subject) >= 2:
        return subject
    return _content(ws)[:3] or subject


def typo_word(word: str, rng: random.Random) -> str:
    """One typo as people make them: a neighbouring key, a dropped, doubled or swapped letter.
    Always differs from `word` when it has 3 letters or more (shorter words are returned)."""
    if len(word) < 3:
        return word
    kinds = ["neighbour", "drop", "double"]
    swaps = [i for i in range(len(word) - 1) if word[i] != word[i + 1]]
    if swaps:
        kinds.append("swap")
    kind = rng.choice(kinds)
    if kind == "swap":
        i = rng.choice(swaps)
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == "drop":
        i = rng.randrange(len(word))
        return word[:i] + word[i + 1:]
    if kind == "double":
        i = rng.randrange(len(word))
        return word[:i + 1] + word[i:]
    keyed = [i for i, ch in enumerate(word) if ch in _NEIGHBOURS]
    if not keyed:  # digits or accents only: doubling still reads as a slip
        i = rng.randrange(len(word))
        return word[:i + 1] + word[i:]
    i = rng.choice(keyed)
    return word[:i] + rng.choice(_NEIGHBOURS[word[i]]) + word[i + 1:]


def add_typos(text: str, rng: random.Random, rate: float = 0.25, at_least_one: bool = False
              ) -> str:
    """`text` as whitespace-separated words, with `typo_word` in about `rate` of the words longer
    than 2 letters; `at_least_one`: one typo even when chance gives none."""
    ws = text.split()
    eligible = [i for i, w in enumerate(ws) if len(w) > 2 and w.isalpha()]
    hit = [i for i in eligible if rng.random() < rate]
    if at_least_one and not hit and eligible:
        hit = [rng.choice(eligible)]
    for i in hit:
        ws[i] = typo_word(ws[i], rng)
    return " ".join(ws)


def _keywords(caption: str, rng: random.Random) -> str:
    ws = words(caption)
    content = _content(ws)
    nouns = list(dict.fromkeys(w for w in content if not is_verb_like(w))) or content
    if not nouns:
        return ""
    head_word = _head(subject_phrase(caption))
    head = nouns.index(head_word) if head_word in nouns else 0
    k = min(rng.randint(1, 3), len(nouns))
    others = rng.sample([i for i in range(len(nouns)) if i != head], k - 1)
    return " ".join(nouns[i] for i in sorted([head, *others]))


def _question(caption: str, rng: random.Random) -> str:
    ws = words(caption)
    end = _subject_end(ws)
    at = next((i for i, w in enumerate(ws) if i and w in ("is", "are")), None)
    # "a dog is running ..." -> "a dog running ...": the shape of a search, not a statement
    body = ws if at is None else ws[:at] + ws[at + 1:]
    templates = ["any pictures of {body}?", "do you have photos of {body}?"]
    bare = _drop_leading_article(body)
    if end < len(ws):
        plural = "and" in ws[:end] or (ws[end - 1].endswith("s") and not ws[end - 1].endswith("ss"))
        verb = ws[at] if at is not None else ("are" if plural else "is")
        templates.append("where " + verb + " the {bare}?")
    return rng.choice(templates).format(body=" ".join(body), bare=" ".join(bare))


def styled_query(caption: str, style: str, rng: random.Random) -> str:
    if style == "caption":
        return caption
    if style == "keywords":
        out = _keywords(caption, rng)
    elif style == "short":
        out = " ".join(subject_phrase(caption))
    elif style == "photos-of":
        out = "photos of " + " ".join(_drop_leading_article(words(caption)))
    elif style == "question":
        out = _question(caption, rng)
    elif style == "typos":
        out = add_typos(" ".join(words(caption)), rng, rate=0.25, at_least_one=True)
    else:
        raise ValueError(f"unknown query style {style!r}; known: {QUERY_STYLES}")
    out = _SPACES.sub(" ", out).strip()
    # a query with no word left ("photos of " of an empty caption) falls back to the caption
    return out if words(out) and out != "photos of" else caption


def parse_styles(value: str, known: tuple[str, ...] = QUERY_STYLES) -> tuple[str, ...]:
    """Comma-separated style names, each once, in the order given; ValueError naming the known
    ones for an unknown or empty list."""
    styles = tuple(dict.fromkeys(s.strip() for s in value.split(",") if s.strip()))
    unknown = [s for s in styles if s not in known]
    if unknown or not styles:
        raise ValueError(f"unknown query style(s) {', '.join(unknown) or repr(value)}; known: "
                         f"{', '.join(known)}")
    return styles


def styled_queries(captions: list[str], style: str, seed: int = 0) -> list[str]:
    """One query of `style` per caption, in order; the same for the same seed."""
    if style not in QUERY_STYLES:
        raise ValueError(f"unknown query style {style!r}; known: {QUERY_STYLES}")
    rng = random.Random(f"{style}:{seed}")
    return [styled_query(c, style, rng) for c in captions]
