"""Encoding and search routes. Each accepts JSON or the original clients' form fields."""
from __future__ import annotations

from urllib.parse import quote

import numpy as np
from fastapi import APIRouter, Depends, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from search_api.deps import (
    ApiKeyDep,
    MetricsDep,
    SettingsDep,
    StateDep,
    body_doc,
    close_form,
    form_schema,
    read_fields,
    validate,
)
from search_api.errors import responses
from search_api.images import decode_upload
from search_api.schemas import (
    BatchSearchIn,
    EmbeddingOut,
    Hit,
    ImageSearchIn,
    PageIn,
    SearchIn,
    SearchOut,
    TextIn,
)

router = APIRouter(dependencies=[Depends(close_form)])

IMAGE_FORM = {
    "type": "object",
    "required": ["image"],
    "properties": {"image": {"type": "string", "format": "binary",
                             "description": "a JPEG, PNG, WebP, GIF or BMP image"}},
}
IMAGE_SEARCH_FORM = {**IMAGE_FORM, "properties": {
    **IMAGE_FORM["properties"], **form_schema(PageIn.model_json_schema())["properties"]}}


def _multipart(schema: dict) -> dict:
    return {"requestBody": {"required": True, "content": {"multipart/form-data": {
        "schema": schema,
        "encoding": {"image": {"contentType": "image/jpeg, image/png, image/webp, image/gif, "
                                              "image/bmp"}}}}}}


TEXT_ERRORS = responses(400, 413, 415, 422, 503)
UPLOAD_ERRORS = responses(400, 401, 413, 415, 422, 503)


def _check_query(text: str, settings) -> str:
    if len(text) > settings.max_query_chars:
        raise HTTPException(422, f"query longer than {settings.max_query_chars} characters "
                                 f"({len(text)})")
    return text


def _check_top_k(top_k: int, settings) -> int:
    if top_k > settings.max_top_k:
        raise HTTPException(422, f"top_k must be between 1 and {settings.max_top_k}")
    return top_k


async def _read_image(files: dict[str, UploadFile], settings) -> tuple[str, bytes]:
    upload = files.get("image") or files.get("file")
    if upload is None:
        raise HTTPException(422, "send the image as a multipart file field named 'image'")
    data = await upload.read(settings.max_upload_bytes + 1)
    if len(data) > settings.max_upload_bytes:
        raise HTTPException(413, f"image larger than {settings.max_upload_bytes} bytes")
    return upload.filename or "upload", data


def _hits(request: Request, scores, keys, offset: int, top_k: int, min_score, urls=True,
          similarity=None):
    """Result rows; `similarity(keys, scores)` gives the cosine where scores are not plain cosine."""
    kept = []
    for rank, (score, key) in enumerate(zip(scores, keys), 1):
        if rank <= offset:
            continue
        if min_score is not None and score < min_score:
            break
        kept.append((rank, float(score), key))
        if len(kept) == top_k:
            break
    cosines = similarity([k for _, _, k in kept], np.array([s for _, s, _ in kept])) \
        if similarity is not None and kept else [s for _, s, _ in kept]
    base = str(request.url_for("get_image", key="")) if urls else None  # once, not per hit
    return [Hit(rank=rank, key=key, filename=key.rsplit("/", 1)[-1], score=score,
                similarity=float(cos), url=base + quote(key, safe="/") if urls else None)
            for (rank, score, key), cos in zip(kept, cosines)]


# below this size a flat search costs well under a millisecond: run it on the event loop rather
# than paying a thread hop (BENCHMARKS.md §1); larger indexes search in the thread pool
INLINE_SEARCH_MAX = 20_000


async def _search_index(state, metrics, vectors: np.ndarray, k: int):
    index = state.index  # one reference for the whole request (hot reload swaps it)
    if index is None:
        raise HTTPException(503, "no index is loaded yet; run `python -m indexer rebuild`")
    vectors = state.encoder.scoring.query_vectors(vectors)
    if index.count <= INLINE_SEARCH_MAX:
        scores, keys = metrics.timed("faiss_search", index.search, vectors, k)
    else:
        scores, keys = await run_in_threadpool(metrics.timed, "faiss_search", index.search,
                                               vectors, k)
    return index, scores, keys


def _cosine(state, index):
    """Cosine similarity of the hits, read back from their stored vectors and scores."""
    scoring = state.encoder.scoring
    return lambda keys, scores: scoring.cosine(index.stored_vectors(keys), scores)


async def _decode(data: bytes, settings, metrics):
    return await run_in_threadpool(metrics.timed, "image_decode", decode_upload, data,
                                   settings.max_image_pixels)


@router.post("/encode_text", response_model=EmbeddingOut, openapi_extra=body_doc(TextIn),
             responses=responses(400, 413, 415, 422))
async def encode_text(request: Request, state: StateDep, settings: SettingsDep):
    fields, _ = await read_fields(request, settings.max_upload_bytes)
    body = validate(TextIn, fields)
    text = _check_query(body.text, settings)
    vec = await state.encode_texts([text])
    return EmbeddingOut(model_id=state.encoder.model_id, dim=state.encoder.dim,
                        embedding=vec[0].tolist(), text=text)


@router.post("/encode_image", response_model=EmbeddingOut, dependencies=[ApiKeyDep],
             responses=responses(400, 401, 413, 415, 422), openapi_extra=_multipart(IMAGE_FORM))
async def encode_image(request: Request, state: StateDep, settings: SettingsDep,
                       metrics: MetricsDep):
    _, files = await read_fields(request, settings.max_upload_bytes)
    filename, data = await _read_image(files, settings)
    image = await _decode(data, settings, metrics)
    vec = await state.encode_images([image])
    return EmbeddingOut(model_id=state.encoder.model_id, dim=state.encoder.dim,
                        embedding=vec[0].tolist(), filename=filename)


@router.post("/search_images_by_text", response_model=SearchOut, openapi_extra=body_doc(SearchIn),
             responses=TEXT_ERRORS)
async def search_images_by_text(request: Request, state: StateDep, settings: SettingsDep,
                                metrics: MetricsDep):
    """Top-k images for a text. `offset` pages on; `min_score` drops weak matches."""
    fields, _ = await read_fields(request, settings.max_upload_bytes)
    body = validate(SearchIn, fields)
    text = _check_query(body.text, settings)
    top_k = _check_top_k(body.top_k, settings)
    if body.image_embeddings is None and state.index is None:
        raise HTTPException(503, "no index is loaded yet; run `python -m indexer rebuild`")
    vec = (await state.encode_texts([text]))[0]

    if body.image_embeddings is not None:
        # the original clients' mode: rank exactly the embeddings they sent
        try:
            mat = np.asarray([e.embedding for e in body.image_embeddings], dtype=np.float64)
        except ValueError:
            raise HTTPException(422, "image_embeddings must all have the same length") from None
        if mat.size and mat.shape[1] != state.encoder.dim:
            raise HTTPException(422, f"image_embeddings must have dimension {state.encoder.dim}")
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
        names = [body.image_embeddings[i].filename for i in order]
        hits = _hits(request, scores[order], names, body.offset, top_k, body.min_score, urls=False)
        return SearchOut(query=text, model_id=state.encoder.model_id, index_version=None,
                         total=len(names), results=hits)

    index, scores, keys = await _search_index(state, metrics, vec[None, :], body.offset + top_k)
    hits = _hits(request, scores[0], keys[0], body.offset, top_k, body.min_score,
                 similarity=_cosine(state, index))
    return SearchOut(query=text, model_id=state.encoder.model_id, index_version=index.version,
                     total=index.count, results=hits)


@router.post("/search_images_by_image", response_model=SearchOut, dependencies=[ApiKeyDep],
             responses=UPLOAD_ERRORS, openapi_extra=_multipart(IMAGE_SEARCH_FORM))
async def search_images_by_image(request: Request, state: StateDep, settings: SettingsDep,
                                 metrics: MetricsDep):
    """Images that look like the uploaded one (multipart `image`, optional `top_k`, `offset`,
    `min_score`)."""
    fields, files = await read_fields(request, settings.max_upload_bytes)
    body = validate(ImageSearchIn, fields)
    top_k = _check_top_k(body.top_k, settings)
    filename, data = await _read_image(files, settings)
    image = await _decode(data, settings, metrics)
    if state.index is None:
        raise HTTPException(503, "no index is loaded yet; run `python -m indexer rebuild`")
    vec = await state.encode_images([image])
    index, scores, keys = await _search_index(state, metrics, vec, body.offset + top_k)
    hits = _hits(request, scores[0], keys[0], body.offset, top_k, body.min_score,
                 similarity=_cosine(state, index))
    return SearchOut(query=filename, model_id=state.encoder.model_id, index_version=index.version,
                     total=index.count, results=hits)


@router.post("/search_images_by_texts", response_model=list[SearchOut],
             openapi_extra=body_doc(BatchSearchIn), responses=TEXT_ERRORS)
async def search_images_by_texts(request: Request, state: StateDep, settings: SettingsDep,
                                 metrics: MetricsDep):
    """Several text queries in one call (one batched forward pass, one FAISS search)."""
    fields, _ = await read_fields(request, settings.max_upload_bytes)
    body = validate(BatchSearchIn, fields)
    if len(body.queries) > settings.max_batch_queries:
        raise HTTPException(422, f"at most {settings.max_batch_queries} queries per call")
    texts = []
    for i, q in enumerate(body.queries):
        if not q.strip():
            raise HTTPException(422, f"queries[{i}] must not be empty or whitespace")
        texts.append(_check_query(q.strip(), settings))
    top_k = _check_top_k(body.top_k, settings)
    if state.index is None:
        raise HTTPException(503, "no index is loaded yet; run `python -m indexer rebuild`")
    vecs = await state.encode_texts(texts)
    index, scores, keys = await _search_index(state, metrics, vecs, top_k)
    return [SearchOut(query=t, model_id=state.encoder.model_id, index_version=index.version,
                      total=index.count,
                      results=_hits(request, s, k, 0, top_k, body.min_score,
                                    similarity=_cosine(state, index)))
            for t, s, k in zip(texts, scores, keys)]
