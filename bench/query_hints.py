"""Query hints: precision and recall of the dates and places read from query text, and the
time they cost per query.

    python bench/query_hints.py [--cases tests/search_api/query_hints_cases.json] [--rounds 20]

Reads every labelled query of the cases file with search_api.query_hints.read_hints at the
file's clock. An item is one thing read: the date range (taken_after and taken_before
together) or one place field; it is right when the case lists it with that value. Precision:
right items / items read; recall: right items / items listed; "clean": cases listing nothing
where nothing was read. Then the time per query, warm (every query, `--rounds` times; the
phrases dateparser already parsed come from its cache, as in a running service), the first
read of each query with the cache emptied, and a hostile text of MAX_QUERY_CHARS characters
full of years, months and place cues.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

CASES = ROOT / "tests" / "search_api" / "query_hints_cases.json"


def _instant(value):
    from indexer.photo_filter import to_utc

    return None if value is None else to_utc(datetime.fromisoformat(value)
                                             if isinstance(value, str) else value)


def _items(fields: dict) -> set:
    items = set()
    after, before = fields.get("taken_after"), fields.get("taken_before")
    if after is not None or before is not None:
        items.add(("taken", _instant(after), _instant(before)))
    for name in ("country", "region", "city"):
        if fields.get(name) is not None:
            items.add((name, str(fields[name]).casefold()))
    return items


def evaluate(cases_path: Path = CASES) -> dict:
    """Read every case; the scores and each case's outcome."""
    from search_api.query_hints import read_hints

    spec = json.loads(Path(cases_path).read_text(encoding="utf-8"))
    now = datetime.fromisoformat(spec["now"])
    outcomes = []
    read_total = right_total = listed_total = 0
    for case in spec["cases"]:
        got = read_hints(case["query"], now, case.get("tz", "UTC"))
        read = _items(got.filters.model_dump(exclude_none=True))
        listed = _items(case["read"])
        right = read & listed
        read_total, right_total, listed_total = (read_total + len(read),
                                                 right_total + len(right),
                                                 listed_total + len(listed))
        outcomes.append({"query": case["query"], "listed": listed, "read": read,
                         "text": got.text, "expected_text": case.get("text"),
                         "ok": read == listed and case.get("text", got.text) == got.text})
    negatives = [o for o in outcomes if not o["listed"]]
    with_text = [o for o in outcomes if o["expected_text"] is not None]
    return {
        "cases": len(outcomes),
        "precision": right_total / read_total if read_total else 1.0,
        "recall": right_total / listed_total if listed_total else 1.0,
        "items_read": read_total, "items_listed": listed_total, "items_right": right_total,
        "negatives": len(negatives),
        "negatives_clean": sum(1 for o in negatives if not o["read"]),
        "text_cases": len(with_text),
        "text_right": sum(1 for o in with_text if o["text"] == o["expected_text"]),
        "outcomes": outcomes,
    }


def _hostile_text(limit: int) -> str:
    unit = "in Paris July 2019 since 2020 last summer 3 weeks ago Nice, France "
    return (unit * (limit // len(unit) + 1))[:limit]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=Path, default=CASES)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()

    from core.settings import RequestLimits
    from search_api import query_hints

    started = time.perf_counter()
    query_hints.warm_up()
    warm_up_s = time.perf_counter() - started

    result = evaluate(args.cases)
    for outcome in result["outcomes"]:
        if not outcome["ok"]:
            print(f"  differs: {outcome['query']!r}: read {sorted(map(str, outcome['read']))}"
                  f" listed {sorted(map(str, outcome['listed']))} text {outcome['text']!r}")
    print(f"cases {result['cases']}: precision {result['precision']:.3f} "
          f"({result['items_right']}/{result['items_read']} items read are right), recall "
          f"{result['recall']:.3f} ({result['items_right']}/{result['items_listed']}); "
          f"must-not cases clean {result['negatives_clean']}/{result['negatives']}; "
          f"remaining text right {result['text_right']}/{result['text_cases']}")

    spec = json.loads(Path(args.cases).read_text(encoding="utf-8"))
    now = datetime.fromisoformat(spec["now"])
    queries = [(c["query"], c.get("tz", "UTC")) for c in spec["cases"]]
    cold = []
    for query, tz in queries:
        query_hints._parse_cached.cache_clear()
        t = time.perf_counter()
        query_hints.read_hints(query, now, tz)
        cold.append((time.perf_counter() - t) * 1000)
    warm = []
    for _ in range(args.rounds):
        for query, tz in queries:
            t = time.perf_counter()
            query_hints.read_hints(query, now, tz)
            warm.append((time.perf_counter() - t) * 1000)
    limit = RequestLimits().max_query_chars
    hostile = _hostile_text(limit)
    hostile_ms = []
    for _ in range(5):
        query_hints._parse_cached.cache_clear()
        t = time.perf_counter()
        query_hints.read_hints(hostile, now)
        hostile_ms.append((time.perf_counter() - t) * 1000)
    warm.sort()
    print(f"time per query: warm mean {statistics.mean(warm):.3f} ms, p50 "
          f"{warm[len(warm) // 2]:.3f} ms, p99 {warm[int(len(warm) * 0.99)]:.3f} ms; "
          f"dateparser cache empty: mean {statistics.mean(cold):.3f} ms, max {max(cold):.2f} ms; "
          f"hostile {limit}-char text: max {max(hostile_ms):.2f} ms; "
          f"warm_up (place table, word list, parser) {warm_up_s:.2f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
