"""The Milvus backend of `indexer.vector_index` (INDEX_BACKEND=milvus): Milvus standalone or
cluster over MILVUS_URI; milvus-lite (a local `.db` file as MILVUS_URI) for one process.

Versions are collections, readers follow an alias:

    <prefix>__<model>                 the alias of a model: what its APIs search (one per model
                                      id, so an API never searches another model's vectors)
    <prefix>__<model>__<version>      one collection per rebuild; its description is the exact
                                      model id, checked before anyone searches it

A rebuild fills a new collection, flushes it, checks its count, waits for its index, and
publishes it with `alter_alias` (`create_alias` the first time): one atomic switch on the
server, every API replica follows within MILVUS_REFRESH_S. An update writes into the published
collection (object key = primary key, the object's etag stored beside the vector: keys it holds
upserted, new ones inserted) and deletes keys by filter; nothing is copied (`begin(...,
base=<published>)` returns the published collection itself, and publishing it only counts
it). `prune` drops unaliased collections beyond the newest few, and drafts that can never be
published: a new collection is marked a draft (`draft`, `draft_base`: the collection
published when it was begun, `draft_begun`) until its publish clears the mark, and a draft
begun on a collection no longer published (a rebuild that died with its server, a plan
overtaken: `shards` refuses to publish it) or untouched for DRAFT_ABANDONED_S goes at once,
rather than filling one of the newest few.

Fields: key VARCHAR (primary), etag VARCHAR, vector FLOAT_VECTOR (Scoring's index vectors as
they are), tail FLOAT (the vector's last component, copied at write), metric IP: the score of a
hit is the inner product FAISS reports for it. Beside them the photo's metadata as scalar fields
with scalar indexes, and a PhotoFilter as a boolean expression of the search
(indexer.milvus_photos). Collections made before those fields load and search as before; they
hold no metadata (info() gives None, a filter matches nothing) until the next rebuild. A search returns scores, keys and, when asked
(`readback`), each hit's tail: never vectors, which cost ~2.5 ms more per search at top 10 on
this machine (BENCHMARKS.md §7).

Consistency: searches and the API's counts use **Bounded** staleness: a search does not wait
for the newest writes (about 4 ms per search at 10k vectors here, against about 200 ms with
Strong, which waits for the server's time tick on every call). Readers only ever see complete
versions anyway (a new version is published after it is flushed and counted), so Bounded only
delays in-place updates by at most a few seconds. The writer side (what is indexed, counts
before a publish) reads **Strong**: a rerun of an update must see what the previous run wrote,
or it would redo it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import re
import threading
import time
import unicodedata
from contextlib import contextmanager
from typing import Iterable, Iterator

import numpy as np
from cachetools import TTLCache

from indexer import milvus_photos, photo_columns
from indexer.photo_filter import PhotoFilter, active, unit_sphere
from indexer.vector_index import (
    NEAR_NEIGHBOURS_MAX,
    DraftGone,
    FilterTooBroad,
    Indexed,
    IndexLoadError,
    IndexUnavailable,
    VectorIndex,
    check_readback,
    check_rows,
    empty_result,
    new_version_name,
    pairs_above,
    probe_vectors,
)

log = logging.getLogger(__name__)

KEY_MAX = 1024  # S3 keys are at most 1024 bytes
ETAG_MAX = 256
WRITE_BATCH = 2000  # rows per insert or upsert: ~2 MB at 257-d, far below gRPC's message limit
HELD_CHECK_BATCH = 8000  # keys per query asking which of them a collection holds
PAGE = 16384  # rows per query page (Milvus caps offset + limit at 16384)
# below this many rows a publish does not flush: growing segments are searched exactly and
# fast, and flushing costs seconds; above, flushing seals the segments the vector index covers
FLUSH_MIN_ROWS = 10_000
INDEX_TYPES = {
    # HNSW: M and efConstruction as Milvus recommends for recall; ef (search) from settings
    "HNSW": ({"M": 16, "efConstruction": 200}, "ef"),
    "IVF_FLAT": (None, "nprobe"),  # nlist from settings
    "IVF_SQ8": (None, "nprobe"),  # the same lists, vectors as 8-bit codes (4x less memory)
    "FLAT": ({}, None),  # exact
}
NOT_FOUND_CODES = {100, 1600}  # collection not found, alias not found
INFO_BATCH = 1000  # keys per metadata query
FACETS_TTL_S = 60.0  # facets of a collection are counted again after this long
NEAR_KEYS_MAX = 100_000  # keys an expression may name for `near` (servers without arithmetic)
RANGE_FILTER_MAX = 1e6  # a range search's upper score bound: none (scores are cosines, <= 1)
NEAR_CACHE_S = 30.0  # such a key list is reused this long (in-place updates show after it)
DRAFT_ABANDONED_S = 2 * 24 * 3600  # a draft begun this long ago belongs to no live run (FAISS's)
# A version is written once by its rebuild: the server's merging of its fresh segments (and
# indexing the merged ones again) kept a 1M collection busy for 25+ minutes after its publish
# (BENCHMARKS.md §7). So a collection does not compact while it is written and published; from
# its first change in place (a key rewritten or removed) Milvus compacts it as usual.
AUTO_COMPACTION = "collection.autocompaction.enabled"
NO_AUTO_COMPACTION = {AUTO_COMPACTION: "false"}


def _public(exc: BaseException) -> str:
    """What went wrong, in a line, without the server's address or a stack."""
    code = getattr(exc, "code", None)
    code = code() if callable(code) else code
    name = getattr(code, "name", None) or (f"code {code}" if code is not None else
                                            type(exc).__name__)
    return f"the vector index (Milvus) does not answer ({name}); searches resume when it is back"


def _is_unavailable(exc: BaseException) -> bool:
    """Connection refused, timeouts, a server shutting down: worth retrying later."""
    import grpc
    from pymilvus.exceptions import MilvusException

    if isinstance(exc, grpc.RpcError):
        return True
    if isinstance(exc, MilvusException):
        return exc.code not in NOT_FOUND_CODES and (
            exc.code == 2 or "connect" in str(exc.message).lower()
            or "unavailable" in str(exc.message).lower() or "not ready" in str(exc.message).lower())
    return isinstance(exc, (ConnectionError, TimeoutError))


def _not_found(exc: BaseException) -> bool:
    return getattr(exc, "code", None) in NOT_FOUND_CODES


def _safe(name: str) -> str:
    """A model id as a Milvus name part: letters, digits and single underscores; a long one
    is cut and keeps a digest of the whole (the exact id is in the collection's description)."""
    safe = re.sub(r"[^0-9A-Za-z]+", "_", name).strip("_") or "model"
    if len(safe) > 120:
        safe = safe[:111] + "_" + hashlib.sha256(name.encode()).hexdigest()[:8]
    return safe


def _in(keys: Iterable[str]) -> str:
    """A filter matching these keys (escaped as JSON strings, which Milvus parses)."""
    return f"key in {json.dumps(list(keys), ensure_ascii=False)}"


class MilvusView:
    """One published collection, searched by name: every answer comes from this one version,
    whatever the alias points at meanwhile."""
    remote = True

    def __init__(self, owner: "MilvusIndex", collection: str, model_id: str, dim: int,
                 count: int, alias: str):
        self.owner = owner
        self.version = collection
        self.collection = collection
        self.alias = alias
        self.model_id = model_id
        self.dim = dim
        self.count = count

    def search(self, queries: np.ndarray, k: int, readback: int | None = None,
               where: PhotoFilter | None = None):
        """Top-k per query: (scores [Q, k'] padded with -inf, keys [[...]]) (+ per row, the
        hits' stored component `readback`, as every backend gives it); `where`: the filter as
        a boolean expression of the search (indexer.milvus_photos)."""
        if readback is not None:
            # the collection stores one component as a scalar field: the last, as `tail`
            if check_readback(readback, self.dim) != self.dim - 1:
                raise ValueError("the Milvus backend reads back only the last component")
        k = min(k, self.count)
        queries = np.asarray(queries, np.float32)
        where = active(where)
        expression = ""
        if where is not None:
            expression = self.owner.filter_expression(self.collection, where)
            if expression is None:  # stored without metadata: a filter matches nothing
                k = 0
        if k <= 0:
            return empty_result(len(queries), readback)
        with self.owner.calls(searching=self.collection):
            rows = self.owner.client.search(
                self.collection, data=queries.tolist(), limit=k, filter=expression,
                output_fields=["tail"] if readback is not None else [],
                search_params=self.owner.search_params(k), consistency_level="Bounded",
                timeout=self.owner.timeout_s)
        width = max((len(r) for r in rows), default=0)
        scores = np.full((len(rows), width), -np.inf, np.float32)
        keys = []
        for i, row in enumerate(rows):
            scores[i, :len(row)] = [h["distance"] for h in row]
            keys.append([h.id for h in row])  # the primary key, whatever the server names it
        if readback is None:
            return scores, keys
        return scores, keys, [np.asarray([h["entity"]["tail"] for h in row], np.float32)
                              for row in rows]

    def count_matching(self, where: PhotoFilter) -> int:
        """How many photos the filter lets through: a count query with the search's
        expression."""
        where = active(where)
        if where is None:
            return self.count
        expression = self.owner.filter_expression(self.collection, where)
        if expression is None:  # stored without metadata: a filter matches nothing
            return 0
        with self.owner.calls(searching=self.collection):
            rows = self.owner.client.query(self.collection, filter=expression,
                                           output_fields=["count(*)"],
                                           consistency_level="Bounded",
                                           timeout=self.owner.timeout_s)
        return int(rows[0]["count(*)"])

    def info(self, keys: list[str]) -> list[dict | None]:
        """Each key's stored metadata (one query per INFO_BATCH keys)."""
        if not keys or not self.owner.has_photos(self.collection):
            return [None] * len(keys)
        found: dict[str, dict | None] = {}
        # a key with control characters cannot be named in an expression (milvus-lite's
        # parser refuses their escapes): none is looked up, and it is reported as not held
        wanted = [k for k in dict.fromkeys(keys) if isinstance(k, str) and
                  not any(unicodedata.category(c) == "Cc" for c in k)]
        for s in range(0, len(wanted), INFO_BATCH):
            with self.owner.calls(searching=self.collection):
                rows = self.owner.client.query(
                    self.collection, filter=_in(wanted[s:s + INFO_BATCH]),
                    output_fields=["key", *milvus_photos.READ_FIELDS],
                    consistency_level="Bounded", timeout=self.owner.timeout_s)
            for r in rows:
                found[r["key"]] = photo_columns.public_info(
                    milvus_photos.from_fields(r, r["key"]))
        return [found.get(k) for k in keys]

    def info_counts(self) -> dict[str, int]:
        """Three counts on the server."""
        if not self.owner.has_photos(self.collection):
            return photo_columns.info_counts([])
        known = milvus_photos.KNOWN_FLOAT_ABOVE
        filters = {
            "with_date": f"has_info == true and taken_at > {known} and taken_at_source != "
                         f"{json.dumps(photo_columns.DATE_NOT_READ)}",
            "with_position": f"has_info == true and lat > {known} and lon > {known}",
            "with_place": "has_info == true and (city != \"\" or region != \"\" or "
                          "country != \"\" or country_code != \"\")"}
        out = {}
        for name, expression in filters.items():
            with self.owner.calls(searching=self.collection):
                rows = self.owner.client.query(self.collection, filter=expression,
                                               output_fields=["count(*)"],
                                               consistency_level="Bounded",
                                               timeout=self.owner.timeout_s)
            out[name] = int(rows[0]["count(*)"])
        return out

    def facets(self, limit: int = 20) -> dict[str, list[list]]:
        """Counted here over the rows' facet fields, read page by page (kept FACETS_TTL_S)."""
        if not self.owner.has_photos(self.collection):
            return photo_columns.facets([], limit)
        return self.owner.facets(self.collection, limit)

    def stored_vectors(self, keys: list[str]) -> np.ndarray:
        """The vectors held for these keys (one query; for checks, not the search path)."""
        if not keys:
            return np.zeros((0, 0), np.float32)
        with self.owner.calls(searching=self.collection):
            rows = self.owner.client.query(self.collection, filter=_in(keys),
                                           output_fields=["key", "vector"],
                                           consistency_level="Bounded",
                                           timeout=self.owner.timeout_s)
        by_key = {r["key"]: r["vector"] for r in rows}
        return np.asarray([by_key[k] for k in keys], np.float32)


class MilvusIndex(VectorIndex):
    backend = "milvus"
    remote = True

    def __init__(self, uri: str, token: str = "", prefix: str = "flickr_search",
                 index_type: str = "HNSW", search_ef: int = 64, nlist: int = 1024,
                 nprobe: int = 32, timeout_s: float = 5.0, index_wait_s: float = 3600.0):
        if "__" in prefix or not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", prefix):
            raise ValueError("MILVUS_COLLECTION_PREFIX: letters, digits and single underscores, "
                             "not starting with a digit")
        if index_type not in INDEX_TYPES:
            raise ValueError(f"MILVUS_INDEX_TYPE must be one of {', '.join(INDEX_TYPES)}")
        self.uri, self.token, self.prefix = uri, token or "", prefix
        self.index_type, self.search_ef, self.nlist, self.nprobe = index_type, search_ef, nlist, \
            nprobe
        self.timeout_s, self.index_wait_s = timeout_s, index_wait_s
        self._client = None
        self._client_lock = threading.Lock()
        self._loaded: set[str] = set()  # collections seen loaded by this client
        self._photos: dict[str, bool] = {}  # collection -> has the metadata fields
        self._arithmetic: bool | None = None  # the server evaluates arithmetic over fields
        self._facets: dict[str, tuple[float, dict]] = {}  # collection -> when, ranked facets
        # `near` as the keys in its circle (servers without arithmetic), reused a short while
        self._near_cache = TTLCache(maxsize=32, ttl=NEAR_CACHE_S)

    @classmethod
    def from_settings(cls, s) -> "MilvusIndex":
        return cls(s.milvus_uri, s.milvus_token or "", s.milvus_collection_prefix,
                   s.milvus_index_type, s.milvus_search_ef, s.milvus_nlist, s.milvus_nprobe,
                   s.milvus_timeout_s)

    # --- connection --------------------------------------------------------------------------
    @property
    def client(self):
        """The client, (re)made on first use: a server that was down at start is found later."""
        if self._client is None:
            with self._client_lock:
                if self._client is None:
                    from pymilvus import MilvusClient

                    # it logs a full traceback for every failed call (set up by its import),
                    # and another for every failed reconnect to a server that went away: we
                    # log one line and raise our own
                    logging.getLogger("pymilvus.decorators").setLevel(logging.CRITICAL)
                    logging.getLogger("pymilvus.client.connection_manager").setLevel(
                        logging.ERROR)
                    with self.calls():
                        self._client = MilvusClient(uri=self.uri, token=self.token,
                                                    timeout=self.timeout_s)
        return self._client

    @contextmanager
    def calls(self, searching: str | None = None) -> Iterator[None]:
        """Connection failures -> IndexUnavailable (logged here, in a line). `searching`: a
        reader's call on that collection, where any server error is a 503 (a collection still
        loading after a restart, or just dropped by a prune)."""
        try:
            yield
        except IndexUnavailable:
            raise
        except Exception as exc:
            if searching is not None and _not_found(exc):
                raise IndexUnavailable(f"index version {searching} was just replaced; "
                                       "retry") from None
            from pymilvus.exceptions import MilvusException

            if not (_is_unavailable(exc) or searching is not None
                    and isinstance(exc, MilvusException)):
                raise
            log.warning("Milvus call failed: %s", str(exc).splitlines()[0][:300])
            raise IndexUnavailable(_public(exc)) from None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None
        self._loaded.clear()  # another client (a server started again) may hold them released
        if self.uri.endswith(".db"):  # milvus-lite: pymilvus started a local server for the file
            from milvus_lite.server_manager import server_manager_instance

            server_manager_instance.release_server(self.uri)

    # --- names -------------------------------------------------------------------------------
    def alias(self, model_id: str) -> str:
        return f"{self.prefix}__{_safe(model_id)}"

    def _collection(self, model_id: str, version: str) -> str:
        return f"{self.alias(model_id)}__{version.replace('-', '_')}"

    def published(self, model_id: str | None) -> str | None:
        """The collection the model's alias points at (None: nothing published)."""
        if model_id is None:
            return None
        with self.calls():
            try:
                return self.client.describe_alias(self.alias(model_id),
                                                  timeout=self.timeout_s)["collection_name"]
            except Exception as exc:
                if _not_found(exc):
                    return None
                raise

    def _describe(self, collection: str) -> tuple[str, int]:
        """(the model id that built it, vector dimension)"""
        with self.calls():
            info = self.client.describe_collection(collection, timeout=self.timeout_s)
        dim = next(int(f["params"]["dim"]) for f in info["fields"] if f["name"] == "vector")
        return (info.get("properties") or {}).get("model_id") or info["description"], dim

    def _model_of(self, collection: str) -> str:
        return self._describe(collection)[0]

    def _ensure_loaded(self, collection: str) -> None:
        """Load a collection a query needs when the server holds it released: a milvus-lite
        server started again for the same .db file (another process, or after `close`) holds
        every collection released, and queries on it fail."""
        if collection in self._loaded:
            return
        with self.calls():
            state = self.client.get_load_state(collection, timeout=self.timeout_s).get("state")
            if getattr(state, "name", str(state)) != "Loaded":
                self.client.load_collection(collection, timeout=self.timeout_s * 12)
        self._loaded.add(collection)

    def _count(self, collection: str, consistency: str = "Strong") -> int:
        self._ensure_loaded(collection)
        with self.calls():
            rows = self.client.query(collection, filter="", output_fields=["count(*)"],
                                     consistency_level=consistency, timeout=self.timeout_s)
        return int(rows[0]["count(*)"])

    def search_params(self, k: int) -> dict:
        _, knob = INDEX_TYPES[self.index_type]
        if knob == "ef":
            return {"metric_type": "IP", "params": {"ef": max(self.search_ef, k)}}
        if knob == "nprobe":
            return {"metric_type": "IP", "params": {"nprobe": self.nprobe}}
        return {"metric_type": "IP", "params": {}}

    # --- the photos' metadata ---------------------------------------------------------------
    def has_photos(self, collection: str) -> bool:
        """Whether the collection has the metadata fields (made since they exist)."""
        if collection not in self._photos:
            with self.calls():
                info = self.client.describe_collection(collection, timeout=self.timeout_s)
            self._photos[collection] = "has_info" in {f["name"] for f in info["fields"]}
        return self._photos[collection]

    def _evaluates_arithmetic(self, collection: str) -> bool:
        """Whether the server takes `a * x + b * y >= c` over fields (milvus-lite and 2.4+ do;
        2.3 parses it and refuses to run it). Asked once per client."""
        if self._arithmetic is None:
            from pymilvus.exceptions import MilvusException

            self._ensure_loaded(collection)
            try:
                with self.calls():
                    self.client.query(collection, limit=1, output_fields=["key"],
                                      filter="near_x * 1.0 + near_y * 0.5 >= 2.0",
                                      timeout=self.timeout_s)
                self._arithmetic = True
            except MilvusException:
                self._arithmetic = False
        return self._arithmetic

    def filter_expression(self, collection: str, where: PhotoFilter) -> str | None:
        """The filter as this server can evaluate it inside a search (None: the collection
        has no metadata). `near` without arithmetic on the server: the keys inside the
        circle, read from the rows in its bounding box (FilterTooBroad past NEAR_KEYS_MAX)."""
        if not self.has_photos(collection):
            return None
        near = None
        if where.near is not None and not self._evaluates_arithmetic(collection):
            cache_key = (collection, where.near.model_dump_json())
            with self._client_lock:
                near = self._near_cache.get(cache_key)
            if near is None:
                near = self._near_keys(collection, where)
                with self._client_lock:
                    self._near_cache[cache_key] = near
        return milvus_photos.expression(where, near)

    def _near_keys(self, collection: str, where: PhotoFilter) -> str:
        box = milvus_photos.near_box(where.near)
        a, b, c = where.near.unit_vector()
        inside, outside = [], []
        for rows in self._scan(collection, f"has_info == true and {box}", ["lat", "lon"]):
            lat = np.asarray([r["lat"] for r in rows])
            lon = np.asarray([r["lon"] for r in rows])
            x, y, z = unit_sphere(lat, lon)
            within = x * a + y * b + z * c >= where.near.min_cosine()
            for r, w in zip(rows, within):
                (inside if w else outside).append(r["key"])
            if min(len(inside), len(outside)) > NEAR_KEYS_MAX:
                raise FilterTooBroad("near: too many photos around that point for this Milvus "
                                     "server; choose a smaller radius")
        if len(inside) <= len(outside):
            return f"({_in(inside)})" if inside else "(key in [])"
        return f"({box} and not ({_in(outside)}))" if outside else box

    def _scan(self, collection: str, expression: str, fields: list[str]):
        """The rows matching `expression`, page by page in key order (as keys_page reads)."""
        self._ensure_loaded(collection)
        last = None
        while True:
            page = expression if last is None else \
                f"({expression}) and key > {json.dumps(last, ensure_ascii=False)}"
            with self.calls(searching=collection):
                rows = self.client.query(collection, filter=page, limit=PAGE,
                                         output_fields=["key", *fields],
                                         consistency_level="Bounded", iterator="True",
                                         reduce_stop_for_best="False",
                                         timeout=self.timeout_s * 6)
            if not rows:
                return
            rows.sort(key=lambda r: r["key"])
            yield rows
            if len(rows) < PAGE:
                return
            last = rows[-1]["key"]

    def facets(self, collection: str, limit: int) -> dict[str, list[list]]:
        fields = ["folder", "country", "country_code", "city", "camera_model", "camera_make",
                  "taken_at", "has_info"]
        cached = self._facets.get(collection)
        if cached is None or time.monotonic() - cached[0] > FACETS_TTL_S:
            rows = (milvus_photos.from_fields(r, r["key"]) for page in
                    self._scan(collection, "has_info == true", fields) for r in page)
            # every value, ranked: a smaller limit is a prefix of each list
            cached = self._facets[collection] = (time.monotonic(),
                                                 photo_columns.facets(rows, limit=2 ** 62))
        return {name: ranked[:max(0, int(limit))] for name, ranked in cached[1].items()}

    # --- reading -----------------------------------------------------------------------------
    def view(self, model_id: str, version: str | None = None) -> MilvusView:
        """A view of `version` (default: the collection the model's alias points at)."""
        collection = version or self.published(model_id)
        if collection is None:
            raise IndexLoadError(f"no index published for model {str(model_id)[:100]} "
                                 "(run `python -m indexer rebuild`)")
        if version is not None:
            with self.calls():
                exists = self.client.has_collection(version, timeout=self.timeout_s)
            if not exists:
                raise IndexLoadError("index version does not exist")
        built_by, dim = self._describe(collection)
        if built_by != model_id:  # two ids that map to one name: never serve the other's
            raise IndexLoadError(f"index version {collection} was built by model "
                                 f"{built_by[:100]}, but the loaded model is {model_id}")
        return MilvusView(self, collection, model_id, dim, self._count(collection, "Bounded"),
                          self.alias(model_id))

    def indexed(self, model_id: str | None) -> Indexed | None:
        if model_id is None:
            return None
        collection = self.published(model_id)
        if collection is None:
            return None
        built_by = self._model_of(collection)
        etags = self._etags(collection)
        return Indexed(collection, built_by, len(etags), etags)

    def _etags(self, collection: str) -> dict[str, str]:
        """key -> etag of every row, paged by key (Strong: sees every write made before)."""
        out: dict[str, str] = {}
        last = None
        while rows := self.keys_page(collection, last, PAGE):
            out.update(rows)
            last = rows[-1][0]
        return out

    def keys_page(self, version, after=None, limit=10_000) -> list[tuple[str, str]]:
        """One query on the primary key (`key > after`, at most `limit` rows, capped at PAGE).
        In iterator mode, as pymilvus's query iterator asks, the server answers with the
        smallest keys in order; a plain limited query returns any `limit` of them (milvus-lite
        does). Strong: a page sees every write made before. A key cannot come twice: a key
        already held is written by upsert, and a query returns one row per primary key."""
        filt = "" if after is None else f"key > {json.dumps(after, ensure_ascii=False)}"
        self._ensure_loaded(version)
        with self.calls():
            rows = self.client.query(version, filter=filt, limit=max(1, min(int(limit), PAGE)),
                                     output_fields=["key", "etag"], consistency_level="Strong",
                                     iterator="True", reduce_stop_for_best="False",
                                     timeout=self.timeout_s * 6)
        return sorted((r["key"], r["etag"]) for r in rows)

    def near_pairs(self, view: MilvusView, threshold, columns=None, batch=256,
                   progress=None):
        """Milvus's range search (`radius`: scores above the threshold) around each stored
        vector, read page by page in key order; at most NEAR_NEIGHBOURS_MAX near copies per
        photo (a search's limit), more join its group through them."""
        collection = view.collection
        self._ensure_loaded(collection)
        params = self.search_params(NEAR_NEIGHBOURS_MAX + 1)
        params = {**params, "params": {**params["params"], "radius": float(threshold),
                                       "range_filter": RANGE_FILTER_MAX}}
        last = None
        while True:
            with self.calls(searching=collection):
                rows = self.client.query(
                    collection, limit=max(1, min(int(batch), PAGE)),
                    filter="" if last is None else
                    f"key > {json.dumps(last, ensure_ascii=False)}",
                    output_fields=["key", "vector"], consistency_level="Bounded",
                    iterator="True", reduce_stop_for_best="False", timeout=self.timeout_s * 6)
            if not rows:
                return
            rows.sort(key=lambda r: r["key"])
            keys = [r["key"] for r in rows]
            queries = probe_vectors(np.asarray([r["vector"] for r in rows], np.float32),
                                    columns)
            with self.calls(searching=collection):
                found = self.client.search(collection, data=queries.tolist(),
                                           limit=NEAR_NEIGHBOURS_MAX + 1, search_params=params,
                                           consistency_level="Bounded",
                                           timeout=self.timeout_s * 6)
            yield pairs_above(keys, [[h.id for h in row] for row in found],
                              [[h["distance"] for h in row] for row in found], threshold)
            if progress is not None:
                progress(len(keys))
            last = keys[-1]

    def status(self, model_id: str | None = None) -> dict:
        out = {"backend": self.backend, "version": None, "model_id": None, "count": 0,
               "alias": self.alias(model_id) if model_id else None, "collection": None}
        if model_id is None:
            return out
        collection = self.published(model_id)
        if collection is not None:
            out.update(version=collection, collection=collection,
                       model_id=self._model_of(collection), count=self._count(collection))
        return out

    def versions(self) -> list[str]:
        """Every collection of ours (all models), oldest first within a model."""
        with self.calls():
            return sorted(c for c in self.client.list_collections(timeout=self.timeout_s)
                          if c.startswith(self.prefix + "__") and c.count("__") >= 2)

    def prune(self, keep: int) -> dict:
        """Per model: keep the aliased collection and the newest `keep`; drop the rest."""
        collections = self.versions()
        by_alias: dict[str, list[str]] = {}
        for c in collections:
            by_alias.setdefault(c.rsplit("__", 1)[0], []).append(c)
        removed, current = [], []
        for alias, names in by_alias.items():
            with self.calls():
                try:
                    aliased = self.client.describe_alias(alias, timeout=self.timeout_s)[
                        "collection_name"]
                    current.append(aliased)
                except Exception as exc:
                    if not _not_found(exc):
                        raise
                    aliased = None
            for name in names:  # before the newest few are counted: a dead draft is none
                if name != aliased and self._dead_draft(name, aliased):
                    with self.calls():
                        self.client.drop_collection(name, timeout=self.timeout_s)
                    removed.append(name)
            names = [n for n in names if n not in removed]
            for name in (names[:-keep] if keep else names):
                if name != aliased:
                    with self.calls():
                        self.client.drop_collection(name, timeout=self.timeout_s)
                    removed.append(name)
        return {"removed": removed, "versions": len(collections) - len(removed),
                "current": current}

    def _dead_draft(self, collection: str, aliased: str | None) -> bool:
        """An unpublished collection that can never be published: begun when another one than
        `aliased` was published, or DRAFT_ABANDONED_S ago. Collections made before drafts were
        marked have no mark: versions, as before."""
        with self.calls():
            props = self.client.describe_collection(collection, timeout=self.timeout_s).get(
                "properties") or {}
        if props.get("draft") != "1":
            return False
        begun = float(props.get("draft_begun") or 0)
        return props.get("draft_base", "") != (aliased or "") or \
            time.time() - begun > DRAFT_ABANDONED_S

    # --- writing -----------------------------------------------------------------------------
    def begin(self, model_id, dim, extra=None, tuning_queries=None, base=None) -> str:
        """A new, empty collection for `model_id` (indexed and loaded, not aliased); with
        `base`, the published collection itself (updates write in place)."""
        from pymilvus import DataType, MilvusClient

        if base is not None:
            if self.published(model_id) != base:
                raise DraftGone(f"index version {base} is no longer published")
            return base

        name = self._collection(model_id, new_version_name())
        # a draft until its publish: what prune needs to tell a dead run's collection
        draft = {"draft": "1", "draft_base": self.published(model_id) or "",
                 "draft_begun": f"{time.time():.0f}"}
        schema = MilvusClient.create_schema(auto_id=False, enable_dynamic_field=False,
                                            description=model_id)
        schema.add_field("key", DataType.VARCHAR, is_primary=True, max_length=KEY_MAX)
        schema.add_field("etag", DataType.VARCHAR, max_length=ETAG_MAX)
        schema.add_field("vector", DataType.FLOAT_VECTOR, dim=int(dim))
        schema.add_field("tail", DataType.FLOAT)  # vector[-1]: searches return it, not vectors
        milvus_photos.add_fields(schema)
        params, _ = INDEX_TYPES[self.index_type]
        if params is None:
            params = {"nlist": self.nlist}
        from pymilvus.exceptions import MilvusException

        # scalar indexes as the server has them: INVERTED (milvus-lite, 2.4+), else Trie and
        # STL_SORT (2.3); a server refusing both gets none (filters still work, scanning)
        for family in ("inverted", "legacy", "none"):
            index_params = MilvusClient.prepare_index_params()
            index_params.add_index("vector", index_type=self.index_type, metric_type="IP",
                                   params=params)
            milvus_photos.add_indexes(index_params, family)
            try:
                with self.calls():
                    # the model id also as a property: milvus-lite keeps no collection
                    # description
                    self.client.create_collection(name, schema=schema,
                                                  index_params=index_params,
                                                  consistency_level="Bounded",
                                                  properties={"model_id": model_id,
                                                              **draft,
                                                              **NO_AUTO_COMPACTION},
                                                  timeout=self.timeout_s * 6)
                break
            except MilvusException as exc:
                if family == "none" or "index" not in str(exc.message).lower():
                    raise
                with self.calls():  # created before its indexes failed: start again
                    if self.client.has_collection(name, timeout=self.timeout_s):
                        self.client.drop_collection(name, timeout=self.timeout_s)
        self._photos[name] = True
        log.info("created collection %s (%s, dim %d, scalar indexes: %s)", name,
                 self.index_type, dim, family)
        return name

    def _held(self, collection: str, keys: list[str]) -> set[str]:
        """Which of these keys the collection holds (Strong: every write made before)."""
        held: set[str] = set()
        for s in range(0, len(keys), HELD_CHECK_BATCH):
            chunk = keys[s:s + HELD_CHECK_BATCH]
            with self.calls():
                rows = self.client.query(collection, filter=_in(chunk), limit=len(chunk),
                                         output_fields=["key"], consistency_level="Strong",
                                         timeout=self.timeout_s * 6)
            held.update(r["key"] for r in rows)
        return held

    def write(self, version, keys, vectors, etags, part="0", info=None) -> int:
        """Write rows by object key, with their metadata: writing the same rows again leaves
        the same collection. Keys the collection holds are upserted, the others inserted: an
        upsert also writes a delete of its key, and segments full of deletes are compacted (and
        indexed again) by the server right after they are flushed, even the first write of a
        fresh collection. A collection made before metadata existed takes none."""
        vectors = check_rows(keys, vectors, etags)
        infos = photo_columns.check_infos(info, len(keys)) or [None] * len(keys)
        photos = self.has_photos(version)
        keys = list(keys)
        # a key twice in one call: upserts, which keep one row for it
        held = self._held(version, keys) if len(set(keys)) == len(keys) else set(keys)
        for s in range(0, len(keys), WRITE_BATCH):
            rows = [{"key": k, "etag": e, "vector": v, "tail": v[-1],
                     **(milvus_photos.to_fields(photo_columns.clean_info(i, k)) if photos
                        else {})}
                    for k, e, v, i in zip(keys[s:s + WRITE_BATCH], etags[s:s + WRITE_BATCH],
                                          vectors[s:s + WRITE_BATCH].tolist(),
                                          infos[s:s + WRITE_BATCH])]
            new = [r for r in rows if r["key"] not in held]
            known = [r for r in rows if r["key"] in held]
            with self.calls():
                if new:
                    self.client.insert(version, new, timeout=self.timeout_s * 6)
                if known:
                    self.client.upsert(version, known, timeout=self.timeout_s * 6)
        if held:
            self._changed_in_place(version)
        return len(keys)

    def remove(self, version: str, keys: Iterable[str], part: str = "0") -> int:
        keys = list(dict.fromkeys(keys))
        if keys:
            self._changed_in_place(version)
        for s in range(0, len(keys), WRITE_BATCH):
            with self.calls():
                self.client.delete(version, filter=_in(keys[s:s + WRITE_BATCH]),
                                   timeout=self.timeout_s * 6)
        return len(keys)

    def _wait_indexed(self, collection: str) -> None:
        """Until every flushed row is in the vector index (searches of a fresh version are
        then as fast as the API expects). Not until nothing is pending: the server's compaction
        merges the fresh small segments and indexes the merged ones again (at 300k vectors
        here that re-indexing ran minutes after every row was indexed), searches meanwhile use
        the segments already indexed."""
        deadline = time.monotonic() + self.index_wait_s
        while True:
            with self.calls():
                info = self.client.describe_index(collection, "vector", timeout=self.timeout_s)
            total, done = int(info.get("total_rows", 0)), int(info.get("indexed_rows", 0))
            if not int(info.get("pending_index_rows", 0)) or (total and done >= total) \
                    or time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def publish(self, version, parts=None) -> dict:
        """Count (Strong: every write made so far), flush and wait for the vector index (large
        versions), then point the model's alias at it. The published collection itself (an
        update in place): only counted. `parts`: upserts leave nothing per part to check."""
        model_id = self._model_of(version)
        count = self._count(version)
        if self.published(model_id) == version:
            return {"version": version, "count": count}
        if count >= FLUSH_MIN_ROWS:
            with self.calls():
                self.client.flush(version, timeout=self.timeout_s * 60)
            self._wait_indexed(version)
        alias = self.alias(model_id)
        with self.calls():
            self.client.load_collection(version, timeout=self.timeout_s * 12)
            # no longer a draft before anyone is served it (killed between the two: an
            # unpublished version, kept as the newest few are)
            # with the compaction setting again: Milvus 2.3.5's data coordinator keeps only the
            # properties of the last change, and would compact the fresh segments after all
            self.client.alter_collection_properties(version, {"draft": "0",
                                                              **NO_AUTO_COMPACTION},
                                                    timeout=self.timeout_s)
            if self.published(model_id) is None:
                try:
                    self.client.create_alias(version, alias, timeout=self.timeout_s)
                except Exception:  # another publisher made it meanwhile: switch it
                    self.client.alter_alias(version, alias, timeout=self.timeout_s)
            else:
                self.client.alter_alias(version, alias, timeout=self.timeout_s)
        log.info("published %s as %s (%d vectors)", version, alias, count)
        return {"version": version, "count": count}

    def discard(self, version) -> None:
        with self.calls():
            if not self.client.has_collection(version, timeout=self.timeout_s):
                return
            if self.client.list_aliases(version, timeout=self.timeout_s).get("aliases"):
                raise ValueError(f"{version} is published; it cannot be discarded")
            self.client.drop_collection(version, timeout=self.timeout_s)

    def _changed_in_place(self, collection: str) -> None:
        """A published collection whose rows are rewritten or removed: Milvus compacts it as
        usual from now on (merging small segments, dropping deleted rows). A draft keeps
        still: a retried part rewrites its own rows before anyone searches them."""
        with self.calls():
            properties = self.client.describe_collection(
                collection, timeout=self.timeout_s).get("properties") or {}
            if properties.get("draft") != "1" and properties.get(AUTO_COMPACTION) == "false":
                self.client.alter_collection_properties(collection, {AUTO_COMPACTION: "true"},
                                                        timeout=self.timeout_s)
                log.info("%s changed in place: compacted by Milvus as usual", collection)

    def update(self, model_id, keys, vectors, etags, delete=(), extra=None,
               tuning_queries=None, info=None) -> dict | None:
        """Write and delete in the published collection (no new version). None when this model
        has none (rebuild instead)."""
        collection = self.published(model_id)
        if collection is None or self._model_of(collection) != model_id:
            return None
        vectors = check_rows(keys, vectors, etags)
        gone = [k for k in dict.fromkeys(delete) if k not in set(keys)]
        if len(keys):
            self.write(collection, keys, vectors, etags, info=info)
        if gone:
            self.remove(collection, gone)
        return {"version": collection, "count": self._count(collection),
                "changed": bool(len(keys) or gone)}
