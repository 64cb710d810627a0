"""PhotoFilter: what a search may be restricted to, validated with the field named, and its
row-by-row definition (`matches`), which every backend's fast form is tested against."""
from __future__ import annotations

from datetime import datetime, timezone

import pytest
from pydantic import ValidationError

from indexer.photo_columns import INFO_COLUMNS, clean_info, facets, info_counts
from indexer.photo_filter import PhotoFilter, active

LISBON = {"lat": 38.7223, "lon": -9.1393}
PORTO = {"lat": 41.1579, "lon": -8.6291}  # ~274 km from Lisbon


def _where(**fields) -> PhotoFilter:
    return PhotoFilter.model_validate(fields)


def _error_field(**fields) -> str:
    with pytest.raises(ValidationError) as err:
        PhotoFilter.model_validate(fields)
    return ".".join(str(p) for p in err.value.errors()[0]["loc"])


def test_an_empty_filter_restricts_nothing():
    assert PhotoFilter().is_empty() and active(PhotoFilter()) is None and active(None) is None
    assert _where(folders=[]).is_empty()  # no folder given is no folder filter
    assert PhotoFilter().matches(None) and PhotoFilter().matches({})
    assert not _where(has_position=False).is_empty()


@pytest.mark.parametrize("fields, name", [
    ({"colour": "red"}, "colour"),
    ({"taken_after": "2023-07-02", "taken_before": "2023-07-01"}, "taken_before"),
    ({"taken_after": "2023-07-01", "taken_before": "2023-07-01"}, "taken_before"),
    ({"taken_after": "July"}, "taken_after"),
    ({"near": {"lat": 91, "lon": 0, "km": 1}}, "near.lat"),
    ({"near": {"lat": 0, "lon": 181, "km": 1}}, "near.lon"),
    ({"near": {"lat": 0, "lon": 0, "km": 0}}, "near.km"),
    ({"near": {"lat": 0, "lon": 0, "km": -3}}, "near.km"),
    ({"near": {"lat": 0, "lon": 0}}, "near.km"),
    ({"near": {"lat": 0, "lon": 0, "km": 1, "alt": 3}}, "near.alt"),
    ({"near": {"lat": "nan", "lon": 0, "km": 1}}, "near.lat"),
    ({"min_width": -1}, "min_width"),
    ({"orientation": "diagonal"}, "orientation"),
    ({"camera": "   "}, "camera"),
    ({"city": "Oslo\x00"}, "city"),
    ({"folders": ["a\nb"]}, "folders.0"),
    ({"city": "x" * 500}, "city"),
    ({"region": "x" + " " * 300}, "region"),  # too long as sent, as the schema says
    ({"folders": ["a" + " " * 1100]}, "folders.0"),
    ({"region": "W\x85"}, "region"),  # a control character str.strip would drop
    ({"folders": ["a\x85"]}, "folders.0"),
    ({"folders": ["a"] * 101}, "folders"),
    ({"folders": "2023"}, "folders"),
])
def test_validation_names_the_field(fields, name):
    assert _error_field(**fields) == name


def test_dates_are_utc_and_folders_are_folders():
    f = _where(taken_after="2023-07-01", taken_before="2023-07-01T12:00:00+02:00",
               folders=["/2023/beach/", "2023/beach", "x"])
    assert f.taken_after == datetime(2023, 7, 1, tzinfo=timezone.utc)
    assert f.time_range() == (datetime(2023, 7, 1, tzinfo=timezone.utc).timestamp(),
                              datetime(2023, 7, 1, 10, tzinfo=timezone.utc).timestamp())
    assert f.folders == ["2023/beach", "x"]  # one form, duplicates dropped
    assert f.folder_prefixes() == ["2023/beach/", "x/"]


def _row(key="2023/beach/a.jpg", **info):
    return clean_info(info, key)


@pytest.mark.parametrize("fields, yes, no", [
    ({"folders": ["2023"]}, _row("2023/beach/a.jpg"), _row("20234/a.jpg")),
    ({"folders": ["2023/beach"]}, _row("2023/beach/a.jpg"), _row("2023/beachfront/a.jpg")),
    ({"folders": [""]}, _row("a.jpg"), None),
    ({"taken_after": "2023-07-01"}, _row(taken_at=1688169600.0), _row(taken_at=1688169599.0)),
    ({"taken_before": "2023-07-01"}, _row(taken_at=1688169599.0), _row(taken_at=1688169600.0)),
    ({"taken_before": "2023-07-01"}, _row(taken_at=0.0), _row()),
    ({"camera": "canon eos r5"}, _row(camera_make="Canon", camera_model="Canon EOS R5"),
     _row(camera_make="Canon", camera_model="Canon EOS R6")),
    ({"camera": "CANON"}, _row(camera_make="Canon "), _row(camera_model="Nikon Z6")),
    ({"country": "portugal"}, _row(country="Portugal"), _row(country="Spain")),
    ({"country": "pt"}, _row(country="Portugal", country_code="PT"), _row(country_code="ES")),
    ({"region": "lisbon"}, _row(region="Lisbon"), _row(region="Porto")),
    ({"city": "PORTO"}, _row(city="Porto"), _row(city="Lisbon")),
    ({"near": {**LISBON, "km": 300}}, _row(**PORTO), _row(lat=48.85, lon=2.35)),
    ({"near": {**LISBON, "km": 250}}, _row(**LISBON), _row(**PORTO)),
    ({"near": {"lat": 0, "lon": 179.9, "km": 50}}, _row(lat=0, lon=-179.9), _row(lat=0, lon=0)),
    ({"has_position": True}, _row(**LISBON), _row(lat=38.7)),
    ({"has_position": False}, _row(), _row(**LISBON)),
    ({"min_width": 1000}, _row(width=1000), _row(width=999)),
    ({"min_height": 1000}, _row(height=4000), _row()),
    ({"orientation": "landscape"}, _row(width=4, height=3), _row(width=3, height=4)),
    ({"orientation": "portrait"}, _row(width=3, height=4), _row(width=4, height=4)),
    ({"orientation": "square"}, _row(width=4, height=4), _row(width=4)),
])
def test_matches(fields, yes, no):
    f = _where(**fields)
    assert f.matches(yes) and not f.matches(no)


def test_clean_info_keeps_known_columns_of_their_types():
    row = clean_info({"width": "12", "lat": float("nan"), "city": 3, "colour": "red",
                      "orientation": 1.5, "taken_at": True, "country": ""}, "a/b/c.jpg")
    assert row["width"] == 12 and row["lat"] is None and row["city"] is None
    assert row["country"] is None
    assert row["orientation"] is None and row["taken_at"] is None and "colour" not in row
    assert row["folder"] == "a/b" and clean_info({}, "top.jpg")["folder"] == ""
    assert clean_info(None, "x.jpg") is None
    with pytest.raises(ValueError):
        clean_info(["not", "a", "dict"])


def test_counts_and_facets():
    rows = [_row("2023/a.jpg", taken_at=1688169600.0, taken_at_source="exif", **LISBON,
                 city="Lisbon", country="Portugal", camera_model="X100"),
            _row("2023/b.jpg", taken_at=1688169600.0, taken_at_source="modified",
                 country_code="PT", camera_make="Fujifilm"),
            _row("2024/c.jpg"), None]
    assert info_counts(rows) == {"with_date": 1, "with_position": 1, "with_place": 2}
    got = facets(rows)
    assert got["folder"] == [["2023", 2], ["2024", 1]]
    assert got["year"] == [[2023, 2]] and got["city"] == [["Lisbon", 1]]
    assert got["country"] == [["PT", 1], ["Portugal", 1]]
    assert got["camera"] == [["Fujifilm", 1], ["X100", 1]]
    assert facets(rows, limit=1)["folder"] == [["2023", 2]]


def test_the_stored_columns_are_the_photo_info_fields():
    photo_info = pytest.importorskip("indexer.photo_info")
    assert tuple(INFO_COLUMNS) == tuple(photo_info.PHOTO_INFO_FIELDS)
