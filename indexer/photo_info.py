"""A photo's own metadata, read from the bytes the indexer already fetched for embedding.

`extract_photo_info(data, info)` gives one dict with the fields of `PHOTO_INFO_FIELDS` (any may
be None): when it was taken (EXIF DateTimeOriginal with its OffsetTimeOriginal, or the offset
the GPS fix's UTC time implies; without either the local time is read as UTC; without EXIF the
object's last-modified time, and `taken_at_source` says which), camera make and model, the GPS position and its place (offline,
`core.places`), the size as displayed (after the EXIF orientation), the orientation, bytes,
content type and folder.

Only headers are read: Pillow opens images lazily (JPEG, PNG, WebP, TIFF, AVIF, and HEIC/HEIF
through pillow-heif), so no pixels are decoded here; a camera RAW file's size comes from
LibRaw's header and its EXIF from its TIFF structure where it has one (DNG, NEF, CR2, ARW,
...). A malformed EXIF block costs the fields it damages, never the photo: nothing here
raises for what a file contains.
"""
from __future__ import annotations

import io
import logging
import math
from datetime import datetime, timedelta, timezone
from typing import Any, Iterable

from PIL import Image

from encoder.image_formats import PILLOW_FORMATS, content_type, is_raw_key
from objectstore import ObjectInfo

log = logging.getLogger(__name__)

# the columns of a photo's metadata, in order (every value may be None)
PHOTO_INFO_FIELDS = (
    "taken_at",  # float: unix seconds, UTC
    "taken_at_source",  # "exif" | "exif-no-offset" | "modified"
    "camera_make",
    "camera_model",
    "lat",  # float degrees
    "lon",
    "city",
    "region",
    "country",
    "country_code",
    "width",  # int: as displayed
    "height",
    "orientation",  # int: EXIF orientation 1..8 (1 when absent)
    "bytes",
    "content_type",
    "folder",  # the key up to its last "/" (without it); "" at the top
)
PLACE_FIELDS = ("city", "region", "country", "country_code")

# EXIF tags (IFD0, the Exif IFD, the GPS IFD)
_MAKE, _MODEL, _ORIENTATION = 0x010F, 0x0110, 0x0112
_EXIF_IFD, _GPS_IFD = 0x8769, 0x8825
_DATETIME_ORIGINAL, _DATETIME_DIGITIZED = 0x9003, 0x9004
_OFFSET_ORIGINAL, _OFFSET_DIGITIZED = 0x9011, 0x9012
_SUBSEC_ORIGINAL, _SUBSEC_DIGITIZED = 0x9291, 0x9292
_GPS_LAT_REF, _GPS_LAT, _GPS_LON_REF, _GPS_LON = 1, 2, 3, 4
_GPS_TIME, _GPS_DATE = 7, 29  # the fix's UTC time of day (rationals) and date

# a date before photography or far in the future is a camera's unset clock, not a date
_EARLIEST_YEAR, _LATEST_YEAR = 1826, 2200
_MAX_TEXT = 128  # longest make/model kept (EXIF strings are free text)
# LibRaw's flip -> EXIF orientation
_RAW_FLIP_ORIENTATION = {0: 1, 3: 3, 5: 8, 6: 6}
# RAW formats that are TIFF inside (their IFD0 carries Make/Model and the EXIF and GPS IFDs)
_TIFF_RAW_SUFFIXES = (".dng", ".nef", ".nrw", ".cr2", ".arw", ".pef", ".srw", ".orf")


def empty_photo_info() -> dict:
    return dict.fromkeys(PHOTO_INFO_FIELDS)


def folder_of(key: str) -> str:
    """'2023/beach/a.jpg' -> '2023/beach'; 'a.jpg' -> ''."""
    return key.rpartition("/")[0]


def extract_photo_info(data: bytes, info: ObjectInfo, *, places: bool = True) -> dict:
    """The metadata of one photo (`PHOTO_INFO_FIELDS`, None where unknown) from its bytes and
    its store listing. `places=False` leaves the place empty for `add_places` to fill a whole
    batch with one lookup. Never raises for the file's content."""
    out = empty_photo_info()
    out["bytes"] = len(data) if data is not None else info.size
    out["content_type"] = content_type(info.key)
    out["folder"] = folder_of(info.key)
    try:
        if is_raw_key(info.key):
            _read_raw(data, info.key, out)
        else:
            _read_pillow(data, out)
    except Exception as exc:  # a header the readers choke on: keep what was read
        log.debug("metadata of %s partly unreadable: %s: %s", info.key, type(exc).__name__, exc)
    if out["orientation"] is None and out["width"] is not None:
        out["orientation"] = 1
    if out["taken_at"] is None and _finite(info.last_modified):
        out["taken_at"], out["taken_at_source"] = float(info.last_modified), "modified"
    if places:
        add_places([out])
    return out


def add_places(infos: Iterable[dict]) -> None:
    """Fill city/region/country/country_code of the infos with a position, in one lookup."""
    with_position = [i for i in infos if i.get("lat") is not None and i.get("lon") is not None]
    if not with_position:
        return
    from core.places import reverse

    try:
        found = reverse([(i["lat"], i["lon"]) for i in with_position])
    except Exception as exc:  # no table installed, ...: positions stay, places stay empty
        log.warning("reverse geocoding failed: %s: %s", type(exc).__name__, exc)
        return
    for i, place in zip(with_position, found):
        i.update(zip(PLACE_FIELDS, place))


# --- readers ---------------------------------------------------------------------------------
def _read_pillow(data: bytes, out: dict) -> None:
    with Image.open(io.BytesIO(data), formats=PILLOW_FORMATS) as im:  # the header only
        width, height = im.size
        upright = _size_is_upright(im)
        # pillow-heif turns the image upright itself and resets the tag to 1
        camera_orientation = im.info.get("original_orientation") if im.format == "HEIF" else None
        _read_exif(_exif_of(im), out)  # while open: a TIFF's sub-IFDs are read from its file
    if isinstance(camera_orientation, int) and 1 <= camera_orientation <= 8:
        out["orientation"] = camera_orientation
    if upright:
        out["width"], out["height"] = int(width), int(height)
    else:
        _set_size(out, width, height)


def _size_is_upright(im: Image.Image) -> bool:
    """Whether the opened image's size already is the displayed one (the decoder applies the
    orientation itself), as for the pixels `decode_image` gives."""
    if im.format == "HEIF":
        return True
    if im.format == "TIFF":  # Pillow's TIFF reader turns the size with the orientation tag
        tags = getattr(im, "tag_v2", {})
        return im.size != (tags.get(256), tags.get(257))
    return False


def _exif_of(im: Image.Image) -> Image.Exif:
    """The image's EXIF (empty when its IFD0 is unreadable)."""
    try:
        if im.format != "PNG":
            return im.getexif()
        # PngImageFile.getexif() decodes the whole image to look for an eXIf chunk after
        # the pixels; the chunk before them (where writers put it) is already in info
        exif = Image.Exif()
        raw = im.info.get("exif")
        if raw:
            exif.load(raw)
        return exif
    except Exception as exc:
        log.debug("EXIF unreadable: %s: %s", type(exc).__name__, exc)
        return Image.Exif()


def _read_raw(data: bytes, key: str, out: dict) -> None:
    if key.lower().endswith(_TIFF_RAW_SUFFIXES) and data[:4] in (b"II*\x00", b"MM\x00*"):
        try:  # IFD0 and its EXIF and GPS IFDs, parsed as EXIF (Pillow cannot open the image)
            exif = Image.Exif()
            exif.load(data)
            _read_exif(exif, out)
        except Exception as exc:
            log.debug("no TIFF EXIF in %s: %s: %s", key, type(exc).__name__, exc)
    import rawpy

    raw = rawpy.RawPy()
    try:
        raw.open_buffer(io.BytesIO(data))  # the header; nothing unpacked
        sizes = raw.sizes
        width, height, flip = int(sizes.width), int(sizes.height), int(sizes.flip)
    finally:
        raw.close()
    if out["orientation"] is None:
        out["orientation"] = _RAW_FLIP_ORIENTATION.get(flip, 1)
    if width > 0 and height > 0:
        _set_size(out, width, height)


def _set_size(out: dict, width: int, height: int) -> None:
    if out["orientation"] in (5, 6, 7, 8):  # turned a quarter: displayed the other way round
        width, height = height, width
    out["width"], out["height"] = int(width), int(height)


def _read_exif(exif: Image.Exif, out: dict) -> None:
    """Each group of fields on its own: damage in one leaves the others."""
    for read in (_read_ifd0, _read_taken_at, _read_gps):
        try:
            read(exif, out)
        except Exception as exc:
            log.debug("EXIF part unreadable (%s): %s: %s", read.__name__, type(exc).__name__, exc)


def _read_ifd0(exif: Image.Exif, out: dict) -> None:
    out["camera_make"] = _text(exif.get(_MAKE))
    out["camera_model"] = _text(exif.get(_MODEL))
    orientation = exif.get(_ORIENTATION)
    if isinstance(orientation, int) and 1 <= orientation <= 8:
        out["orientation"] = orientation


def _read_taken_at(exif: Image.Exif, out: dict) -> None:
    ifd = exif.get_ifd(_EXIF_IFD)
    for stamp, offset, subsec in ((_DATETIME_ORIGINAL, _OFFSET_ORIGINAL, _SUBSEC_ORIGINAL),
                                  (_DATETIME_DIGITIZED, _OFFSET_DIGITIZED, _SUBSEC_DIGITIZED)):
        local = _exif_datetime(ifd.get(stamp), ifd.get(subsec))
        if local is None:
            continue
        zone = _exif_offset(ifd.get(offset)) or _offset_from_gps_clock(exif, local)
        out["taken_at"] = local.replace(tzinfo=zone or timezone.utc).timestamp()
        out["taken_at_source"] = "exif" if zone is not None else "exif-no-offset"
        return


def _offset_from_gps_clock(exif: Image.Exif, local: datetime) -> timezone | None:
    """Cameras without offset tags often record the GPS fix's UTC time: the local time's
    difference from it, to the nearest quarter hour, is the zone the camera's clock was in."""
    try:
        gps = exif.get_ifd(_GPS_IFD)
        day = _text(gps.get(_GPS_DATE))
        hms = [float(x) for x in gps.get(_GPS_TIME) or ()]
        if day is None or len(hms) != 3 or not all(math.isfinite(x) and x >= 0 for x in hms):
            return None
        utc = datetime.strptime(day[:10].replace("-", ":"), "%Y:%m:%d") + timedelta(
            hours=hms[0], minutes=hms[1], seconds=hms[2])
    except Exception:
        return None
    quarters = round((local - utc).total_seconds() / 900)
    if abs(quarters) > 14 * 4:  # no zone is that far: the clocks disagree, not the zones
        return None
    return timezone(timedelta(minutes=15 * quarters))


def _read_gps(exif: Image.Exif, out: dict) -> None:
    gps = exif.get_ifd(_GPS_IFD)
    lat = _degrees(gps.get(_GPS_LAT), gps.get(_GPS_LAT_REF), "NS", 90)
    lon = _degrees(gps.get(_GPS_LON), gps.get(_GPS_LON_REF), "EW", 180)
    if lat is None or lon is None or (lat == 0 and lon == 0):  # 0/0: a receiver without a fix
        return
    out["lat"], out["lon"] = lat, lon


# --- values ----------------------------------------------------------------------------------
def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _text(value: Any) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("utf-8", "replace")
    if not isinstance(value, str):
        return None
    value = " ".join(value.replace("\x00", " ").split())  # NUL padding, stray whitespace
    value = "".join(c for c in value if c.isprintable())[:_MAX_TEXT]
    return value or None


def _exif_datetime(value: Any, subsec: Any = None) -> datetime | None:
    """'2023:07:14 18:30:05' (dashes or a 'T' tolerated) -> a naive datetime; None when it is
    not one ('0000:00:00 00:00:00', blanks, garbage)."""
    text = _text(value)
    if text is None or len(text) < 19:
        return None
    text = text[:19].replace("-", ":").replace("T", " ")
    try:
        stamp = datetime.strptime(text, "%Y:%m:%d %H:%M:%S")
    except ValueError:
        return None
    if not _EARLIEST_YEAR <= stamp.year <= _LATEST_YEAR:
        return None
    digits = (_text(subsec) or "").strip()
    if digits.isdigit():
        stamp += timedelta(seconds=int(digits[:6]) / 10 ** len(digits[:6]))
    return stamp


def _exif_offset(value: Any) -> timezone | None:
    """'+02:00' / '-05:30' -> that zone; None when absent or malformed."""
    text = _text(value)
    if text is None or len(text) != 6 or text[0] not in "+-" or text[3] != ":":
        return None
    hours, minutes = text[1:3], text[4:6]
    if not (hours.isdigit() and minutes.isdigit()) or int(hours) > 14 or int(minutes) > 59:
        return None
    delta = timedelta(hours=int(hours), minutes=int(minutes))
    return timezone(-delta if text[0] == "-" else delta)


def _degrees(value: Any, ref: Any, hemispheres: str, limit: float) -> float | None:
    """EXIF GPS degrees/minutes/seconds rationals and N/S (or E/W) -> signed degrees."""
    if value is None:
        return None
    parts = list(value) if isinstance(value, (tuple, list)) else [value]
    if not 1 <= len(parts) <= 3:
        return None
    try:
        numbers = [float(p) for p in parts]
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    if not all(math.isfinite(n) and n >= 0 for n in numbers):
        return None
    degrees = sum(n / 60 ** i for i, n in enumerate(numbers))
    ref_text = (_text(ref) or hemispheres[0]).upper()[:1]
    if ref_text not in hemispheres:
        return None
    if degrees > limit:
        return None
    return -degrees if ref_text == hemispheres[1] else degrees
