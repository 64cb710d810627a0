"""The duplicates pass's pixel check (indexer.duplicate_check): edits of a photo pass, a
different photo fails, and the pass (indexer.duplicates) keeps only the confirmed candidates,
deciding pairs with an unreadable photo by the embedding alone."""
from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image, ImageDraw

from indexer.duplicate_check import PairVerdicts, PixelCheck, confirm_pairs, photo_reader
from indexer.duplicates import DEFAULT_PIXEL_CHECK, find_duplicates, read_report, \
    report_path, verdicts_path, write_report
from objectstore import LocalStore
from tests.indexer.helpers import PREFIX


def _photo(seed: int, w: int = 360, h: int = 270) -> Image.Image:
    """A picture of its own: a smooth background and many overlapping shapes (the corners and
    blobs a photo's keypoints sit on)."""
    rng = np.random.default_rng(seed)
    top, bottom = rng.integers(0, 255, 3), rng.integers(0, 255, 3)
    t = np.linspace(0, 1, h)[:, None, None]
    img = Image.fromarray(np.broadcast_to(top * (1 - t) + bottom * t, (h, w, 3))
                          .astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for _ in range(60):
        x, y = int(rng.integers(-20, w)), int(rng.integers(-20, h))
        box = (x, y, x + int(rng.integers(8, 70)), y + int(rng.integers(8, 70)))
        fill = tuple(int(c) for c in rng.integers(0, 255, 3))
        shape = rng.integers(0, 3)
        if shape == 0:
            draw.ellipse(box, fill=fill)
        elif shape == 1:
            draw.rectangle(box, fill=fill)
        else:
            draw.polygon([(box[0], box[3]), ((box[0] + box[2]) // 2, box[1]), (box[2], box[3])],
                         fill=fill)
    return img


def _jpeg_bytes(img: Image.Image, quality: int = 90) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    return buf.getvalue()


def _jpeg(img: Image.Image, quality: int) -> Image.Image:
    return Image.open(io.BytesIO(_jpeg_bytes(img, quality))).convert("RGB")


def _crop(img: Image.Image, keep: float) -> Image.Image:
    w, h = img.size
    dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return img.crop((dw, dh, w - dw, h - dh))


def _framed(img: Image.Image) -> Image.Image:
    """As a screenshot of it: a grey margin and a dark title bar, shrunk and re-encoded."""
    pad, bar = img.width // 12, img.height // 8
    canvas = Image.new("RGB", (img.width + 2 * pad, img.height + 2 * pad + bar), (242, 242, 242))
    ImageDraw.Draw(canvas).rectangle((0, 0, canvas.width, bar), fill=(40, 44, 52))
    canvas.paste(img, (pad, bar + pad))
    return _jpeg(canvas.resize((canvas.width * 3 // 4, canvas.height * 3 // 4)), 80)


EDITS = {
    "re-encoded at quality 25": lambda im: _jpeg(im, 25),
    "resized to 1/3": lambda im: im.resize((im.width // 3, im.height // 3)),
    "cropped to 75 %": lambda im: _crop(im, 0.75),
    "rotated 5 degrees and cropped": lambda im: _crop(im.rotate(5, resample=Image.BICUBIC),
                                                      0.82),
    "darker, warmer": lambda im: Image.fromarray(np.clip(
        np.asarray(im, np.float32) * np.array([0.75, 0.65, 0.55]), 0, 255).astype(np.uint8)),
    "framed as a screenshot": _framed,
}


@pytest.mark.parametrize("method", ["orb", "sift"])
def test_the_check_confirms_edits_and_rejects_a_different_photo(method):
    check = PixelCheck(method, features=1000 if method == "orb" else 500)
    photo = _photo(1)
    original = check.describe(photo)
    for name, edit in EDITS.items():
        assert check.confirms(original, check.describe(edit(photo))), name
    for other in (_photo(2), _photo(3)):
        assert check.inliers(original, check.describe(other)) < check.min_inliers


def test_unusable_parameters_are_refused():
    with pytest.raises(ValueError):
        PixelCheck("akaze")
    with pytest.raises(ValueError):
        PixelCheck(min_inliers=0)


def test_confirm_pairs_reads_each_photo_once_and_counts_what_it_did():
    check = DEFAULT_PIXEL_CHECK
    photos = {"a": _photo(1), "a2": _crop(_photo(1), 0.8), "a3": _jpeg(_photo(1), 30),
              "b": _photo(2)}
    pairs = (["a", "a", "a2", "a"], ["a2", "a3", "a3", "b"], np.array([0.9, 0.8, 0.8, 0.75]))
    reads: list[str] = []

    def read(key, size):
        reads.append(key)
        return photos[key]

    keep, summary = confirm_pairs(*pairs, check, read, 0.85)
    assert keep.tolist() == [True, True, True, False]
    assert sorted(reads) == ["a", "a2", "a3", "b"]
    assert (summary.candidates, summary.checked, summary.confirmed, summary.without_pixels,
            summary.photos_read, summary.unreadable) == (4, 4, 3, 0, 4, 0)

    # a cache too small for the pairs: the same verdicts, photos read again (and counted)
    reads.clear()
    keep, summary = confirm_pairs(*pairs, check, read, 0.85, cache_photos=2)
    assert keep.tolist() == [True, True, True, False]
    assert summary.photos_read == len(reads) > 4


def _vector(dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=dim).astype(np.float32)
    return v / np.linalg.norm(v)


def test_the_pass_keeps_confirmed_candidates_and_decides_unreadable_photos_by_embedding(
        tmp_path, faiss_index):
    """Embeddings (made here) put a different photo and two unreadable ones close to photo 0;
    the pixel check drops the different photo, keeps the real crop found only as a candidate,
    and pairs with an unreadable photo go by the stricter threshold: the one above it stays."""
    store = LocalStore(tmp_path / "store", "photos")
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 6)))[0].T.astype(np.float32)

    def at(cosine: float, axis: int) -> np.ndarray:  # cosine with photo 0 (basis[0])
        return cosine * basis[0] + np.sqrt(1 - cosine ** 2) * basis[axis]

    rows = {  # key: (vector, stored bytes or None: never stored)
        f"{PREFIX}p0.jpg": (basis[0], _jpeg_bytes(_photo(1))),
        f"{PREFIX}p0-crop.jpg": (at(0.75, 1), _jpeg_bytes(_crop(_photo(1), 0.75))),
        f"{PREFIX}other.jpg": (at(0.93, 2), _jpeg_bytes(_photo(2))),
        f"{PREFIX}gone.jpg": (at(0.95, 3), None),
        f"{PREFIX}broken.jpg": (at(0.8, 4), b"not a jpeg"),
        f"{PREFIX}far.jpg": (basis[5], _jpeg_bytes(_photo(5))),
    }
    for key, (_, data) in rows.items():
        if data is not None:
            store.put(key, data)
    keys = sorted(rows)
    vectors = np.stack([rows[k][0] for k in keys])
    faiss_index.rebuild("m-1", keys, vectors, ["e"] * len(keys))

    alone = find_duplicates(faiss_index, "m-1", 0.9)
    assert [g.keys for g in alone.groups] == [
        sorted([f"{PREFIX}p0.jpg", f"{PREFIX}other.jpg", f"{PREFIX}gone.jpg"])]
    assert alone.check is None and alone.pixel_check is None

    report = find_duplicates(faiss_index, "m-1", 0.9, read_photo=photo_reader(store),
                             candidate_threshold=0.7)
    assert [g.keys for g in report.groups] == [
        sorted([f"{PREFIX}p0.jpg", f"{PREFIX}p0-crop.jpg", f"{PREFIX}gone.jpg"])]
    assert report.threshold == 0.9 and report.candidate_threshold == 0.7
    assert report.pixel_check == DEFAULT_PIXEL_CHECK.params()
    check = report.check
    # above 0.7: p0 with each of crop, other, gone, broken; gone with other (0.88), crop
    # (0.71) and broken (0.76); other with broken (0.74). Two have both photos readable.
    assert (check.candidates, check.checked, check.confirmed, check.without_pixels) == \
        (8, 2, 1, 6)
    assert check.unreadable == 2 and check.photos_read == 5  # each photo of a candidate once
    assert sorted(check.unreadable_keys) == sorted([f"{PREFIX}gone.jpg", f"{PREFIX}broken.jpg"])

    path = report_path(tmp_path)
    write_report(report, path)
    assert read_report(path) == report


def test_a_candidate_threshold_above_the_threshold_is_refused(faiss_index):
    faiss_index.rebuild("m-1", ["a.jpg", "b.jpg"], np.stack([_vector(8, 0), _vector(8, 1)]),
                        ["e", "e"])
    with pytest.raises(ValueError):
        find_duplicates(faiss_index, "m-1", 0.8, read_photo=lambda key, size: None,
                        candidate_threshold=0.9)


def test_verdicts_are_kept_between_passes_while_both_photos_and_the_check_are_unchanged(
        tmp_path):
    photos = {"a": _photo(1), "a2": _crop(_photo(1), 0.8), "b": _photo(2)}
    pairs = (["a", "a"], ["a2", "b"], np.array([0.9, 0.75]))
    etags = {"a": "e1", "a2": "e1", "b": "e1"}
    reads: list[str] = []

    def read(key, size):
        reads.append(key)
        return photos[key]

    def run(check=DEFAULT_PIXEL_CHECK, pairs=pairs):
        reads.clear()
        store = PairVerdicts(tmp_path / "v.sqlite", check)
        try:
            keep, summary = confirm_pairs(*pairs, check, read, 0.85, verdicts=store,
                                          etags=etags)
            store.finish()
        finally:
            store.close()
        return keep.tolist(), summary

    keep, first = run()
    assert keep == [True, False] and (first.checked, first.reused) == (2, 0)
    keep, again = run()  # nothing changed: no photo read, the same verdicts
    assert keep == [True, False] and reads == [] and (again.checked, again.reused) == (2, 2)
    etags["b"] = "e2"  # b was replaced: its pair is checked again, a's other pair is not
    photos["b"] = _crop(_photo(1), 0.9)
    keep, changed = run()
    assert keep == [True, True] and sorted(reads) == ["a", "b"] and changed.reused == 1
    keep, other = run(check=PixelCheck(min_inliers=DEFAULT_PIXEL_CHECK.min_inliers + 5))
    assert other.reused == 0  # another check's verdicts do not count
    _, narrower = run(pairs=(["a"], ["a2"], np.array([0.9])))
    assert narrower.reused == 0  # the last pass (another check) replaced them
    _, kept = run(pairs=(["a"], ["a2"], np.array([0.9])))
    assert kept.reused == 1
    import sqlite3
    with sqlite3.connect(tmp_path / "v.sqlite") as db:  # pairs no pass met any more are gone
        assert db.execute("SELECT a, b FROM verdicts").fetchall() == [("a", "a2")]
    (tmp_path / "v.sqlite").write_bytes(b"not a database" * 100)  # damaged: start afresh
    keep, fresh = run()
    assert keep == [True, True] and (fresh.checked, fresh.reused) == (2, 0)


def test_the_pass_reuses_its_verdicts_and_rechecks_a_changed_photo(tmp_path, faiss_index):
    store = LocalStore(tmp_path / "store", "photos")
    keys = [f"{PREFIX}p0.jpg", f"{PREFIX}p0-crop.jpg", f"{PREFIX}other.jpg"]
    basis = np.linalg.qr(np.random.default_rng(0).normal(size=(64, 3)))[0].T.astype(np.float32)
    vectors = np.stack([basis[0], 0.8 * basis[0] + 0.6 * basis[1],
                        0.75 * basis[0] + np.sqrt(1 - 0.75 ** 2) * basis[2]])
    for key, img in zip(keys, (_photo(1), _crop(_photo(1), 0.75), _photo(2))):
        store.put(key, _jpeg_bytes(img))
    faiss_index.rebuild("m-1", keys, vectors, ["e1"] * 3)
    path = verdicts_path(tmp_path)

    def run():
        return find_duplicates(faiss_index, "m-1", 0.9, read_photo=photo_reader(store),
                               candidate_threshold=0.7, verdicts_path=path)

    first = run()
    assert [g.keys for g in first.groups] == [sorted(keys[:2])]
    assert (first.check.checked, first.check.reused, first.check.photos_read) == (2, 0, 3)
    again = run()
    assert [g.keys for g in again.groups] == [sorted(keys[:2])]
    assert (again.check.checked, again.check.reused, again.check.photos_read) == (2, 2, 0)
    # candidates: p0 with the crop (0.8) and with "other" (0.75); "other" replaced by another
    # crop of photo 1 (a new etag): its pair is checked again, the crop's is not
    store.put(keys[2], _jpeg_bytes(_crop(_photo(1), 0.85)))
    faiss_index.update("m-1", [keys[2]], vectors[2:], ["e2"])
    third = run()
    assert [g.keys for g in third.groups] == [sorted(keys)]
    assert (third.check.checked, third.check.reused, third.check.photos_read) == (2, 1, 2)
