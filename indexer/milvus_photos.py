"""The photos' metadata in a Milvus collection (indexer.milvus_index): the scalar fields, their
indexes, and a PhotoFilter as a Milvus boolean expression.

Fields (every collection made since metadata exists; older ones have none and match no filter):

    has_info          BOOL      the row has metadata (a filter matches only rows that do)
    <column>          one per indexer.photo_columns.INFO_COLUMNS: DOUBLE / INT64 / VARCHAR.
                      Milvus 2.3 has no nullable fields, so an unknown value is a sentinel:
                      MISSING_FLOAT (-1e300: below any date, latitude or longitude), MISSING_INT
                      (-1: below any size), "" (no name; the top folder is "" too)
    <column>_cf       camera_make, camera_model, country, country_code, region, city once more,
                      stripped and casefolded: Milvus compares strings exactly
    folder_path       ARRAY<VARCHAR> of the folder and its ancestors ("2023", "2023/beach"): a
                      folder filter is `array_contains_any`, exact, with nothing to escape but
                      the string literal (no LIKE patterns: Milvus 2.3 cannot escape % or _);
                      MAX_FOLDER_DEPTH levels are kept
    near_x/y/z        DOUBLE, the position on the unit sphere: "within km" is the linear test
                      near_x*a + near_y*b + near_z*c >= cos(km / R) where the server evaluates
                      arithmetic over fields (milvus-lite, Milvus 2.4+); Milvus 2.3 does not,
                      and there the backend reads the rows inside the circle's bounding box and
                      names the keys (`near_box`; milvus_index does it)

Scalar indexes (INDEXED_*): INVERTED where the server has it, else Trie (VARCHAR) and STL_SORT
(numbers) as Milvus 2.3 has them.

Strings in expressions are JSON string literals (json.dumps), which the Milvus parser reads
back exactly; PhotoFilter refuses control characters, which milvus-lite's parser does not take.
"""
from __future__ import annotations

import json
import math

from indexer.photo_columns import INFO_COLUMNS, MAX_STR, folder_of
from indexer.photo_filter import EARTH_RADIUS_KM, Near, PhotoFilter, unit_sphere

MISSING_FLOAT = -1.0e300
KNOWN_FLOAT_ABOVE = "-1e299"  # `x > -1e299`: the value is known
MISSING_INT = -1
MAX_FOLDER_DEPTH = 32
FOLDED = {name: f"{name}_cf" for name in
          ("camera_make", "camera_model", "country", "country_code", "region", "city")}
UNIT = ("near_x", "near_y", "near_z")
INDEXED_NUMBERS = ("taken_at", "lat", "lon", "width", "height")
INDEXED_STRINGS = tuple(FOLDED.values())
PHOTO_FIELDS = ("has_info", *INFO_COLUMNS, *FOLDED.values(), "folder_path", *UNIT)
READ_FIELDS = ("has_info", *INFO_COLUMNS)  # what view.info reads back


def add_fields(schema) -> None:
    from pymilvus import DataType

    schema.add_field("has_info", DataType.BOOL)
    for name, kind in INFO_COLUMNS.items():
        if kind == "float":
            schema.add_field(name, DataType.DOUBLE)
        elif kind == "int":
            schema.add_field(name, DataType.INT64)
        else:
            schema.add_field(name, DataType.VARCHAR, max_length=MAX_STR * 4)  # bytes
    for name in FOLDED.values():
        schema.add_field(name, DataType.VARCHAR, max_length=MAX_STR * 4)
    schema.add_field("folder_path", DataType.ARRAY, element_type=DataType.VARCHAR,
                     max_capacity=MAX_FOLDER_DEPTH, max_length=MAX_STR * 4)
    for name in UNIT:
        schema.add_field(name, DataType.DOUBLE)


def add_indexes(index_params, family: str) -> None:
    """family: "inverted" (INVERTED for all), "legacy" (Trie, STL_SORT), "none"."""
    if family == "none":
        return
    for name in INDEXED_NUMBERS:
        index_params.add_index(name, index_type="INVERTED" if family == "inverted" else
                               "STL_SORT")
    for name in INDEXED_STRINGS:
        index_params.add_index(name, index_type="INVERTED" if family == "inverted" else "Trie")


def ancestors(folder: str) -> list[str]:
    """"a/b/c" -> ["a", "a/b", "a/b/c"] (the first MAX_FOLDER_DEPTH)."""
    if not folder:
        return []
    parts = folder.split("/")
    return ["/".join(parts[:i]) for i in range(1, min(len(parts), MAX_FOLDER_DEPTH) + 1)]


def fold(value: str) -> str:
    return value.strip().casefold()


def to_fields(row: dict | None) -> dict:
    """A cleaned row (photo_columns.clean_info) as the collection's scalar fields."""
    row = row or {}
    out = {"has_info": bool(row)}
    for name, kind in INFO_COLUMNS.items():
        value = row.get(name)
        if value is None:
            value = MISSING_FLOAT if kind == "float" else MISSING_INT if kind == "int" else ""
        out[name] = value
    for name, folded in FOLDED.items():
        out[folded] = fold(row.get(name) or "")
    out["folder_path"] = ancestors(row.get("folder") or "")
    lat, lon = row.get("lat"), row.get("lon")
    if lat is None or lon is None:
        out.update(dict.fromkeys(UNIT, 0.0))
    else:
        out.update(zip(UNIT, unit_sphere(lat, lon)))
    return out


def from_fields(entity: dict, key: str | None = None) -> dict | None:
    """The stored row back (None: none stored), sentinels as None."""
    if not entity.get("has_info"):
        return None
    row = {}
    for name, kind in INFO_COLUMNS.items():
        value = entity.get(name)
        if kind == "float":
            value = None if value is None or value <= MISSING_FLOAT / 10 else float(value)
        elif kind == "int":
            value = None if value is None or value < 0 else int(value)
        elif value == "" and name != "folder":
            value = None
        row[name] = value
    if row["folder"] is None and key is not None:
        row["folder"] = folder_of(key)
    return row


def _text(value: str) -> str:
    return json.dumps(value, ensure_ascii=False)


def _number(value: float) -> str:
    return repr(float(value))


def near_box(near: Near) -> str:
    """Rows whose position lies in the bounding box (latitude, longitude) of the circle: a
    superset of the circle, for servers without arithmetic in expressions."""
    radius = near.km / EARTH_RADIUS_KM  # radians
    dlat = math.degrees(radius)
    south, north = near.lat - dlat, near.lat + dlat
    parts = [f"lat >= {_number(max(-90.0, south))}", f"lat <= {_number(min(90.0, north))}"]
    if south > -90 and north < 90:
        ratio = math.sin(radius) / math.cos(math.radians(near.lat))
        if ratio < 1:
            dlon = math.degrees(math.asin(ratio))
            west, east = near.lon - dlon, near.lon + dlon
            if west < -180:
                parts.append(f"(lon >= {_number(west + 360)} or lon <= {_number(east)})")
            elif east > 180:
                parts.append(f"(lon >= {_number(west)} or lon <= {_number(east - 360)})")
            else:
                parts.append(f"lon >= {_number(west)} and lon <= {_number(east)}")
    return "(" + " and ".join(parts) + ")"


def near_linear(near: Near) -> str:
    a, b, c = near.unit_vector()
    return (f"(lat > {KNOWN_FLOAT_ABOVE} and near_x * {_number(a)} + near_y * {_number(b)} + "
            f"near_z * {_number(c)} >= {_number(near.min_cosine())})")


def expression(where: PhotoFilter, near: str | None = None) -> str:
    """The filter as a Milvus boolean expression; `near`: the expression standing for
    `where.near` (near_linear, or what the backend made of near_box)."""
    parts = ["has_info == true"]
    if where.folders is not None and all(where.folders):
        parts.append(f"array_contains_any(folder_path, {_text(where.folders)})")
    after, before = where.time_range()
    if after is not None:
        parts.append(f"taken_at >= {_number(after)}")
    if before is not None:
        parts.append(f"taken_at > {KNOWN_FLOAT_ABOVE} and taken_at < {_number(before)}")
    for value, names in ((where.camera, ("camera_make", "camera_model")),
                         (where.country, ("country", "country_code")),
                         (where.region, ("region",)), (where.city, ("city",))):
        if value is not None:
            parts.append("(" + " or ".join(f"{FOLDED[n]} == {_text(fold(value))}"
                                           for n in names) + ")")
    if where.has_position is True:
        parts.append(f"lat > {KNOWN_FLOAT_ABOVE} and lon > {KNOWN_FLOAT_ABOVE}")
    elif where.has_position is False:
        parts.append(f"(lat < {KNOWN_FLOAT_ABOVE} or lon < {KNOWN_FLOAT_ABOVE})")
    if where.near is not None:
        parts.append(near if near is not None else near_linear(where.near))
    if where.min_width is not None:
        parts.append(f"width >= {int(where.min_width)}")
    if where.min_height is not None:
        parts.append(f"height >= {int(where.min_height)}")
    if where.orientation is not None:
        op = {"landscape": ">", "portrait": "<", "square": "=="}[where.orientation]
        parts.append(f"width >= 0 and height >= 0 and width {op} height")
    return " and ".join(parts)
