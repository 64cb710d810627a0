"""What a search may be restricted to: `PhotoFilter`, the one definition the search API, the page,
the query hints and every index backend use.

Every field is optional; fields given are combined with AND. Each compares a column of the
photo's stored metadata (indexer.photo_info's PHOTO_INFO_FIELDS), and a photo lacking that
column never matches it:

    folders          any of these folders, with their subfolders: "2023/beach" matches the
                     keys under "2023/beach/" (a trailing "/" changes nothing; "" is every key)
    taken_after      taken_after <= taken_at          (naive datetimes are UTC)
    taken_before     taken_at < taken_before
    camera           equal to camera_make or camera_model, ignoring case
    country          equal to country or country_code, ignoring case
    region, city     equal to region / city, ignoring case
    near             within `km` of (lat, lon), along the great circle (earth radius
                     EARTH_RADIUS_KM)
    has_position     whether lat and lon are known
    min_width        width >= min_width; min_height likewise (as displayed)
    orientation      "landscape" (width > height), "portrait" (height > width), "square"

A backend applies the filter inside its nearest-neighbour search (a page is full whenever that
many photos match) and a version stored without metadata matches no non-empty filter.
Validation errors name the field (pydantic's `loc`): unknown fields, impossible ranges
(taken_after not before taken_before, lat outside ±90, km <= 0, ...).
"""
from __future__ import annotations

import math
import unicodedata
from datetime import datetime, timezone
from typing import Annotated, Literal

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StringConstraints, \
    ValidationInfo, field_validator

EARTH_RADIUS_KM = 6371.0088  # the mean radius (IUGG)
HALF_CIRCUMFERENCE_KM = math.pi * EARTH_RADIUS_KM  # no two points are farther apart
MAX_FOLDERS = 100
MAX_TEXT = 200  # a camera, place or folder name longer than this is no name



def _printable(value: str) -> str:
    """No control characters: no name or folder holds one, and index engines' expression
    parsers refuse some of them."""
    if any(unicodedata.category(c) == "Cc" for c in value):
        raise ValueError("must not contain control characters")
    return value


def _stripped(value: str) -> str:
    return value.strip()


def _not_blank(value: str) -> str:
    if not value:
        raise ValueError("must not be blank")
    return value


# a name compared ignoring case: surrounding blanks dropped, never empty. Length and control
# characters are checked before the blanks are dropped, as the schema says them (str.strip
# drops some control characters, U+0085 among them)
Name = Annotated[str, StringConstraints(min_length=1, max_length=MAX_TEXT),
                 AfterValidator(_printable), AfterValidator(_stripped), AfterValidator(_not_blank)]
Folder = Annotated[str, StringConstraints(max_length=1024), AfterValidator(_printable),
                   AfterValidator(_stripped)]


class Near(BaseModel):
    """A circle on the earth: within `km` of (lat, lon)."""
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False,
                              json_schema_extra={"examples": [{"lat": 38.72, "lon": -9.14,
                                                               "km": 25}]})

    lat: float = Field(ge=-90, le=90, description="latitude, degrees")
    lon: float = Field(ge=-180, le=180, description="longitude, degrees")
    km: float = Field(gt=0, le=HALF_CIRCUMFERENCE_KM, description="radius, kilometres")

    def unit_vector(self) -> tuple[float, float, float]:
        """The point on the unit sphere (x, y, z): see `unit_sphere`."""
        return unit_sphere(self.lat, self.lon)

    def min_cosine(self) -> float:
        """A photo at unit vector p is within the circle iff p · unit_vector() >= this."""
        return math.cos(self.km / EARTH_RADIUS_KM)


def unit_sphere(lat, lon):
    """(x, y, z) of a latitude/longitude in degrees on the unit sphere (scalars or numpy arrays):
    the great-circle distance of two points is EARTH_RADIUS_KM * acos(p · q), so "within km"
    is the linear test p · q >= cos(km / EARTH_RADIUS_KM)."""
    import numpy as np

    la, lo = np.radians(lat), np.radians(lon)
    x, y, z = np.cos(la) * np.cos(lo), np.cos(la) * np.sin(lo), np.sin(la)
    if np.ndim(x) == 0:
        return float(x), float(y), float(z)
    return x, y, z


def to_utc(value: datetime) -> datetime:
    """Naive datetimes are UTC; aware ones are converted to it."""
    return value.replace(tzinfo=timezone.utc) if value.tzinfo is None else \
        value.astimezone(timezone.utc)


class PhotoFilter(BaseModel):
    """What to restrict a search to (see the module doc). An empty filter restricts nothing."""
    model_config = ConfigDict(
        extra="forbid", allow_inf_nan=False,
        json_schema_extra={"examples": [
            {"folders": ["2023/beach"], "taken_after": "2023-06-01",
             "taken_before": "2023-09-01", "country": "Portugal"},
            {"near": {"lat": 48.8566, "lon": 2.3522, "km": 10}, "orientation": "landscape"},
        ]})

    folders: list[Folder] | None = Field(
        None, max_length=MAX_FOLDERS,
        description="folders (key prefixes up to a '/'), any of them, subfolders included")
    taken_after: datetime | None = Field(
        None, description="taken at or after this time (ISO 8601; without an offset: UTC)")
    taken_before: datetime | None = Field(
        None, description="taken before this time (ISO 8601; without an offset: UTC)")
    camera: Name | None = Field(None, description="camera make or model, ignoring case")
    country: Name | None = Field(None, description="country name or ISO code, ignoring case")
    region: Name | None = Field(None, description="region (state, province), ignoring case")
    city: Name | None = Field(None, description="city, ignoring case")
    near: Near | None = Field(None, description="within km of a point (great circle)")
    has_position: bool | None = Field(None, description="whether the photo's GPS position "
                                                        "is known")
    min_width: int | None = Field(None, ge=0, le=1_000_000, description="minimum width, pixels")
    min_height: int | None = Field(None, ge=0, le=1_000_000,
                                   description="minimum height, pixels")
    orientation: Literal["landscape", "portrait", "square"] | None = Field(
        None, description="landscape: wider than high; portrait: higher than wide")

    @field_validator("folders")
    @classmethod
    def _folders(cls, value):
        if value is None:
            return None
        folders = list(dict.fromkeys(f.strip("/") for f in value))
        return folders or None  # [] restricts nothing

    @field_validator("taken_after", "taken_before")
    @classmethod
    def _utc(cls, value):
        return None if value is None else to_utc(value)

    @field_validator("taken_before")
    @classmethod
    def _after_before(cls, value, info: ValidationInfo):
        after = info.data.get("taken_after")
        if value is not None and after is not None and after >= value:
            raise ValueError("taken_before must be later than taken_after")
        return value

    def is_empty(self) -> bool:
        """True when no field restricts anything."""
        return all(getattr(self, name) is None for name in type(self).model_fields)

    def time_range(self) -> tuple[float | None, float | None]:
        """(taken_after, taken_before) as unix seconds (None: unbounded)."""
        return (None if self.taken_after is None else self.taken_after.timestamp(),
                None if self.taken_before is None else self.taken_before.timestamp())

    def folder_prefixes(self) -> list[str] | None:
        """The key prefixes `folders` stands for ("" matches every key)."""
        if self.folders is None:
            return None
        return [f + "/" if f else "" for f in self.folders]

    def matches(self, info: dict | None) -> bool:
        """Whether one photo's metadata (a dict of PHOTO_INFO_FIELDS; None: none stored)
        passes: the definition the backends' vectorized forms follow (and test against)."""
        if self.is_empty():
            return True
        if info is None:
            return False
        get = info.get
        if self.folders is not None:
            folder = get("folder")
            if folder is None or not any(
                    not f or folder == f or folder.startswith(f + "/") for f in self.folders):
                return False
        after, before = self.time_range()
        if after is not None or before is not None:
            taken = _number(get("taken_at"))
            if taken is None or (after is not None and taken < after) or \
                    (before is not None and taken >= before):
                return False
        if self.camera is not None and not _same(self.camera, get("camera_make"),
                                                 get("camera_model")):
            return False
        if self.country is not None and not _same(self.country, get("country"),
                                                  get("country_code")):
            return False
        if self.region is not None and not _same(self.region, get("region")):
            return False
        if self.city is not None and not _same(self.city, get("city")):
            return False
        lat, lon = _number(get("lat")), _number(get("lon"))
        if self.has_position is not None and self.has_position != (
                lat is not None and lon is not None):
            return False
        if self.near is not None:
            if lat is None or lon is None:
                return False
            p, q = unit_sphere(lat, lon), self.near.unit_vector()
            if p[0] * q[0] + p[1] * q[1] + p[2] * q[2] < self.near.min_cosine():
                return False
        width, height = _number(get("width")), _number(get("height"))
        if self.min_width is not None and (width is None or width < self.min_width):
            return False
        if self.min_height is not None and (height is None or height < self.min_height):
            return False
        if self.orientation is not None:
            if width is None or height is None or orientation_of(width, height) != \
                    self.orientation:
                return False
        return True


def orientation_of(width: float, height: float) -> str:
    return "landscape" if width > height else "portrait" if height > width else "square"


def _number(value) -> float | None:
    if value is None or isinstance(value, bool):
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _same(wanted: str, *values) -> bool:
    """Case-insensitive equality with any of the values given."""
    wanted = wanted.casefold()
    return any(isinstance(v, str) and v.strip().casefold() == wanted for v in values)


def active(where: PhotoFilter | None) -> PhotoFilter | None:
    """The filter, or None when it restricts nothing (a backend searches unfiltered then)."""
    return None if where is None or where.is_empty() else where
