"""Pixel confirmation of candidate duplicate pairs: the second stage of the duplicates pass
(indexer.duplicates).

The embedding finds candidates (cosine above a low threshold: the recall); each candidate pair
is then confirmed on the photos' pixels, which edits of one shot pass and different photos of
one scene fail (BENCHMARKS.md §13 measured the choices):

    local features + geometry   keypoints (OpenCV SIFT or ORB) of both photos at a working size,
                                matched with Lowe's ratio test; a RANSAC similarity transform
                                (rotation, scale, shift: what crops, resizes, small rotations
                                and screenshot frames do) fitted to the matches; the pair is a
                                duplicate when at least `min_inliers` matches agree with it.
                                Exposure and colour edits keep the keypoints; a second shot of a
                                moving scene moves its subject, so few matches agree on one
                                transform.

ORB by default: as precise as SIFT or more on the benchmark and several times cheaper to
describe. What it cannot tell apart: two shots from one tripod, whose still background alone
agrees on one transform (the one hard pair of §13 it confirms). Perceptual hashes were measured
too and left out: over a tenth of the edits moved pHash further than the closest different photos.

Verdicts are kept between passes (`PairVerdicts`, a SQLite file beside the report): a pair
whose two photos have the etags and the check the parameters of an earlier verdict is not read
or checked again, so the pass the DAGs run after every publish costs the pairs a change touched.

Each photo is read once per pass (its features kept while pairs still need them, within a
bounded cache); a photo that cannot be read or decoded leaves its pairs undecided by pixels:
they fall back to the embedding-only decision (the pass's stricter threshold), as the pass
without the check would decide them.
"""
from __future__ import annotations

import json
import logging
import sqlite3
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

log = logging.getLogger(__name__)

METHODS = ("sift", "orb")
UNREADABLE_LISTED = 20  # unreadable photos named in a report (all are counted)


@dataclass(frozen=True)
class PhotoFeatures:
    points: np.ndarray  # [n, 2] float32, keypoint positions in the working image
    descriptors: np.ndarray | None  # [n, d]; None when the photo has no keypoints


@dataclass(frozen=True)
class PixelCheck:
    """How a candidate pair is confirmed on pixels (the report records these)."""
    method: str = "orb"
    size: int = 384  # the working image's longer side, in pixels (small photos are enlarged)
    features: int = 500  # keypoints kept per photo, strongest first
    ratio: float = 0.8  # Lowe's ratio test: best match closer than ratio x the second best
    ransac_px: float = 4.0  # reprojection error of an inlier, in working-image pixels
    min_inliers: int = 15  # matches agreeing with one transform that make a duplicate

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"pixel check method must be one of {METHODS}, not {self.method!r}")
        if not (64 <= self.size <= 2048 and self.features >= 8 and 0 < self.ratio < 1
                and self.ransac_px > 0 and self.min_inliers >= 3):
            raise ValueError(f"unusable pixel check parameters: {self}")

    def params(self) -> dict:
        return asdict(self)

    def _detector(self):
        import cv2

        if self.method == "sift":
            return cv2.SIFT_create(nfeatures=self.features)
        return cv2.ORB_create(nfeatures=self.features)

    def working_image(self, image: Image.Image) -> np.ndarray:
        """Grey, the longer side scaled to `size` (both photos of a pair at one scale)."""
        grey = image.convert("L")
        scale = self.size / max(grey.size)
        if scale != 1.0:
            new = (max(1, round(grey.width * scale)), max(1, round(grey.height * scale)))
            grey = grey.resize(new, Image.Resampling.BILINEAR if scale > 1
                               else Image.Resampling.LANCZOS)
        return np.asarray(grey, np.uint8)

    def describe(self, image: Image.Image) -> PhotoFeatures:
        keypoints, descriptors = self._detector().detectAndCompute(
            self.working_image(image), None)
        points = np.asarray([k.pt for k in keypoints], np.float32).reshape(-1, 2)
        if descriptors is None or len(points) < 2:
            return PhotoFeatures(points, None)
        return PhotoFeatures(points, descriptors)

    def inliers(self, a: PhotoFeatures, b: PhotoFeatures) -> int:
        """Ratio-test matches of a and b that agree with one RANSAC similarity transform."""
        import cv2

        if a.descriptors is None or b.descriptors is None:
            return 0
        norm = cv2.NORM_L2 if self.method == "sift" else cv2.NORM_HAMMING
        pairs = cv2.BFMatcher(norm).knnMatch(a.descriptors, b.descriptors, k=2)
        good = [p[0] for p in pairs if len(p) == 2 and p[0].distance < self.ratio * p[1].distance]
        if len(good) < 3:
            return 0
        src = a.points[[m.queryIdx for m in good]]
        dst = b.points[[m.trainIdx for m in good]]
        _, mask = cv2.estimateAffinePartial2D(src, dst, method=cv2.RANSAC,
                                              ransacReprojThreshold=self.ransac_px,
                                              maxIters=2000, confidence=0.99)
        return 0 if mask is None else int(mask.sum())

    def confirms(self, a: PhotoFeatures, b: PhotoFeatures) -> bool:
        return self.inliers(a, b) >= self.min_inliers


@dataclass
class CheckSummary:
    """What the second stage did in one pass (part of the report)."""
    candidates: int = 0  # pairs above the candidate threshold
    checked: int = 0  # pairs decided on pixels
    confirmed: int = 0  # of those, duplicates
    without_pixels: int = 0  # pairs with an unreadable photo, decided by the embedding alone
    photos_read: int = 0
    unreadable: int = 0  # photos that could not be read or decoded
    unreadable_keys: list[str] = field(default_factory=list)  # the first UNREADABLE_LISTED
    seconds: float = 0.0
    reused: int = 0  # of `checked`, verdicts kept from an earlier pass (photos unchanged)


class PairVerdicts:
    """Pixel verdicts kept between passes, in a SQLite file: per pair of keys, both photos'
    etags and the check's parameters when it was decided. A verdict counts only while all
    three are unchanged. Each pass commits as it goes (a killed pass keeps what it decided) and
    ends by dropping the pairs it did not meet (no longer candidates, or a photo gone)."""

    COMMIT_EVERY = 2000

    def __init__(self, path: str | Path, check: "PixelCheck"):
        self.params = json.dumps(check.params(), sort_keys=True)
        self._pending = 0
        try:
            self._open(path)
        except sqlite3.DatabaseError as exc:  # a damaged file: it only saves work, start afresh
            log.warning("duplicates: the kept verdicts are unusable (%s); checking every pair", exc)
            self.db.close()
            Path(path).unlink(missing_ok=True)
            self._open(path)

    def _open(self, path: str | Path) -> None:
        self.db = sqlite3.connect(str(path), timeout=60)
        self.db.execute("CREATE TABLE IF NOT EXISTS verdicts (a TEXT, b TEXT, etag_a TEXT, "
                        "etag_b TEXT, params TEXT, duplicate INTEGER, pass INTEGER, "
                        "PRIMARY KEY (a, b))")
        row = self.db.execute("SELECT MAX(pass) FROM verdicts").fetchone()
        self.pass_number = (row[0] or 0) + 1

    def get(self, a: str, etag_a: str, b: str, etag_b: str) -> bool | None:
        (a, etag_a), (b, etag_b) = sorted([(a, etag_a), (b, etag_b)])
        row = self.db.execute("SELECT etag_a, etag_b, params, duplicate FROM verdicts "
                              "WHERE a = ? AND b = ?", (a, b)).fetchone()
        if row is None or row[:3] != (etag_a, etag_b, self.params):
            return None
        self.db.execute("UPDATE verdicts SET pass = ? WHERE a = ? AND b = ?",
                        (self.pass_number, a, b))
        self._written()
        return bool(row[3])

    def put(self, a: str, etag_a: str, b: str, etag_b: str, duplicate: bool) -> None:
        (a, etag_a), (b, etag_b) = sorted([(a, etag_a), (b, etag_b)])
        self.db.execute("INSERT OR REPLACE INTO verdicts VALUES (?, ?, ?, ?, ?, ?, ?)",
                        (a, b, etag_a, etag_b, self.params, int(duplicate), self.pass_number))
        self._written()

    def _written(self) -> None:
        self._pending += 1
        if self._pending >= self.COMMIT_EVERY:
            self.db.commit()
            self._pending = 0

    def finish(self) -> None:
        """The pass went through: forget the pairs it did not meet."""
        self.db.execute("DELETE FROM verdicts WHERE pass <> ?", (self.pass_number,))
        self.db.commit()

    def close(self) -> None:
        self.db.commit()
        self.db.close()


def photo_reader(store, max_pixels: int | None = None) -> Callable[[str, int], Image.Image]:
    """(key, size) -> the stored photo decoded no larger than needed for `size` (camera RAW by
    its name). Errors: objectstore's (ObjectNotFound for a photo gone since it was indexed),
    encoder.preprocessing.BadImage."""
    from encoder.image_formats import is_raw_key
    from encoder.preprocessing import DEFAULT_MAX_PIXELS, decode_image

    def read(key: str, size: int) -> Image.Image:
        return decode_image(store.get(key), max_pixels or DEFAULT_MAX_PIXELS, min_side=size,
                            raw=is_raw_key(key))
    return read


# errors that make one photo unreadable (its pairs fall back to the embedding); a store that is
# down or refuses the credentials is not one of them: the pass fails and is retried
def _unreadable_errors() -> tuple[type[BaseException], ...]:
    from encoder.preprocessing import BadImage
    from objectstore import InvalidKey, ObjectNotFound

    return (BadImage, ObjectNotFound, InvalidKey, OSError)


def confirm_pairs(keys_a: list[str], keys_b: list[str], scores: np.ndarray, check: PixelCheck,
                  read: Callable[[str, int], Image.Image], fallback_threshold: float,
                  cache_photos: int = 4096,
                  progress: Callable[[int], None] | None = None,
                  verdicts: PairVerdicts | None = None,
                  etags: dict[str, str] | None = None) -> tuple[np.ndarray, CheckSummary]:
    """Which candidate pairs are duplicates (a boolean mask), and what it took.

    Pairs are visited photo by photo (each photo's pairs together, photos in key order), and a
    photo's features are dropped once its last pair is decided, so each photo is read once while
    at most `cache_photos` are held (beyond that the least recently used go, to be read again).
    A pair with an unreadable photo is a duplicate when its cosine is above
    `fallback_threshold`. progress(n): n more pairs decided. With `verdicts` and the photos'
    `etags`, a pair decided by an earlier pass on the same photos is not read again."""
    import time

    from cachetools import LRUCache

    t0 = time.perf_counter()
    scores = np.asarray(scores, np.float64)
    n = len(keys_a)
    summary = CheckSummary(candidates=n)
    keep = np.zeros(n, bool)
    if n == 0:
        return keep, summary
    unreadable_errors = _unreadable_errors()
    order = sorted(range(n), key=lambda i: (min(keys_a[i], keys_b[i]), max(keys_a[i], keys_b[i])))
    remaining: dict[str, int] = {}
    for i in range(n):
        remaining[keys_a[i]] = remaining.get(keys_a[i], 0) + 1
        remaining[keys_b[i]] = remaining.get(keys_b[i], 0) + 1
    held: LRUCache = LRUCache(maxsize=max(2, cache_photos))
    failed: set[str] = set()

    def features(key: str) -> PhotoFeatures | None:
        if key in failed:
            return None
        hit = held.get(key)
        if hit is None:
            summary.photos_read += 1
            try:
                hit = check.describe(read(key, check.size))
            except unreadable_errors as exc:
                failed.add(key)
                summary.unreadable += 1
                if len(summary.unreadable_keys) < UNREADABLE_LISTED:
                    summary.unreadable_keys.append(key)
                log.warning("duplicates: %s unreadable (%s); its pairs are decided by the "
                            "embedding alone", key, exc)
                return None
            held[key] = hit
        return hit

    def etag(key: str) -> str | None:
        return None if etags is None else etags.get(key)

    done = 0
    for i in order:
        ka, kb = keys_a[i], keys_b[i]
        known = None
        if verdicts is not None and etag(ka) is not None and etag(kb) is not None:
            known = verdicts.get(ka, etag(ka), kb, etag(kb))
        if known is not None:
            summary.checked += 1
            summary.reused += 1
            keep[i] = known
            summary.confirmed += int(known)
        elif (a := features(ka)) is None or (b := features(kb)) is None:
            summary.without_pixels += 1
            keep[i] = scores[i] > fallback_threshold
        else:
            summary.checked += 1
            keep[i] = check.confirms(a, b)
            summary.confirmed += int(keep[i])
            if verdicts is not None and etag(ka) is not None and etag(kb) is not None:
                verdicts.put(ka, etag(ka), kb, etag(kb), bool(keep[i]))
        for key in (keys_a[i], keys_b[i]):
            remaining[key] -= 1
            if remaining[key] == 0:
                held.pop(key, None)
        done += 1
        if progress is not None and done % 64 == 0:
            progress(64)
    if progress is not None and done % 64:
        progress(done % 64)
    summary.seconds = round(time.perf_counter() - t0, 3)
    return keep, summary
