"""A photo's own metadata: EXIF date and offset, camera, GPS and place, displayed size, in every
format the index reads, from photos made here; damaged EXIF never raises."""
import random
from datetime import datetime, timedelta, timezone

import pytest
from PIL import Image, ImageFile

from encoder.preprocessing import decode_image
from indexer.photo_info import PHOTO_INFO_FIELDS, add_places, extract_photo_info, folder_of
from objectstore import ObjectInfo
from tests.photo_samples import dng_bytes, image_bytes, photo_bytes, photo_exif

MODIFIED = 1_700_000_000.0
JULY_14_2023_1830_PLUS2 = datetime(2023, 7, 14, 18, 30, 5,
                                   tzinfo=timezone(timedelta(hours=2))).timestamp()


def listing(key: str, data: bytes, last_modified: float | None = MODIFIED) -> ObjectInfo:
    return ObjectInfo(key, len(data), "etag", last_modified)


def info_of(key: str, data: bytes, last_modified: float | None = MODIFIED, **kw) -> dict:
    out = extract_photo_info(data, listing(key, data, last_modified), **kw)
    assert tuple(out) == PHOTO_INFO_FIELDS
    return out


@pytest.mark.parametrize("fmt,suffix,mime", [
    ("JPEG", "jpg", "image/jpeg"),
    ("HEIF", "heic", "image/heic"),
    ("AVIF", "avif", "image/avif"),
    ("WEBP", "webp", "image/webp"),
    ("PNG", "png", "image/png"),
    ("TIFF", "TIF", "image/tiff"),
])
def test_exif_date_camera_position_and_place(fmt, suffix, mime):
    data = photo_bytes(fmt, photo_exif(), size=(80, 60))
    info = info_of(f"2023/beach/IMG_1.{suffix}", data)
    assert info["taken_at"] == pytest.approx(JULY_14_2023_1830_PLUS2)
    assert info["taken_at_source"] == "exif"
    assert (info["camera_make"], info["camera_model"]) == ("Canon", "EOS R6")
    assert info["lat"] == pytest.approx(38.7223, abs=1e-4)
    assert info["lon"] == pytest.approx(-9.1393, abs=1e-4)
    assert (info["city"], info["country"], info["country_code"]) == ("Lisbon", "Portugal", "PT")
    assert info["region"] == "Lisbon"
    assert (info["width"], info["height"], info["orientation"]) == (80, 60, 1)
    assert info["bytes"] == len(data) and info["content_type"] == mime
    assert info["folder"] == "2023/beach"


def test_southern_and_western_hemispheres_are_negative():
    sydney = info_of("a.jpg", photo_bytes("JPEG", photo_exif(position=(-33.8688, 151.2093))))
    assert sydney["lat"] == pytest.approx(-33.8688, abs=1e-4) and sydney["lon"] > 0
    assert (sydney["city"], sydney["country_code"]) == ("Sydney", "AU")
    rio = info_of("a.jpg", photo_bytes("JPEG", photo_exif(position=(-22.9068, -43.1729))))
    assert rio["lat"] < 0 and rio["lon"] < 0 and rio["country"] == "Brazil"


def test_a_date_without_offset_is_read_as_utc_and_says_so():
    info = info_of("a.jpg", photo_bytes("JPEG", photo_exif(offset=None)))
    assert info["taken_at"] == datetime(2023, 7, 14, 18, 30, 5, tzinfo=timezone.utc).timestamp()
    assert info["taken_at_source"] == "exif-no-offset"


def test_without_an_offset_the_gps_clock_gives_the_zone():
    exif = photo_exif(offset=None)  # 18:30:05 local
    gps = exif.get_ifd(0x8825)
    gps[29], gps[7] = "2023:07:14", (16.0, 30.0, 3.0)  # the fix at 16:30:03 UTC
    info = info_of("a.jpg", photo_bytes("JPEG", exif))
    assert info["taken_at"] == pytest.approx(JULY_14_2023_1830_PLUS2)
    assert info["taken_at_source"] == "exif"
    gps[29] = "2023:07:01"  # a fix two weeks off: no zone is that far, read as UTC
    info = info_of("a.jpg", photo_bytes("JPEG", exif))
    assert info["taken_at_source"] == "exif-no-offset"


def test_negative_offset_and_subseconds():
    exif = photo_exif(offset="-05:30")
    exif.get_ifd(0x8769)[0x9291] = "25"  # SubSecTimeOriginal: .25 s
    info = info_of("a.jpg", photo_bytes("JPEG", exif))
    expected = datetime(2023, 7, 14, 18, 30, 5, 250000,
                        tzinfo=timezone(-timedelta(hours=5, minutes=30))).timestamp()
    assert info["taken_at"] == pytest.approx(expected) and info["taken_at_source"] == "exif"


def test_digitized_date_when_there_is_no_original():
    exif = photo_exif(taken=None, offset=None)
    exif.get_ifd(0x8769)[0x9004] = "2019:01:02 03:04:05"
    info = info_of("a.jpg", photo_bytes("JPEG", exif))
    assert info["taken_at"] == datetime(2019, 1, 2, 3, 4, 5, tzinfo=timezone.utc).timestamp()


def test_png_without_exif_takes_the_modified_date():
    data = image_bytes("PNG", (30, 20))
    info = info_of("top.png", data)
    assert (info["taken_at"], info["taken_at_source"]) == (MODIFIED, "modified")
    assert info["camera_make"] is None and info["lat"] is None and info["city"] is None
    assert (info["width"], info["height"], info["orientation"]) == (30, 20, 1)
    assert info["folder"] == "" and info["content_type"] == "image/png"
    unknown = info_of("top.png", data, last_modified=None)
    assert unknown["taken_at"] is None and unknown["taken_at_source"] is None


@pytest.mark.parametrize("taken", ["0000:00:00 00:00:00", "    :  :     :  :  ", "garbage",
                                   "2023:13:45 99:99:99", ""])
def test_an_unset_camera_clock_is_no_date(taken):
    info = info_of("a.jpg", photo_bytes("JPEG", photo_exif(taken=taken)))
    assert info["taken_at_source"] == "modified" and info["taken_at"] == MODIFIED
    assert info["camera_make"] == "Canon"  # the rest of the EXIF still counts


def test_a_position_at_zero_zero_is_no_position():
    info = info_of("a.jpg", photo_bytes("JPEG", photo_exif(position=(0.0, 0.0))))
    assert info["lat"] is None and info["lon"] is None and info["country"] is None


def test_a_position_in_open_sea_has_no_place():
    info = info_of("a.jpg", photo_bytes("JPEG", photo_exif(position=(0.5, -150.0))))
    assert info["lat"] == pytest.approx(0.5, abs=1e-4) and info["city"] is None


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_size_is_as_displayed(fmt, orientation):
    data = photo_bytes(fmt, photo_exif(orientation=orientation, taken=None, position=None))
    info = info_of("a.x", data)
    assert (info["width"], info["height"]) == decode_image(data, min_side=None).size
    if orientation in (5, 6, 7, 8):
        assert (info["width"], info["height"]) == (48, 64)
    assert info["orientation"] == orientation


def test_tiff_camera_and_orientation():
    data = photo_bytes("TIFF", photo_exif(orientation=6, position=None))
    info = info_of("scans/a.TIFF", data)
    assert (info["camera_make"], info["camera_model"]) == ("Canon", "EOS R6")
    assert info["taken_at"] == pytest.approx(JULY_14_2023_1830_PLUS2)
    assert (info["width"], info["height"], info["orientation"]) == (48, 64, 6)
    assert info["content_type"] == "image/tiff" and info["folder"] == "scans"


def test_camera_raw_size_bytes_folder_and_camera():
    for data in (dng_bytes(64, 48), dng_bytes(64, 48, preview=image_bytes("JPEG", (32, 24)))):
        info = info_of("2024/raw/IMG_2.DNG", data)
        assert (info["width"], info["height"], info["orientation"]) == (64, 48, 1)
        assert (info["camera_make"], info["camera_model"]) == ("Test", "Bayer")  # pidng's tags
        assert info["bytes"] == len(data) and info["folder"] == "2024/raw"
        assert info["content_type"] == "image/x-adobe-dng"
        assert info["taken_at_source"] == "modified"


def test_camera_raw_exif_date_and_position_from_its_tiff_structure():
    # a TIFF-structured file (as NEF, CR2, ARW are) whose IFD0 points to Exif and GPS IFDs
    tiff = photo_exif().tobytes()[len(b"Exif\0\0"):]
    info = info_of("trip/DSC_1.NEF", tiff)
    assert info["taken_at"] == pytest.approx(JULY_14_2023_1830_PLUS2)
    assert info["country_code"] == "PT" and info["camera_model"] == "EOS R6"
    assert info["width"] is None  # LibRaw finds no image in it: no size, no error


def test_headers_only_no_pixels_are_decoded(monkeypatch):
    import pillow_heif

    def no_decoding(self, *a, **kw):
        raise AssertionError("pixels decoded while reading metadata")

    monkeypatch.setattr(ImageFile.ImageFile, "load", no_decoding)
    monkeypatch.setattr(pillow_heif.HeifImageFile, "load", no_decoding, raising=False)
    for fmt in ("JPEG", "PNG", "WEBP", "TIFF", "HEIF", "AVIF"):
        info = info_of("a.x", photo_bytes(fmt, photo_exif(), size=(40, 30)))
        assert (info["width"], info["height"]) == (40, 30), fmt
        assert info["taken_at_source"] == "exif" and info["country_code"] == "PT", fmt


def _damaged(block: bytes, rng: random.Random) -> bytes:
    data = bytearray(block)
    how = rng.randrange(3)
    if how == 0:  # flipped bytes (offsets, counts, types)
        for _ in range(rng.randint(1, 12)):
            data[rng.randrange(6, len(data))] = rng.randrange(256)
    elif how == 1:  # cut short
        data = data[:rng.randrange(6, len(data))]
    else:  # garbage after the header
        data = data[:14] + bytes(rng.randrange(256) for _ in range(rng.randrange(1, 200)))
    return bytes(data)


@pytest.mark.parametrize("fmt", ["JPEG", "WEBP", "PNG"])
def test_damaged_exif_never_raises(fmt):
    rng = random.Random(19)
    block = photo_exif(orientation=3).tobytes()
    for _ in range(150):
        data = photo_bytes(fmt, _damaged(block, rng))
        info = info_of("d/a.jpg", data)  # must not raise
        assert info["bytes"] == len(data) and info["folder"] == "d"
        assert info["width"] in (64, 48) and info["taken_at"] is not None
        assert info["lat"] is None or -90 <= info["lat"] <= 90
        assert info["orientation"] in range(1, 9)


def test_impossible_values_are_dropped_not_raised():
    exif = photo_exif(make="\x00Canon\x00  ", model=None, position=None, offset="+99:99")
    gps = exif.get_ifd(0x8825)
    gps[1], gps[2], gps[3], gps[4] = "N", (123.0, 0.0, 0.0), "X", (1.0, 2.0, 3.0)
    exif[0x0112] = 42
    info = info_of("a.jpg", photo_bytes("JPEG", exif))
    assert info["camera_make"] == "Canon" and info["camera_model"] is None
    assert info["lat"] is None and info["lon"] is None
    assert info["orientation"] == 1 and info["taken_at_source"] == "exif-no-offset"


def test_files_that_are_not_images_give_what_the_listing_knows():
    for key in ("a.jpg", "b.heic", "c.NEF", "d.dng", "e.tif"):
        info = info_of(f"x/{key}", b"\x00garbage" * 3)
        assert info["width"] is None and info["bytes"] == 24 and info["folder"] == "x"
        assert info["taken_at_source"] == "modified"


def test_places_of_a_batch_in_one_lookup(monkeypatch):
    from core import places

    calls = []
    real = places.reverse
    monkeypatch.setattr(places, "reverse", lambda points: calls.append(list(points)) or real(points))
    infos = [info_of(f"{i}.jpg", photo_bytes("JPEG", photo_exif(position=p)), places=False)
             for i, p in enumerate([(38.7223, -9.1393), None, (48.8566, 2.3522)])]
    assert all(i["city"] is None for i in infos) and not calls
    add_places(infos)
    assert len(calls) == 1 and len(calls[0]) == 2
    assert [i["city"] for i in infos] == ["Lisbon", None, "Paris"]


def test_folder_of():
    assert folder_of("2023/beach/a.jpg") == "2023/beach"
    assert folder_of("a.jpg") == ""


def test_the_pipeline_reads_each_photos_metadata_once_with_its_pixels(encoder, tmp_path,
                                                                     monkeypatch):
    from core import places
    from indexer import pipeline
    from objectstore import LocalStore

    store = LocalStore(tmp_path / "store", "b")
    photos = {
        "2023/beach/a.jpg": photo_bytes("JPEG", photo_exif()),
        "2023/beach/b.heic": photo_bytes("HEIF", photo_exif(position=(48.8566, 2.3522))),
        "2023/c.png": image_bytes("PNG", (30, 20)),
        "2023/d.jpg": photo_bytes("JPEG", photo_exif(position=None, orientation=6)),
        "2023/e.jpg": photo_bytes("JPEG", photo_exif(position=(-33.8688, 151.2093))),
        "2023/zz broken.jpg": b"\xff\xd8\xff\xe0 not really a JPEG",
    }
    for key, data in photos.items():
        store.put(key, data)
    gets, lookups = [], []
    real_get, real_reverse = store.get, places.reverse
    monkeypatch.setattr(store, "get", lambda key: gets.append(key) or real_get(key))
    monkeypatch.setattr(places, "reverse",
                        lambda points: lookups.append(len(points)) or real_reverse(points))

    objects = sorted(store.list("2023/"), key=lambda o: o.key)
    res = pipeline.embed_objects(store, encoder, objects, batch_size=3, progress=False)

    assert sorted(gets) == sorted(photos)  # one download each
    assert lookups == [2, 1]  # one lookup per batch, for the photos with a position
    assert list(res.failed) == ["2023/zz broken.jpg"]
    assert len(res.infos) == len(res.keys) == len(res.vectors) == 5
    by_key = dict(zip(res.keys, res.infos))
    assert by_key["2023/beach/a.jpg"]["city"] == "Lisbon"
    assert by_key["2023/beach/b.heic"]["city"] == "Paris"
    assert by_key["2023/beach/b.heic"]["folder"] == "2023/beach"
    assert by_key["2023/c.png"]["taken_at_source"] == "modified"
    assert by_key["2023/c.png"]["taken_at"] == pytest.approx(
        next(o.last_modified for o in objects if o.key == "2023/c.png"))
    assert (by_key["2023/d.jpg"]["width"], by_key["2023/d.jpg"]["height"]) == (48, 64)
    assert by_key["2023/e.jpg"]["country_code"] == "AU"
    assert all(i["bytes"] == len(photos[k]) for k, i in by_key.items())


def _library_store(root):
    from objectstore import LocalStore

    store = LocalStore(root, "b")
    store.put("lib/2023/beach/a.jpg", photo_bytes("JPEG", photo_exif()))
    store.put("lib/2024/b.heic", photo_bytes("HEIF", photo_exif(position=(48.8566, 2.3522),
                                                                 offset=None)))
    store.put("lib/c.png", image_bytes("PNG", (30, 20)))
    return store


def _index(kind, root):
    if kind == "faiss":
        from indexer.faiss_index import FaissIndex

        return FaissIndex(root)
    from tests.indexer.numpy_index import NumpyIndex

    return NumpyIndex(root)


@pytest.mark.parametrize("kind", ["faiss", "numpy"])
def test_rebuild_and_update_store_the_metadata_beside_the_vectors(encoder, tmp_path, kind):
    from indexer import pipeline

    store, index = _library_store(tmp_path / "store"), _index(kind, tmp_path / "index")
    assert pipeline.rebuild(store, encoder, index, "lib/", progress=False).count == 3
    store.put("lib/2024/d.jpg", photo_bytes("JPEG", photo_exif(
        taken="2024:01:05 10:00:00", offset="+11:00", position=(-33.8688, 151.2093))))
    assert pipeline.update(store, encoder, index, "lib/", progress=False).added == 1

    view = index.view(encoder.model_id)
    a, b, c, d, missing = view.info(["lib/2023/beach/a.jpg", "lib/2024/b.heic", "lib/c.png",
                                     "lib/2024/d.jpg", "lib/nope.jpg"])
    assert (a["city"], a["folder"], a["camera_model"]) == ("Lisbon", "lib/2023/beach", "EOS R6")
    assert (b["city"], b["folder"]) == ("Paris", "lib/2024")
    assert c["folder"] == "lib" and c.get("lat") is None
    assert d["country_code"] == "AU" and missing is None
    assert view.info_counts() == {"with_date": 3, "with_position": 3, "with_place": 3}

    # what was read from the photos is what a filter inside the search sees
    from datetime import datetime as dt

    import numpy as np

    from indexer.photo_filter import PhotoFilter

    query = np.ones((1, encoder.scoring.index_dim), np.float32)
    for where, expected in [
        (PhotoFilter(country="portugal"), ["lib/2023/beach/a.jpg"]),
        (PhotoFilter(city="Paris"), ["lib/2024/b.heic"]),
        (PhotoFilter(folders=["lib/2024"]), ["lib/2024/b.heic", "lib/2024/d.jpg"]),
        (PhotoFilter(camera="eos r6", taken_after=dt(2023, 7, 14, 16, 30, 5),
                     taken_before=dt(2023, 7, 14, 16, 30, 6)), ["lib/2023/beach/a.jpg"]),
        (PhotoFilter(near={"lat": -33.87, "lon": 151.21, "km": 20}), ["lib/2024/d.jpg"]),
    ]:
        _, found = view.search(query, 10, where=where)
        assert sorted(found[0]) == expected, where


@pytest.mark.parametrize("kind", ["faiss", "numpy"])
def test_shards_write_the_metadata_into_their_parts(encoder, tmp_path, kind):
    from indexer import shards

    store, index = _library_store(tmp_path / "store"), _index(kind, tmp_path / "index")
    facts = lambda: (encoder.scoring.index_dim, encoder.scoring.tuning_queries())  # noqa: E731
    plan = shards.plan(store, index, "lib/", encoder.model_id, 2, 8, facts)
    assert len(plan) == 2
    reports = [shards.embed_shard(store, encoder, index, s) for s in plan]
    shards.publish_plan(index, plan[0], reports)
    infos = index.view(encoder.model_id).info(["lib/2023/beach/a.jpg", "lib/c.png"])
    assert infos[0]["country"] == "Portugal"
    assert infos[1]["taken_at_source"] == "modified"
