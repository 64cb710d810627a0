"""What a text query asks for: the words the model encodes and the filters it applies.

`read_text_query(text, filters, parse_hints, now, tz)`: the dates and places written in the text
("beach in July 2023", "snow in Norway last winter") become filters (query hints,
`search_api.query_hints`) and the rest of the text is what the model encodes. The filters the
request sends win over those read from the text: a hint whose field the request sets is dropped,
and so are all hints when together with the request they would make an impossible filter
(after > before). A text made only of hints ("Norway", "2019") is encoded whole: the model
still needs words to rank by.

`read_term_texts(query, ...)`: the same for a query of several terms (search_api.query_terms):
hints are read from its positive texts, one after another; negative texts are encoded as written.

The parser's first use loads its tables (seconds): the app's start calls `warm_up()` before
serving, and the routes read queries through `run_parser`: on the event loop for a short text
once the tables are loaded, else in the thread pool.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from datetime import datetime

from fastapi.concurrency import run_in_threadpool
from pydantic import ValidationError
from pydantic_core import to_jsonable_python

from indexer.photo_filter import PhotoFilter
from search_api import query_hints
from search_api.query_hints import read_hints
from search_api.query_terms import TermQuery


@dataclass(frozen=True)
class TextQuery:
    text: str  # as sent
    encoded_text: str  # what the model encodes
    filters: PhotoFilter  # the request's filters merged with the hints
    hints: list[dict] = field(default_factory=list)  # {"field", "value", "text"} read from text

    @property
    def where(self) -> PhotoFilter | None:
        """The filter to search with (None: no filter)."""
        return None if self.filters.is_empty() else self.filters


def _hint_fields(hint: dict) -> set[str]:
    """The filter fields a hint sets ("taken" sets taken_after and taken_before)."""
    name = hint["field"]
    return {f for f in PhotoFilter.model_fields if f == name or f.startswith(name + "_")}


def merge_filters(asked: PhotoFilter | None, hinted: PhotoFilter,
                  hints: list[dict]) -> tuple[PhotoFilter, list[dict]]:
    """The filter to apply and the hints that made it in (the request's fields win)."""
    asked_fields = {} if asked is None else asked.model_dump(exclude_none=True)
    kept = [h for h in hints if not _hint_fields(h) & set(asked_fields)]
    kept_fields = set().union(*(_hint_fields(h) for h in kept)) if kept else set()
    from_hints = {k: v for k, v in hinted.model_dump(exclude_none=True).items()
                  if k in kept_fields}
    if not from_hints:
        return asked or PhotoFilter(), []
    try:
        return PhotoFilter.model_validate({**from_hints, **asked_fields}), kept
    except ValidationError:  # e.g. a hinted date range against the request's: the request's
        return asked or PhotoFilter(), []


def _hint_out(hint) -> dict:
    """A hint as the answer carries it (the parser's Hint or a dict)."""
    if not isinstance(hint, dict):
        hint = {"field": hint.field, "value": hint.value, "text": hint.text}
    return {"field": hint["field"], "value": to_jsonable_python(hint.get("value")),
            "text": hint.get("text")}


def read_text_query(text: str, filters: PhotoFilter | None, parse_hints: bool, now: datetime,
                    tz: str) -> TextQuery:
    """The text as searched: hints read (unless parse_hints is false) with the clock `now` in
    zone `tz`, merged with the request's `filters`."""
    if not parse_hints:
        return TextQuery(text, text, filters or PhotoFilter())
    read = read_hints(text, now, tz)
    merged, kept = merge_filters(filters, read.filters, [_hint_out(h) for h in read.hints])
    encoded = " ".join(read.text.split()) if kept else text
    return TextQuery(text, encoded or text, merged, kept)


def read_text_queries(texts: list[str], filters: PhotoFilter | None, parse_hints: bool,
                      now: datetime, tz: str) -> list[TextQuery]:
    """read_text_query of each text (one call for a batch: one thread-pool hop)."""
    if parse_hints and not _warm.is_set():
        warm_up()
    return [read_text_query(t, filters, parse_hints, now, tz) for t in texts]


def read_term_texts(query: TermQuery, filters: PhotoFilter | None, parse_hints: bool,
                    now: datetime, tz: str) -> tuple[TermQuery, TextQuery]:
    """A query of several terms as searched: hints read from its positive texts, each merged
    into the filter in turn (the request's fields, then earlier terms', win); negative texts
    are encoded as written (a hint there would filter the wrong way). -> (the query with each
    text's encoded_text, the TextQuery of its filters and hints)."""
    merged, hints, encoded = filters or PhotoFilter(), [], []
    if parse_hints and not _warm.is_set():
        warm_up()
    for term in query.terms:
        if term.text is None or term.negative or not parse_hints:
            encoded.append(term.text)
            continue
        read = read_text_query(term.text, merged, True, now, tz)
        merged, hints = read.filters, hints + read.hints
        encoded.append(read.encoded_text)
    read_query = query.with_encoded(encoded)
    return read_query, TextQuery(read_query.typed(), read_query.typed(), merged, hints)


# once the tables are loaded a text of up to this many characters is read in 0.1-0.5 ms, less
# than the thread hop it would otherwise take (BENCHMARKS.md §1); the parse is pure Python and
# holds the GIL in a worker thread too
INLINE_MAX_CHARS = 128


async def run_parser(fn, chars: int, *args):
    """fn(*args) (read_text_queries or read_term_texts over `chars` characters of text): on
    the event loop when that is short and the parser is loaded, else in the thread pool."""
    if chars <= INLINE_MAX_CHARS and _warm.is_set():
        return fn(*args)
    return await run_in_threadpool(fn, *args)


_warm = threading.Event()
_warm_lock = threading.Lock()


def warm_up() -> None:
    """Load the hints parser's tables now rather than on the first query. Once, under a lock:
    two threads loading them at once (start-up and a first query) race in their imports."""
    with _warm_lock:
        if not _warm.is_set():
            query_hints.warm_up()
            _warm.set()
