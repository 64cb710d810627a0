"""Encoding and search routes. The text routes take JSON or the original clients' form fields
(`deps.json_or_form`); the upload routes take multipart forms with a file field `image`."""
# no `from __future__ import annotations`: FastAPI reads the per-app body types defined in
# build_router from the endpoints' signatures
import json
from typing import Annotated
from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, File, Form, HTTPException, Request, Response, UploadFile
from fastapi.concurrency import run_in_threadpool

from core.settings import Settings
from indexer.vector_index import IndexUnavailable
from search_api.deps import ApiKeyDep, BodyRoute, MetricsDep, StateDep
from search_api.errors import responses
from search_api.images import ImageTooLarge, decode_gated, decode_upload
from search_api.schemas import Bodies, EmbeddingOut, SearchOut
from search_api.state import IndexDown, join_rows

TEXT_ERRORS = responses(400, 413, 415, 422, 503)
UPLOAD_ERRORS = responses(400, 401, 413, 415, 422, 503)
IMAGE_DOC = "a JPEG, PNG, WebP, GIF or BMP image"
FORM_NOTE = ("\n\nThe same fields are accepted as a form (urlencoded or multipart), as the "
             "original clients send them.")

# below this size a flat search costs well under a millisecond: run it on the event loop rather
# than paying a thread hop (BENCHMARKS.md §1); larger indexes search in the thread pool
INLINE_SEARCH_MAX = 20_000


def _json(data) -> Response:
    return Response(json.dumps(data, separators=(",", ":")), media_type="application/json")


def _image_base(settings: Settings, request: Request) -> str:
    """Where result URLs start: PUBLIC_BASE_URL when set, else a path relative to the host (the
    app's root path + /images/); never the request's Host header."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/") + "/images/"
    return request.scope.get("root_path", "").rstrip("/") + "/images/"


def _hits(request: Request, scores, keys, offset: int, top_k: int, min_score, urls=True,
          similarities=None) -> list[dict]:
    """Result rows; `similarities` (aligned with keys) where scores are not plain cosine."""
    if similarities is None:
        similarities = scores
    # the /images/{key} route (system.get_image)
    base = _image_base(request.app.state.settings, request) if urls else None
    hits = []
    for rank, (score, key, cos) in enumerate(zip(scores, keys, similarities), 1):
        if rank <= offset:
            continue
        if min_score is not None and score < min_score:
            break
        hits.append({"rank": rank, "key": key, "filename": key.rsplit("/", 1)[-1],
                     "score": float(score), "similarity": float(cos),
                     "url": base + quote(key, safe="/") if urls else None})
        if len(hits) == top_k:
            break
    return hits


def _out(query: str, state, index, total: int, hits: list[dict]) -> dict:
    return {"query": query, "model_id": state.encoder.model_id,
            "index_version": index.version if index is not None else None, "total": total,
            "results": hits}


def _cosines(scoring, scores, tails) -> list:
    return [scoring.cosine_from_tail(t, s[:len(t)]) for s, t in zip(scores, tails)]


def _search(state, metrics, vectors: np.ndarray, k: int):
    """(index, scores, keys, cosine similarities per row). Where the score is not the plain
    cosine (hubness correction), each hit's stored tail comes with it and Scoring reads the
    cosine back from it."""
    index = state.require_index()  # one reference for the whole request (hot reload swaps it)
    scoring = state.encoder.scoring
    vectors = scoring.query_vectors(vectors)
    if not scoring.corrected:
        scores, keys = metrics.timed("faiss_search", index.search, vectors, k)
        return index, scores, keys, scores
    scores, keys, tails = metrics.timed("faiss_search", index.search, vectors, k,
                                        with_tail=True)
    return index, scores, keys, _cosines(scoring, scores, tails)


async def _search_remote(state, metrics, vectors: np.ndarray, k: int):
    """_search on a remote index (Milvus): the query joins the concurrent ones in one call
    (state.remote_searches); a tail is one scalar per hit."""
    index = state.require_index()
    scoring = state.encoder.scoring
    vectors = scoring.query_vectors(vectors)
    corrected = scoring.corrected
    try:
        rows = await state.remote_searches([(index, v, k, corrected) for v in vectors])
    except IndexUnavailable as exc:  # Milvus went away: 503 now, and for the next requests
        state.index_failed(exc)
        raise IndexDown(str(exc)) from None
    found = join_rows(rows)
    if not corrected:
        return index, found[0], found[1], found[0]
    return index, found[0], found[1], _cosines(scoring, found[0], found[2])


async def _search_index(state, metrics, vectors: np.ndarray, k: int):
    if state.remote:
        return await _search_remote(state, metrics, vectors, k)
    index = state.index
    if index is not None and index.count > INLINE_SEARCH_MAX:
        return await run_in_threadpool(_search, state, metrics, vectors, k)
    return _search(state, metrics, vectors, k)


def _rank_given(vec: np.ndarray, embeddings, dim: int) -> tuple[np.ndarray, list[str]]:
    """The original clients' mode: rank exactly the embeddings they sent."""
    try:
        mat = np.asarray([e.embedding for e in embeddings], dtype=np.float64)
    except ValueError:
        raise HTTPException(422, "image_embeddings must all have the same length") from None
    if mat.size and mat.shape[1] != dim:
        raise HTTPException(422, f"image_embeddings must have dimension {dim}")
    if mat.size and not np.isfinite(mat).all():
        raise HTTPException(422, "image_embeddings must be finite numbers")
    if mat.size:
        # scale first so huge values cannot overflow the norm
        mat = mat / np.maximum(np.abs(mat).max(axis=1, keepdims=True), 1e-300)
        norms = np.linalg.norm(mat, axis=1, keepdims=True)
        scores = np.nan_to_num((mat / np.maximum(norms, 1e-12)) @ vec, nan=0.0)
    else:
        scores = np.zeros(0)
    order = np.argsort(-scores, kind="stable")
    return scores[order], [embeddings[i].filename for i in order]


def build_router(settings: Settings, bodies: Bodies) -> APIRouter:
    """The routes of one app: their bodies carry that app's limits (schemas.bodies)."""
    router = APIRouter()
    text = APIRouter(route_class=BodyRoute)  # JSON-or-form bodies, no dependencies
    TextBody, SearchBody, BatchBody = bodies.text, bodies.search, bodies.batch
    page = bodies.page_fields

    async def read_image(image: UploadFile) -> tuple[str, bytes]:
        data = await image.read(settings.max_upload_bytes + 1)
        if len(data) > settings.max_upload_bytes:
            raise ImageTooLarge(f"image larger than {settings.max_upload_bytes} bytes")
        return image.filename or "upload", data

    async def decode(data: bytes, metrics, state):
        """Bounded: at most a few decodes at once, within a memory budget (images.DecodeGate)."""
        gate = state.decode_gate(settings.max_concurrent_decodes, settings.decode_memory_mb)
        return await decode_gated(gate, data, settings.max_image_pixels,
                                  lambda: metrics.timed("image_decode", decode_upload, data,
                                                        settings.max_image_pixels))

    ImageFile = Annotated[UploadFile, File(description=IMAGE_DOC)]

    @text.post("/encode_text", response_model=EmbeddingOut,
                 responses=responses(400, 413, 415, 422), description="Embed a text." + FORM_NOTE)
    async def encode_text(request: Request, body: TextBody):
        state = request.app.state.service
        vec = await state.encode_texts([body.text])
        return _json({"model_id": state.encoder.model_id, "dim": state.encoder.dim,
                      "embedding": vec[0].tolist(), "filename": None, "text": body.text})

    @router.post("/encode_image", response_model=EmbeddingOut, dependencies=[ApiKeyDep],
                 responses=responses(400, 401, 413, 415, 422))
    async def encode_image(image: ImageFile, state: StateDep, metrics: MetricsDep):
        """Embed an image (multipart file field `image`)."""
        filename, data = await read_image(image)
        vec = await state.encode_images([await decode(data, metrics, state)])
        return _json({"model_id": state.encoder.model_id, "dim": state.encoder.dim,
                      "embedding": vec[0].tolist(), "filename": filename, "text": None})

    @text.post("/search_images_by_text", response_model=SearchOut, responses=TEXT_ERRORS,
                 description="Top-k images for a text. `offset` pages on; `min_score` drops weak "
                             "matches; `image_embeddings` ranks the given embeddings instead of "
                             "the index." + FORM_NOTE)
    async def search_images_by_text(request: Request, body: SearchBody):
        state = request.app.state.service
        if body.image_embeddings is None:
            state.require_index()  # before encoding: 503 at once
        vec = (await state.encode_texts([body.text]))[0]
        if body.image_embeddings is not None:
            scores, names = _rank_given(vec, body.image_embeddings, state.encoder.dim)
            hits = _hits(request, scores, names, body.offset, body.top_k, body.min_score,
                         urls=False)
            return _json(_out(body.text, state, None, len(names), hits))
        index, scores, keys, cosines = await _search_index(
            state, request.app.state.metrics, vec[None, :], body.offset + body.top_k)
        hits = _hits(request, scores[0], keys[0], body.offset, body.top_k, body.min_score,
                     similarities=cosines[0])
        return _json(_out(body.text, state, index, index.count, hits))

    @router.post("/search_images_by_image", response_model=SearchOut, dependencies=[ApiKeyDep],
                 responses=UPLOAD_ERRORS)
    async def search_images_by_image(
            image: ImageFile, state: StateDep, metrics: MetricsDep, request: Request,
            top_k: Annotated[int, Form(**page["top_k"])] = 5,
            offset: Annotated[int, Form(**page["offset"])] = 0,
            min_score: Annotated[float | None, Form(**page["min_score"])] = None):
        """Images that look like the uploaded one (multipart `image`, optional `top_k`,
        `offset`, `min_score`)."""
        filename, data = await read_image(image)
        img = await decode(data, metrics, state)
        state.require_index()
        vec = await state.encode_images([img])
        index, scores, keys, cosines = await _search_index(state, metrics, vec, offset + top_k)
        hits = _hits(request, scores[0], keys[0], offset, top_k, min_score,
                     similarities=cosines[0])
        return _json(_out(filename, state, index, index.count, hits))

    @text.post("/search_images_by_texts", response_model=list[SearchOut], responses=TEXT_ERRORS,
                 description="Several text queries in one call (one batched forward pass, one "
                             "FAISS search). As a form: repeated `queries` fields (or one "
                             "holding a JSON list)." + FORM_NOTE)
    async def search_images_by_texts(request: Request, body: BatchBody):
        state = request.app.state.service
        state.require_index()
        vecs = await state.encode_texts(body.queries)
        index, scores, keys, cosines = await _search_index(state, request.app.state.metrics,
                                                           vecs, body.top_k)
        return _json([_out(t, state, index, index.count,
                           _hits(request, s, k, 0, body.top_k, body.min_score,
                                 similarities=c))
                      for t, s, k, c in zip(body.queries, scores, keys, cosines)])

    router.include_router(text)
    return router
