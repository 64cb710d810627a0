"""Why did this photo match a query: where in the photo the query matches, and what each term
of a query gives to the photo's score.

The map is the model family's (`explain_map` of the encoder, `encoder.scoring.cell_map`: for our
dual encoder each spatial cell's contribution to the photo's score with the query, for open_clip
ViTs the query's cosine with each patch; cells against the match at 0); here it is computed for a
stored photo, shown over it as a heat overlay (PNG) or returned as numbers, and cached.

A query of several terms is explained by its combined embedding c = sum_i w_i e_i / N
(`Scoring.combine`: e_i the terms' unit embeddings, w_i their signed weights scaled by the
largest, N the norm of the sum), so the photo's cosine with it splits exactly into one
contribution per term: cos(c, v) = sum_i (w_i / N) cos(e_i, v). A term's `share` is its
contribution over cos(c, v): the shares sum to 1 (a negative term the photo is unlike has a
positive share; a term pulling the other way a negative one), null when cos(c, v) is ~0.
The ranking score differs from cos(c, v) only by the photo's hubness bias, which no term
changes.

Explanations are cached (an LRU of `EXPLAIN_CACHE_ITEMS`), keyed by model id, index version,
photo key, the query as read and the size; the decode goes through the service's decode gate
with its pixel limit, the map through one worker thread (`QueryEncoders.explain_map`).
"""
from __future__ import annotations

import io
import json
import threading
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np
from cachetools import LRUCache
from fastapi.concurrency import run_in_threadpool
from PIL import Image

from encoder.image_formats import is_raw_key
from encoder.preprocessing import DECODE_MIN_SIDE, decode_image
from search_api.images import decode_gated
from search_api.query_terms import TermQuery

if TYPE_CHECKING:
    from encoder.pixels import ImageSpec
    from search_api.search_service import SearchService

COLORMAP = "turbo"
MAX_ALPHA = 0.6  # the heat's opacity where the map peaks (transparent where it is lowest)
MAP_DECIMALS = 4


class NotIndexed(LookupError):
    """The key names no photo of the served index version (a 404)."""


@dataclass
class Explanation:
    key: str
    model_id: str
    version: str
    query: TermQuery
    cells: np.ndarray  # [h, w] cosines of the query with each cell
    box: tuple[float, float, float, float]  # the part of the photo the map covers (fractions)
    similarity: float  # cos(query, photo) of the stored embedding
    terms: list[dict]
    # the photo at the asked size as a JPEG until the overlay is drawn, then only the overlay:
    # a cached entry holds one compressed picture
    photo: bytes | None = field(default=None, repr=False)
    _png: bytes | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def png(self) -> bytes:
        with self._lock:
            if self._png is None:
                with Image.open(io.BytesIO(self.photo)) as image:
                    self._png = overlay_png(image, self.cells, self.box)
                self.photo = None
            return self._png

    def to_json(self) -> dict:
        h, w = self.cells.shape
        return {"key": self.key, "model_id": self.model_id, "index_version": self.version,
                "query": self.query.typed(), "grid": [h, w],
                "map": np.round(self.cells.astype(np.float64), MAP_DECIMALS).tolist(),
                "map_min": round(float(self.cells.min()), MAP_DECIMALS),
                "map_max": round(float(self.cells.max()), MAP_DECIMALS),
                "box": [round(b, 6) for b in self.box],
                "similarity": self.similarity, "terms": self.terms}


def term_shares(query: TermQuery, term_embeddings: np.ndarray, photo: np.ndarray
                ) -> tuple[float, list[dict]]:
    """(cos(c, v), each term's cosine, contribution and share): see the module doc."""
    e = np.asarray(term_embeddings, np.float64)
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-12)
    v = np.asarray(photo, np.float64).reshape(-1)
    v = v / max(float(np.linalg.norm(v)), 1e-12)
    w = np.asarray([t.signed_weight for t in query.terms], np.float64)
    w = w / np.abs(w).max()
    norm = max(float(np.linalg.norm(w @ e)), 1e-12)
    cosines = e @ v
    contributions = w / norm * cosines
    total = float(contributions.sum())
    out = []
    for t, cos, part in zip(query.terms, cosines, contributions):
        item = t.echo()
        item.update(negative=t.negative, cosine=float(cos), contribution=float(part),
                    share=float(part / total) if abs(total) > 1e-6 else None)
        out.append(item)
    return total, out


def map_box(spec: ImageSpec, width: int, height: int) -> tuple[float, float, float, float]:
    """The part of a width x height photo the model's square input shows, as fractions of it
    (left, top, right, bottom): all of it when squashed, the centre square when cropped
    ("shortest"), more than the photo when padded ("longest")."""
    if spec.resize_mode in (None, "squash"):
        return 0.0, 0.0, 1.0, 1.0
    side = min(width, height) if spec.resize_mode == "shortest" else max(width, height)
    dx, dy = (width - side) / 2, (height - side) / 2
    return dx / width, dy / height, (dx + side) / width, (dy + side) / height


def heat(cells: np.ndarray, size: tuple[int, int], box) -> np.ndarray:
    """The map upsampled (bicubic) onto a photo of `size` (w, h), NaN outside `box`."""
    w, h = size
    left, top, right, bottom = (box[0] * w, box[1] * h, box[2] * w, box[3] * h)
    bw, bh = max(1, round(right - left)), max(1, round(bottom - top))
    up = np.asarray(Image.fromarray(np.asarray(cells, np.float32), "F")
                    .resize((bw, bh), Image.Resampling.BICUBIC))
    out = np.full((h, w), np.nan, np.float32)
    x0, y0 = round(left), round(top)
    xs, ys = max(0, x0), max(0, y0)
    xe, ye = min(w, x0 + bw), min(h, y0 + bh)
    if xe > xs and ye > ys:
        out[ys:ye, xs:xe] = up[ys - y0:ye - y0, xs - x0:xe - x0]
    return out


def overlay_png(image: Image.Image, cells: np.ndarray, box) -> bytes:
    """The photo with the map blended over it: colour (`COLORMAP`) and opacity rise from the
    map's lowest cell (the photo as it is) to its highest (MAX_ALPHA)."""
    from matplotlib import colormaps  # on first use: ~0.1 s, ~17 MB

    values = heat(cells, image.size, box)
    finite = np.isfinite(values)
    lo, hi = float(np.nanmin(values)), float(np.nanmax(values))
    level = np.zeros_like(values) if hi - lo < 1e-6 else (values - lo) / (hi - lo)
    level = np.where(finite, np.clip(level, 0, 1), 0).astype(np.float32)
    colour = colormaps[COLORMAP](level)[..., :3].astype(np.float32) * 255
    alpha = (MAX_ALPHA * level)[..., None]
    photo = np.asarray(image.convert("RGB"), np.float32)
    out = photo * (1 - alpha) + colour * alpha
    buf = io.BytesIO()
    Image.fromarray(np.clip(out + 0.5, 0, 255).astype(np.uint8), "RGB").save(
        buf, "PNG", compress_level=3)
    return buf.getvalue()


def _jpeg(image: Image.Image, size: int) -> bytes:
    image.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def _decode(data: bytes, size: int, max_pixels: int, raw: bool) -> Image.Image:
    return decode_image(data, max_pixels, min_side=max(size, DECODE_MIN_SIDE), raw=raw)


class Explainer:
    """Explanations of one service's matches (see the module doc)."""

    def __init__(self, service: SearchService, cache_items: int = 64):
        self.service = service
        self._cache = LRUCache(cache_items) if cache_items > 0 else None
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def _cache_key(self, key: str, query: TermQuery, size: int, version: str) -> str:
        # the query as the model reads it: what is encoded, blanks collapsed (the tokenizers
        # ignore them)
        terms = [[t.negative, t.weight, t.key,
                  None if t.key is not None else " ".join((t.encoded_text or t.text).split())]
                 for t in query.terms]
        return json.dumps([self.service.model_id, version, key, terms, size])

    def clear(self) -> None:
        if self._cache is not None:
            with self._lock:
                self._cache.clear()

    async def explain(self, key: str, query: TermQuery, size: int) -> tuple[Explanation, bool]:
        """(the explanation, whether it came from the cache). NotIndexed when the served
        version does not hold `key`; TermError for a query the service refuses;
        NoSpatialMap for a model without a spatial map; the image side's errors (store,
        BadImage, ImageTooLarge) for the photo."""
        service = self.service
        view = service.index.require()
        cache_key = self._cache_key(key, query, size, view.version)
        if self._cache is not None:
            with self._lock:
                found = self._cache.get(cache_key)
            if found is not None:
                self.hits += 1
                return found, True
        try:
            [stored] = await service.index.call(view, "stored_vectors", [key])
        except KeyError:
            raise NotIndexed(f"no indexed photo {key[:200]!r} in the served index "
                             "version") from None
        scoring = service.encoders.scoring
        photo = scoring.embeddings(np.asarray(stored, np.float32)[None])[0]
        embeddings = await service.term_embeddings(query, view)
        combined = service.combine(query, embeddings)
        similarity, terms = term_shares(query, embeddings, photo)
        images = service.images
        data = await run_in_threadpool(images.fetch, key)
        max_pixels = images.limits.max_image_pixels
        raw = is_raw_key(key)
        decoded = await decode_gated(images.decode_gate, data, max_pixels,
                                     lambda: _decode(data, size, max_pixels, raw),
                                     min_side=max(size, DECODE_MIN_SIDE), raw=raw)
        encoders = service.encoders
        pixels = await run_in_threadpool(encoders.encoder.preprocess, decoded)
        cells = await encoders.explain_map(pixels, combined)
        box = map_box(encoders.image_spec, *decoded.size)
        photo = await run_in_threadpool(_jpeg, decoded, size)
        explanation = Explanation(key, service.model_id, view.version, query,
                                  np.asarray(cells, np.float32), box, similarity, terms, photo)
        self.misses += 1
        if self._cache is not None:
            with self._lock:
                self._cache[cache_key] = explanation
        return explanation, False
