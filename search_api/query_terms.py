"""Queries of several terms: texts and stored photos, each positive or negative, with weights.

Two ways in, one result (`TermQuery`):

- typed (`parse_typed`), rclip-style: `dog + beach - people`, `2:sunset + boat`, quotes for a
  phrase holding `+` or `-` (`"rock - paper" + scissors`), a stored photo as `key:<key>`
  (`sunset + key:holidays/img_01.jpg`). An operator is a `+` or `-` outside quotes at the start
  or after a blank, so `t-shirt` and `black-and-white` stay words. A text with no operator, no
  weight and no `key:` is not a term query (None): it is searched exactly as before.
- structured (`from_structured`): `{"positive": [{"text"|"key": ..., "weight": w}],
  "negative": [...]}`.

Bad input is a `TermError` naming the term (a 422): an empty term, a weight that is not a
finite number in (0, MAX_WEIGHT], no positive term, more than MAX_QUERY_TERMS terms. A key that
is not indexed, and terms that cancel out, are found when the service reads them (same error).
`TermQuery.echo()` is how the query was read, in the structured form (it parses back to the
same query); `typed()` the same as a typed string.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field, replace

from core.settings import RequestLimits

MAX_WEIGHT = 100.0
KEY_PREFIX = "key:"
_WEIGHT = re.compile(r"^(\d+(?:\.\d*)?|\.\d+):(?=[^\s\d])")


class TermError(ValueError):
    """A term that cannot be searched: `loc` is where the request holds it (("text",) for the
    typed form, ("terms", "positive", 0) for the structured one), `term` how it was written."""

    def __init__(self, loc: tuple, term: str, message: str):
        super().__init__(f"{term!r}: {message}" if term else message)
        self.loc, self.term, self.message = tuple(loc), term, message


@dataclass(frozen=True)
class Term:
    negative: bool
    weight: float = 1.0  # > 0; the sign is `negative`
    text: str | None = None  # a text term
    key: str | None = None  # or a stored photo's key
    loc: tuple = ()  # where the request holds it
    encoded_text: str | None = None  # what the model encodes (the text less hints read)

    @property
    def signed_weight(self) -> float:
        return -self.weight if self.negative else self.weight

    def typed(self) -> str:
        """The term as a typed query writes it (without its sign)."""
        body = KEY_PREFIX + _quoted(self.key) if self.key is not None else _quoted(self.text)
        return body if self.weight == 1.0 else f"{self.weight:g}:{body}"

    def echo(self) -> dict:
        out = {"key": self.key} if self.key is not None else {"text": self.text}
        out["weight"] = self.weight
        if self.key is None and self.encoded_text not in (None, self.text):
            out["encoded_text"] = self.encoded_text
        return out


def _quoted(value: str) -> str:
    """Quoted when it holds what the parser would read as syntax."""
    needs = (any(c in value for c in '+-"') or value != value.strip() or
             value.startswith(KEY_PREFIX) or _WEIGHT.match(value))
    return '"' + value.replace('"', "") + '"' if needs else value


@dataclass(frozen=True)
class TermQuery:
    terms: list[Term] = field(default_factory=list)

    @property
    def keys(self) -> list[str]:
        return [t.key for t in self.terms if t.key is not None]

    @property
    def positive_keys(self) -> list[str]:
        return [t.key for t in self.terms if t.key is not None and not t.negative]

    def echo(self) -> dict:
        return {"positive": [t.echo() for t in self.terms if not t.negative],
                "negative": [t.echo() for t in self.terms if t.negative]}

    def typed(self) -> str:
        out = ""
        for t in self.terms:
            sign = "- " if t.negative else ("+ " if out else "")
            out += (" " if out else "") + sign + t.typed()
        return out

    def chars(self) -> int:
        """Characters of text in its terms (what reading their hints costs)."""
        return sum(len(t.text) for t in self.terms if t.text is not None)

    def with_encoded(self, encoded: list[str | None]) -> "TermQuery":
        return TermQuery([replace(t, encoded_text=e) for t, e in zip(self.terms, encoded)])


def check(query: TermQuery, loc: tuple, max_terms: int = RequestLimits.MAX_QUERY_TERMS
          ) -> TermQuery:
    """TermError unless it has a positive term and at most max_terms terms."""
    if len(query.terms) > max_terms:
        extra = query.terms[max_terms]
        raise TermError(extra.loc or loc, extra.typed(),
                        f"more than {max_terms} terms (MAX_QUERY_TERMS)")
    if not any(not t.negative for t in query.terms):
        first = query.terms[0] if query.terms else None
        raise TermError(first.loc if first else loc, "- " + first.typed() if first else "",
                        "a query needs a positive term (only negative ones given)")
    return query


def _weight(raw, loc: tuple, written: str) -> float:
    try:
        w = float(raw)
    except (TypeError, ValueError, OverflowError):
        raise TermError(loc, written, "the weight must be a number") from None
    if not math.isfinite(w) or not 0 < w <= MAX_WEIGHT:
        raise TermError(loc, written, f"the weight must be a finite number in (0, {MAX_WEIGHT:g}]")
    return w


def _segments(text: str) -> list[tuple[str, str]]:
    """(operator or "", segment) pieces, split at + and - outside quotes at the start or after
    a blank."""
    pieces, op, start, quoted = [], "", 0, False
    for i, c in enumerate(text):
        if c == '"':
            quoted = not quoted
        elif c in "+-" and not quoted and (i == 0 or text[i - 1].isspace()):
            if i > 0 or op:
                pieces.append((op, text[start:i]))
            op, start = c, i + 1
    pieces.append((op, text[start:]))
    return pieces


def parse_typed(text: str, loc: tuple = ("text",),
                max_terms: int = RequestLimits.MAX_QUERY_TERMS) -> TermQuery | None:
    """The typed query's terms, or None when it is a plain text (no operator, weight or key)."""
    pieces = _segments(text)
    syntax = len(pieces) > 1 or pieces[0][0] != ""
    terms = []
    for op, segment in pieces:
        written = (op + " " + segment.strip()).strip()
        body = segment.strip()
        weight = 1.0
        m = _WEIGHT.match(body)
        if m:
            syntax = True
            weight = _weight(m.group(1), loc, written)
            body = body[m.end():]
        key = None
        if body.startswith(KEY_PREFIX) and len(body) > len(KEY_PREFIX) \
                and not body[len(KEY_PREFIX)].isspace():
            syntax = True
            key = body[len(KEY_PREFIX):].replace('"', "").strip()
        value = body.replace('"', "").strip() if key is None else key
        if not value:
            if not syntax and not op:
                return None
            raise TermError(loc, written, "an empty term")
        terms.append(Term(op == "-", weight, None if key is not None else value, key, loc))
    if not syntax:
        return None
    return check(TermQuery(terms), loc, max_terms)


def from_structured(terms: dict, loc: tuple = ("terms",),
                    max_terms: int = RequestLimits.MAX_QUERY_TERMS) -> TermQuery:
    """The structured form ({"positive": [...], "negative": [...]}, each item {"text"|"key",
    "weight"}: a validated schemas model's dump, or the same dict)."""
    out = []
    for side in ("positive", "negative"):
        for i, item in enumerate(terms.get(side) or []):
            here = (*loc, side, i)
            text, key = item.get("text"), item.get("key")
            written = text if text is not None else f"{KEY_PREFIX}{key}"
            if (text is None) == (key is None):
                raise TermError(here, written or "", "a term is a `text` or a `key` (one of them)")
            value = (text if text is not None else key).strip()
            if not value:
                raise TermError(here, written, "an empty term")
            weight = _weight(item.get("weight", 1.0), here, written)
            out.append(Term(side == "negative", weight, value if key is None else None,
                            value if key is not None else None, here))
    return check(TermQuery(out), loc, max_terms)


def plain(text: str, encoded_text: str | None = None) -> TermQuery:
    """A one-text query (what a plain text is), for the answer's echo."""
    return TermQuery([Term(False, 1.0, text, None, ("text",), encoded_text)])
