"""Dates and places read from query text (search_api.query_hints), scored on the labelled set
tests/search_api/query_hints_cases.json with the same code as bench/query_hints.py."""
from __future__ import annotations

import time
from datetime import datetime, timedelta, timezone

import pytest

from bench.query_hints import evaluate
from core.settings import RequestLimits
from search_api.query_hints import MAX_DATE_PHRASES, MAX_HINT_TEXT_CHARS, Hint, read_hints, \
    warm_up

NOW = datetime(2025, 10, 15, 12, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def scores():
    warm_up()
    return evaluate()


def test_labelled_set_precision_and_recall(scores):
    wrong = [o["query"] for o in scores["outcomes"] if not o["ok"]]
    # what is read must be right (a wrong filter hides the photos sought); a miss only leaves
    # the words to the model
    assert scores["precision"] >= 0.95, wrong
    assert scores["recall"] >= 0.85, wrong
    assert scores["cases"] >= 60


def test_nothing_is_read_from_the_must_not_queries(scores):
    read = [(o["query"], o["read"]) for o in scores["outcomes"] if not o["listed"] and o["read"]]
    assert read == []
    assert scores["negatives"] >= 25


def test_the_rest_of_the_text_is_what_remains(scores):
    assert scores["text_right"] >= 0.9 * scores["text_cases"]


def test_a_date_range_is_one_hint_with_its_words():
    hints = read_hints("beach in July 2023", NOW)
    assert hints.text == "beach"
    assert hints.hints == [Hint("taken", {"after": "2023-07-01T00:00:00+00:00",
                                          "before": "2023-08-01T00:00:00+00:00"},
                                "in July 2023")]
    assert hints.filters.taken_after == datetime(2023, 7, 1, tzinfo=timezone.utc)
    assert hints.filters.taken_before == datetime(2023, 8, 1, tzinfo=timezone.utc)


def test_places_and_one_sided_dates():
    hints = read_hints("snow in Norway since 2020", NOW)
    assert hints.text == "snow"
    assert {(h.field, h.text) for h in hints.hints} == {("taken_after", "since 2020"),
                                                       ("country", "in Norway")}
    assert hints.filters.country == "Norway" and hints.filters.taken_before is None


def test_days_start_at_midnight_in_the_zone_and_naive_now_is_utc():
    naive = read_hints("yesterday", NOW.replace(tzinfo=None), "America/New_York")
    assert naive.filters.taken_after == datetime(2025, 10, 14, 4, 0, tzinfo=timezone.utc)
    unknown_zone = read_hints("yesterday", NOW, "Not/A_Zone")
    assert unknown_zone.filters.taken_after == datetime(2025, 10, 14, tzinfo=timezone.utc)


def test_nothing_read_leaves_text_and_filter_alone():
    for text in ("a dog named July", "", "   "):
        hints = read_hints(text, NOW)
        assert hints.text == text and hints.filters.is_empty() and hints.hints == []


def test_future_years_and_counts_are_not_dates():
    assert read_hints(f"plans for {NOW.year + 3}", NOW).hints == []
    assert read_hints("1899 coins", NOW).hints == []


def test_hostile_texts_are_bounded():
    limit = RequestLimits().max_query_chars
    unit = "in Paris July 2019 since 2020 last summer 3 weeks ago Nice, France "
    hostile = (unit * (limit // len(unit) + 1))[:limit]
    warm_up()
    started = time.perf_counter()
    hints = read_hints(hostile, NOW)
    assert time.perf_counter() - started < 1.0
    assert sum(1 for h in hints.hints if h.field.startswith("taken")) <= 1
    assert len(hints.hints) <= 1 + 3  # one date range, at most one of each place field
    too_long = "in Paris " * (MAX_HINT_TEXT_CHARS // 9 + 1)
    assert read_hints(too_long, NOW).hints == []
    assert MAX_DATE_PHRASES >= 2


def test_reading_costs_well_under_a_few_milliseconds(scores):
    queries = [o["query"] for o in scores["outcomes"]]
    started = time.perf_counter()
    for _ in range(3):
        for query in queries:
            read_hints(query, NOW + timedelta(seconds=1))
    per_query_ms = (time.perf_counter() - started) * 1000 / (3 * len(queries))
    assert per_query_ms < 5.0  # ~0.1 ms measured; the margin is for a loaded shared machine


def test_short_texts_are_read_on_the_event_loop_once_the_parser_is_loaded(monkeypatch):
    """Reading a short query's hints costs less than a thread hop: on the event loop once the
    tables are loaded; a long text, or a parser still loading, goes to the thread pool."""
    import asyncio
    import threading

    from search_api import text_queries

    def where(text):
        return threading.current_thread().name

    async def run(text):
        return await text_queries.run_parser(where, len(text), text)

    loop_thread = threading.current_thread().name
    text_queries.warm_up()
    short, long = "snow in Norway last winter", "a dog " * 40
    assert len(short) <= text_queries.INLINE_MAX_CHARS < len(long)
    assert asyncio.run(run(short)) == loop_thread
    assert asyncio.run(run(long)) != loop_thread
    monkeypatch.setattr(text_queries, "_warm", threading.Event())  # tables not loaded yet
    assert asyncio.run(run(short)) != loop_thread
