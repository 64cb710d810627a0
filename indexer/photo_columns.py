"""How an index stores a photo's metadata: the type of each column, the one cleaning every
backend applies before storing a row, and what `info_counts` and `facets` count.

    INFO_COLUMNS        column -> "float" | "int" | "str", in PHOTO_INFO_FIELDS order
                        (indexer.photo_info); a backend stores exactly these
    clean_info(info, key)   the row a backend stores: known columns only, values of the
                        column's type (None for a value that is not one), `folder` from the
                        key when the row has none; None for no metadata at all
    info_counts(rows)   {"with_date", "with_position", "with_place"}: a date read from the
                        photo (not the object's last-modified), a GPS position, a place name
    facets(rows, limit) {"folder" | "country" | "city" | "camera" | "year": [[value, count]]},
                        most common first (ties by value), at most `limit` each; camera is
                        the model (else the make), year the UTC year of taken_at

Light: no numpy, no pyarrow (the service and the numpy test backend use these on plain dicts).
"""
from __future__ import annotations

import math
from collections import Counter
from datetime import datetime, timezone
from typing import Iterable

INFO_COLUMNS: dict[str, str] = {
    "taken_at": "float",
    "taken_at_source": "str",
    "camera_make": "str",
    "camera_model": "str",
    "lat": "float",
    "lon": "float",
    "city": "str",
    "region": "str",
    "country": "str",
    "country_code": "str",
    "width": "int",
    "height": "int",
    "orientation": "int",
    "bytes": "int",
    "content_type": "str",
    "folder": "str",
}
FACETS = ("folder", "country", "city", "camera", "year")
MAX_STR = 1024  # longer strings are cut: a name, a folder, a content type is never this long
DATE_NOT_READ = "modified"  # taken_at_source of a date that is the object's last-modified


def folder_of(key: str) -> str:
    """The key up to its last "/" ("" at the top)."""
    return key.rsplit("/", 1)[0] if "/" in key else ""


def _value(kind: str, value):
    if value is None or isinstance(value, bool):
        return None
    try:
        if kind == "str":
            return value[:MAX_STR] if isinstance(value, str) else None
        if kind == "int":
            number = float(value)
            return int(number) if math.isfinite(number) and number == int(number) and \
                abs(number) < 2 ** 62 else None
        number = float(value)
        return number if math.isfinite(number) else None
    except (TypeError, ValueError, OverflowError):
        return None


def clean_info(info: dict | None, key: str | None = None) -> dict | None:
    """The row stored for one photo (see the module doc)."""
    if info is None:
        return None
    if not isinstance(info, dict):
        raise ValueError(f"photo metadata must be a dict or None, not {type(info).__name__}")
    row = {name: _value(kind, info.get(name)) for name, kind in INFO_COLUMNS.items()}
    if row["folder"] is None and key is not None:
        row["folder"] = folder_of(key)
    return row


def check_infos(info: list | None, n: int) -> list | None:
    """`info=` of a write: None, or one dict (or None) per row."""
    if info is None:
        return None
    info = list(info)
    if len(info) != n:
        raise ValueError(f"info has {len(info)} entries for {n} rows")
    return info


def public_info(row: dict | None) -> dict | None:
    """What `view.info` returns for a stored row: its known values (None: nothing known)."""
    if row is None:
        return None
    out = {k: v for k, v in row.items() if v is not None and k in INFO_COLUMNS}
    return out or None


def has_date(row: dict) -> bool:
    return row.get("taken_at") is not None and row.get("taken_at_source") != DATE_NOT_READ


def has_position(row: dict) -> bool:
    return row.get("lat") is not None and row.get("lon") is not None


def has_place(row: dict) -> bool:
    return any(row.get(k) for k in ("city", "region", "country", "country_code"))


def info_counts(rows: Iterable[dict | None]) -> dict[str, int]:
    counts = {"with_date": 0, "with_position": 0, "with_place": 0}
    for row in rows:
        if row:
            counts["with_date"] += has_date(row)
            counts["with_position"] += has_position(row)
            counts["with_place"] += has_place(row)
    return counts


def year_of(taken_at: float) -> int | None:
    try:
        return datetime.fromtimestamp(taken_at, timezone.utc).year
    except (OverflowError, OSError, ValueError):
        return None


def facet_values(row: dict) -> dict:
    """The value each facet counts this row under (None: not counted)."""
    taken = row.get("taken_at")
    return {"folder": row.get("folder"),
            "country": row.get("country") or row.get("country_code"),
            "city": row.get("city"),
            "camera": row.get("camera_model") or row.get("camera_make"),
            "year": None if taken is None else year_of(taken)}


def top(counter: Counter, limit: int) -> list[list]:
    ranked = sorted(counter.items(), key=lambda kv: (-kv[1], str(kv[0])))
    return [[value, count] for value, count in ranked[:max(0, int(limit))]]


def facets(rows: Iterable[dict | None], limit: int = 20) -> dict[str, list[list]]:
    counters = {name: Counter() for name in FACETS}
    for row in rows:
        if row:
            for name, value in facet_values(row).items():
                if value not in (None, ""):  # the top folder "" is every key's prefix
                    counters[name][value] += 1
    return {name: top(c, limit) for name, c in counters.items()}
