"""Encoding and search routes. Each accepts JSON or the original clients' form fields."""
from __future__ import annotations

import numpy as np
from fastapi import APIRouter, HTTPException, Request
from fastapi.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile

from encoder.preprocessing import BadImage, decode_image
from search_api.deps import ApiKeyDep, SettingsDep, StateDep, body_doc, read_fields, validate
from search_api.schemas import (
    BatchSearchIn,
    EmbeddingOut,
    Hit,
    SearchIn,
    SearchOut,
    TextIn,
)

router = APIRouter()

IMAGE_FORM = {
    "type": "object",
    "required": ["image"],
    "properties": {"image": {"type": "string", "format": "binary"}},
}


def _check_query(text: str, settings) -> str:
    if len(text) > settings.max_query_chars:
        raise HTTPException(422, f"query longer than {settings.max_query_chars} characters")
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


def _decode(data: bytes, settings):
    try:
        return decode_image(data, settings.max_image_pixels)
    except BadImage as exc:
        raise HTTPException(400, f"not a usable image: {exc}") from None


def _hits(request: Request, scores, keys, offset: int, top_k: int, min_score, urls=True):
    hits = []
    for rank, (score, key) in enumerate(zip(scores, keys), 1):
        if rank <= offset:
            continue
        if min_score is not None and score < min_score:
            break
        hits.append(Hit(rank=rank, key=key, filename=key.rsplit("/", 1)[-1], score=float(score),
                        similarity=float(score),
                        url=str(request.url_for("get_image", key=key)) if urls else None))
        if len(hits) == top_k:
            break
    return hits


def _search_index(state, vectors: np.ndarray, k: int):
    index = state.index  # one reference for the whole request (hot reload swaps it)
    if index is None:
        raise HTTPException(503, "no index is loaded yet; run `python -m indexer rebuild`")
    scores, keys = index.search(vectors, k)
    return index, scores, keys


@router.post("/encode_text", response_model=EmbeddingOut, openapi_extra=body_doc(TextIn))
async def encode_text(request: Request, state: StateDep, settings: SettingsDep):
    fields, _ = await read_fields(request, settings.max_upload_bytes)
    body = validate(TextIn, fields)
    text = _check_query(body.text, settings)
    vec = await run_in_threadpool(state.encoder.encode_texts, [text])
    return EmbeddingOut(model_id=state.encoder.model_id, dim=state.encoder.dim,
                        embedding=vec[0].tolist(), text=text)


@router.post("/encode_image", response_model=EmbeddingOut, dependencies=[ApiKeyDep],
             openapi_extra={"requestBody": {"required": True, "content": {
                 "multipart/form-data": {"schema": IMAGE_FORM}}}})
async def encode_image(request: Request, state: StateDep, settings: SettingsDep):
    _, files = await read_fields(request, settings.max_upload_bytes)
    filename, data = await _read_image(files, settings)
    image = _decode(data, settings)
    vec = await run_in_threadpool(state.encoder.encode_images, [image])
    return EmbeddingOut(model_id=state.encoder.model_id, dim=state.encoder.dim,
                        embedding=vec[0].tolist(), filename=filename)


@router.post("/search_images_by_text", response_model=SearchOut, openapi_extra=body_doc(SearchIn))
async def search_images_by_text(request: Request, state: StateDep, settings: SettingsDep):
    fields, _ = await read_fields(request, settings.max_upload_bytes)
    body = validate(SearchIn, fields)
    text = _check_query(body.text, settings)
    top_k = _check_top_k(body.top_k, settings)
    vec = (await run_in_threadpool(state.encoder.encode_texts, [text]))[0]

    if body.image_embeddings is not None:
        # the original clients' mode: rank exactly the embeddings they sent
        try:
            mat = np.asarray([e.embedding for e in body.image_embeddings], dtype=np.float32)
        except ValueError:
            raise HTTPException(422, "image_embeddings must all have the same length") from None
        if mat.size and mat.shape[1] != state.encoder.dim:
            raise HTTPException(422, f"image_embeddings must have dimension {state.encoder.dim}")
        norms = np.linalg.norm(mat, axis=1, keepdims=True)
        scores = (mat / np.maximum(norms, 1e-12)) @ vec if mat.size else np.zeros(0)
        order = np.argsort(-scores, kind="stable")
        names = [body.image_embeddings[i].filename for i in order]
        hits = _hits(request, scores[order], names, body.offset, top_k, body.min_score, urls=False)
        return SearchOut(query=text, model_id=state.encoder.model_id, index_version=None,
                         total=len(names), results=hits)

    index, scores, keys = await run_in_threadpool(
        _search_index, state, vec[None, :], body.offset + top_k)
    hits = _hits(request, scores[0], keys[0], body.offset, top_k, body.min_score)
    return SearchOut(query=text, model_id=state.encoder.model_id, index_version=index.version,
                     total=index.count, results=hits)


@router.post("/search_images_by_image", response_model=SearchOut, dependencies=[ApiKeyDep],
             openapi_extra={"requestBody": {"required": True, "content": {"multipart/form-data": {
                 "schema": {**IMAGE_FORM, "properties": {
                     **IMAGE_FORM["properties"],
                     "top_k": {"type": "integer", "minimum": 1},
                     "offset": {"type": "integer", "minimum": 0}}}}}}})
async def search_images_by_image(request: Request, state: StateDep, settings: SettingsDep):
    fields, files = await read_fields(request, settings.max_upload_bytes)
    filename, data = await _read_image(files, settings)
    body = validate(SearchIn, {"text": filename or "image", **fields})
    top_k = _check_top_k(body.top_k, settings)
    image = _decode(data, settings)
    vec = await run_in_threadpool(state.encoder.encode_images, [image])
    index, scores, keys = await run_in_threadpool(_search_index, state, vec, body.offset + top_k)
    hits = _hits(request, scores[0], keys[0], body.offset, top_k, body.min_score)
    return SearchOut(query=filename, model_id=state.encoder.model_id, index_version=index.version,
                     total=index.count, results=hits)


@router.post("/search_images_by_texts", response_model=list[SearchOut],
             openapi_extra=body_doc(BatchSearchIn))
async def search_images_by_texts(request: Request, state: StateDep, settings: SettingsDep):
    """Several text queries in one call (one batched forward pass, one FAISS search)."""
    fields, _ = await read_fields(request, settings.max_upload_bytes)
    body = validate(BatchSearchIn, fields)
    if len(body.queries) > settings.max_batch_queries:
        raise HTTPException(422, f"at most {settings.max_batch_queries} queries per call")
    texts = [_check_query(validate(TextIn, {"text": q}).text, settings) for q in body.queries]
    top_k = _check_top_k(body.top_k, settings)
    vecs = await run_in_threadpool(state.encoder.encode_texts, texts)
    index, scores, keys = await run_in_threadpool(_search_index, state, vecs, top_k)
    return [SearchOut(query=t, model_id=state.encoder.model_id, index_version=index.version,
                      total=index.count,
                      results=_hits(request, s, k, 0, top_k, body.min_score))
            for t, s, k in zip(texts, scores, keys)]
