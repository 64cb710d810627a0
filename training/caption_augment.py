"""Caption augmentation that keeps the meaning: the same photo described the way other people
(and searchers) would, so the text tower learns what people type, not one annotator's sentence.

Each transform applies with its own probability: articles dropped, one adjective dropped,
synonym swaps, lower-casing without the final period, and a few typos (the typo function of
`training.query_styles`, so queries and training see the same slips).
"""
from __future__ import annotations

import random
import re

from training.query_styles import add_typos

ARTICLES = frozenset({"a", "an", "the"})
# colour, size and age words: dropping one still describes the photo, only less precisely
ADJECTIVES = frozenset({
    "black", "white", "brown", "red", "blue", "green", "yellow", "pink", "orange", "purple",
    "grey", "gray", "tan", "dark", "colorful", "small", "little", "large", "big", "young",
    "old", "older", "tall", "long", "blond", "blonde", "wooden", "grassy", "snowy", "rocky",
})
# Interchangeable words for the same photo, picked by hand among the most frequent words of
# the Flickr8k captions (counted over Flickr8k.token.txt: dog 7157, man 6252, boy 3068,
# woman 3004, girl 2885, child 1326, running 1837, ocean 386, ...). Only swaps a person would
# accept as the same search; plural forms are entries of their own so number is kept.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "dog": ("puppy", "pup"),
    "dogs": ("puppies",),
    "puppy": ("dog",),
    "man": ("guy", "gentleman"),
    "men": ("guys",),
    "guy": ("man",),
    "woman": ("lady",),
    "women": ("ladies",),
    "lady": ("woman",),
    "child": ("kid",),
    "children": ("kids",),
    "kid": ("child",),
    "kids": ("children",),
    "boy": ("kid",),
    "boys": ("kids",),
    "girl": ("kid",),
    "girls": ("kids",),
    "baby": ("infant", "toddler"),
    "person": ("individual",),
    "people": ("persons", "folks"),
    "running": ("jogging", "racing"),
    "runs": ("jogs", "races"),
    "jumping": ("leaping",),
    "jumps": ("leaps",),
    "leaps": ("jumps",),
    "walking": ("strolling",),
    "sitting": ("seated",),
    "looking": ("gazing",),
    "smiling": ("grinning",),
    "ocean": ("sea",),
    "sea": ("ocean",),
    "grass": ("lawn",),
    "street": ("road",),
    "road": ("street",),
    "sidewalk": ("pavement",),
    "bike": ("bicycle",),
    "bicycle": ("bike",),
    "hill": ("slope",),
    "shirt": ("top",),
    "jacket": ("coat",),
    "hat": ("cap",),
    "photo": ("picture",),
    "picture": ("photo",),
    "large": ("big",),
    "big": ("large",),
    "small": ("little",),
    "little": ("small",),
    "grey": ("gray",),
    "stream": ("creek",),
}

P_ARTICLES = 0.3
P_ADJECTIVE = 0.25
P_SYNONYMS = 0.4
P_SYNONYM_EACH = 0.5
P_LOWER = 0.5
P_TYPOS = 0.15
TYPO_RATE = 0.1

_WORD = re.compile(r"[A-Za-z]+")


def _key(token: str) -> str:
    return token.lower()


def _cased_like(replacement: str, token: str) -> str:
    return replacement[:1].upper() + replacement[1:] if token[:1].isupper() else replacement


def augment_caption(text: str, rng: random.Random) -> str:
    """A copy of `text` with meaning-keeping changes, each applied with its own probability;
    never empty (the text itself when nothing would be left)."""
    tokens = text.split()
    if rng.random() < P_ARTICLES:
        kept = [t for t in tokens if _key(t) not in ARTICLES]
        if any(_WORD.search(t) for t in kept):
            if tokens and tokens[0][:1].isupper() and kept:
                kept[0] = _cased_like(kept[0], tokens[0])
            tokens = kept
    if rng.random() < P_ADJECTIVE:
        spots = [i for i, t in enumerate(tokens) if _key(t) in ADJECTIVES]
        if spots and len(tokens) > 2:
            i = rng.choice(spots)
            dropped, tokens = tokens[i], tokens[:i] + tokens[i + 1:]
            if i == 0 and tokens:
                tokens[0] = _cased_like(tokens[0], dropped)
    if rng.random() < P_SYNONYMS:
        for i, t in enumerate(tokens):
            options = SYNONYMS.get(_key(t))
            if options and rng.random() < P_SYNONYM_EACH:
                tokens[i] = _cased_like(rng.choice(options), t)
    out = " ".join(tokens)
    if rng.random() < P_LOWER:
        out = re.sub(r"\s*\.\s*$", "", out.lower())
    if rng.random() < P_TYPOS:
        out = add_typos(out, rng, rate=TYPO_RATE)
    return out if out.strip() else text


def augmented_variants(captions: list[str], n: int, seed: int = 0) -> list[list[str]]:
    """n lists, each one augmented copy of every caption, in order; variant v of caption c
    depends only on (seed, v, c), not on the other captions."""
    return [[augment_caption(text, random.Random(f"{seed}:{v}:{c}"))
             for c, text in enumerate(captions)] for v in range(n)]
