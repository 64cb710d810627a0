"""Encoding and search routes. The text routes take JSON or the original clients' form fields
(`deps.json_or_form`); the upload routes take multipart forms with a file field `image`.
The text search also takes queries of several terms (typed with `+`/`-`, or `terms`), and
`/search_images_by_key` searches from indexed photos (search_api.query_terms); every answer's
`terms` says how the query was read."""
# no `from __future__ import annotations`: FastAPI reads the per-app body types defined in
# build_router from the endpoints' signatures
from dataclasses import replace
from datetime import datetime, timezone
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, File, Form, Request, UploadFile
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from core.settings import Settings
from indexer.photo_filter import PhotoFilter
from search_api.deps import ApiKeyDep, BodyRoute, ServiceDep, UploadRoute
from search_api.errors import responses
from search_api.images import FORMATS_DOC, ImageTooLarge
from search_api.json_response import json_response
from search_api.schemas import DEDUPE_DOC, FILTERS_DOC, FILTERS_FORM_EXAMPLE, Bodies, \
    EmbeddingOut, SearchOut
from search_api.query_terms import Term, TermQuery, check, from_structured, parse_typed, plain
from search_api.search_service import Results
from search_api.text_queries import TextQuery, read_term_texts, read_text_queries, run_parser

TEXT_ERRORS = responses(400, 413, 415, 422, 503)
UPLOAD_ERRORS = responses(400, 401, 413, 415, 422, 503, 507)
FORM_NOTE = ("\n\nThe same fields are accepted as a form (urlencoded or multipart), as the "
             "original clients send them.")



def _image_base(settings: Settings, request: Request) -> str:
    """Where result URLs start: PUBLIC_BASE_URL when set, else a path relative to the host (the
    app's root path + /images/); never the request's Host header."""
    if settings.public_base_url:
        return settings.public_base_url.rstrip("/") + "/images/"
    return request.scope.get("root_path", "").rstrip("/") + "/images/"


def _out(request: Request, query: str, model_id: str, results: Results, urls: bool = True,
         asked: TextQuery | None = None, filters: PhotoFilter | None = None,
         terms: TermQuery | None = None) -> dict:
    """SearchOut of one query's results; hit URLs point at the /images/{key} route
    (system.get_image). asked: the text query as read (encoded text, filters, hints); filters:
    those of a search by image; terms: the query as read term by term (a plain text: its one
    text)."""
    if terms is None and asked is not None:
        terms = plain(asked.text, asked.encoded_text)
    base = _image_base(request.app.state.settings, request) if urls else None
    if asked is not None:
        filters = asked.filters
    return {"query": query, "model_id": model_id, "index_version": results.version,
            "total": results.total,
            "results": [_hit(h, base) for h in results.hits],
            "encoded_text": asked.encoded_text if asked is not None else None,
            "filters": (filters or PhotoFilter()).model_dump(mode="json", exclude_none=True),
            "hints": asked.hints if asked is not None else [],
            "terms": terms.echo() if terms is not None else None,
            **({"dedupe": results.dedupe} if results.dedupe is not None else {})}


def _hit(h, base: str | None) -> dict:
    out = {"rank": h.rank, "key": h.key, "filename": h.key.rsplit("/", 1)[-1], "score": h.score,
           "similarity": h.similarity, "match": h.match,
           "url": base + quote(h.key, safe="/") if base is not None else None, "info": h.info}
    if h.duplicates is not None:  # a deduplicated search's
        out["duplicates"] = h.duplicates
        out["duplicate_keys"] = list(h.duplicate_keys or ())
    return out


def _term_query(body) -> TermQuery | None:
    """The text search's body as a query of several terms (`terms`, or `text` when it is
    typed with operators), None for a plain text; TermError (422) naming a bad term."""
    if body.terms is not None:
        return from_structured(body.terms.model_dump(), ("terms",))
    if body.parse_terms:
        return parse_typed(body.text, ("text",))
    return None


async def _read_terms(request: Request, query: TermQuery, filters: PhotoFilter | None,
                      parse_hints: bool) -> tuple[TermQuery, TextQuery]:
    """read_term_texts with the service's clock and zone (text_queries.run_parser)."""
    if not parse_hints:
        return read_term_texts(query, filters, False, None, None)
    return await run_parser(read_term_texts, query.chars(), query, filters, True,
                            datetime.now(timezone.utc),
                            request.app.state.settings.query_time_zone)


async def _read_queries(request: Request, texts: list[str], filters: PhotoFilter | None,
                        parse_hints: bool) -> list[TextQuery]:
    """The texts as the service searches them: hints read with the service's clock and zone
    (text_queries.run_parser)."""
    settings = request.app.state.settings
    if not parse_hints:
        return read_text_queries(texts, filters, False, None, None)
    return await run_parser(read_text_queries, sum(map(len, texts)), texts, filters, True,
                            datetime.now(timezone.utc), settings.query_time_zone)


def _form_filters(model: type[PhotoFilter], raw: str | None) -> PhotoFilter | None:
    """The upload form's `filters` field: a JSON object of PhotoFilter's fields (422 naming the
    field that is wrong)."""
    if raw is None or not raw.strip():
        return None
    try:
        return model.model_validate_json(raw, context={"json": True})
    except ValidationError as exc:
        raise RequestValidationError([
            {**e, "loc": ("body", "filters", *e.get("loc", ()))}
            for e in exc.errors(include_url=False, include_context=False)]) from None


def build_router(settings: Settings, bodies: Bodies) -> APIRouter:
    """The routes of one app: their bodies carry that app's limits (schemas.bodies)."""
    router = APIRouter(route_class=UploadRoute)  # uploads parsed within the form limits
    text = APIRouter(route_class=BodyRoute)  # JSON-or-form bodies, no dependencies
    TextBody, SearchBody, BatchBody = bodies.text, bodies.search, bodies.batch
    page = bodies.page_fields

    max_upload = settings.limits.max_upload_bytes

    async def read_image(image: UploadFile) -> tuple[str, bytes]:
        data = await image.read(max_upload + 1)
        if len(data) > max_upload:
            raise ImageTooLarge(f"image larger than {max_upload} bytes")
        return image.filename or "upload", data

    ImageFile = Annotated[UploadFile, File(description=FORMATS_DOC)]

    @text.post("/encode_text", response_model=EmbeddingOut,
                 responses=responses(400, 413, 415, 422), description="Embed a text." + FORM_NOTE)
    async def encode_text(request: Request, body: TextBody):
        encoders = request.app.state.service.encoders
        vec = await encoders.encode_texts([body.text])
        return json_response({"model_id": encoders.model_id, "dim": encoders.dim,
                      "embedding": vec[0].tolist(), "filename": None, "text": body.text})

    @router.post("/encode_image", response_model=EmbeddingOut, dependencies=[ApiKeyDep],
                 responses=UPLOAD_ERRORS)
    async def encode_image(image: ImageFile, service: ServiceDep):
        """Embed an image (multipart file field `image`)."""
        filename, data = await read_image(image)
        encoders = service.encoders
        vec = await encoders.encode_images([await service.images.decode_upload(data)])
        return json_response({"model_id": encoders.model_id, "dim": encoders.dim,
                      "embedding": vec[0].tolist(), "filename": filename, "text": None})

    @text.post("/search_images_by_text", response_model=SearchOut, responses=TEXT_ERRORS,
                 description="Top-k images for a text. `offset` pages on; `min_score` (or "
                             "`min_match`, 0..100) drops weak matches; `filters` keeps only "
                             "photos matching them (date range, place, folder, camera, ...), "
                             "inside the search; dates and places written in the text become "
                             "filters too (`hints` in the answer; `parse_hints: false` turns "
                             "that off); `image_embeddings` ranks the given embeddings instead "
                             "of the index. Each hit's `match` is the one number for people "
                             "(0..100, null for a model without a match scale), its `info` the "
                             "photo's date, place, camera and size; `dedupe` collapses near-"
                             "duplicate photos into the best-ranked of each (with a count)."
                             + FORM_NOTE)
    async def search_images_by_text(request: Request, body: SearchBody):
        service = request.app.state.service
        terms = _term_query(body)
        given = body.image_embeddings
        if given is not None:
            # embeddings a client sent carry no metadata: like a version stored without it,
            # they match no non-empty filter (hints are not read: nothing to apply them to)
            filters = body.filters if body.filters is not None else PhotoFilter()
            if terms is None:
                asked = TextQuery(body.text, body.text, filters)
                vec = (await service.encoders.encode_texts([body.text]))[0]
            else:
                asked = TextQuery(terms.typed(), None, filters)
                vec = await service.term_embedding(terms)
            # up to MAX_GIVEN_EMBEDDINGS vectors (and their collapse): off the event loop
            results = await run_in_threadpool(
                service.rank_given, vec, [e.filename for e in given],
                [e.embedding for e in given], body.top_k, body.offset, body.min_score,
                body.min_match, body.dedupe)
            if not filters.is_empty():
                results = Results(None, 0, [], results.dedupe)
            return json_response(_out(request, asked.text, service.model_id, results, urls=False,
                              asked=asked, terms=terms))
        service.ready()  # before encoding: 503 at once
        if terms is not None:
            terms, asked = await _read_terms(request, terms, body.filters, body.parse_hints)
            results = await service.search_terms(terms, body.top_k, body.offset,
                                                 body.min_score, body.min_match, asked.where,
                                                 body.include_terms, body.dedupe)
            return json_response(_out(request, asked.text, service.model_id, results,
                              asked=replace(asked, encoded_text=None), terms=terms))
        [asked] = await _read_queries(request, [body.text], body.filters, body.parse_hints)
        vec = await service.encoders.encode_texts([asked.encoded_text])
        [results] = await service.search(vec, body.top_k, body.offset, body.min_score,
                                         body.min_match, asked.where, dedupe=body.dedupe)
        return json_response(_out(request, body.text, service.model_id, results, asked=asked))

    @router.post("/search_images_by_image", response_model=SearchOut, dependencies=[ApiKeyDep],
                 responses=UPLOAD_ERRORS)
    async def search_images_by_image(
            image: ImageFile, service: ServiceDep, request: Request,
            top_k: Annotated[int, Form(**page["top_k"])] = 5,
            offset: Annotated[int, Form(**page["offset"])] = 0,
            min_score: Annotated[float | None, Form(**page["min_score"])] = None,
            min_match: Annotated[bodies.min_match, Form(**page["min_match"])] = None,
            filters: Annotated[str | None, Form(
                description=FILTERS_DOC + " (here: a form field holding a JSON object)",
                max_length=settings.limits.max_json_bytes,
                examples=[FILTERS_FORM_EXAMPLE])] = None,
            dedupe: Annotated[bool, Form(description=DEDUPE_DOC)] = False):
        """Images that look like the uploaded one (multipart `image`, optional `top_k`,
        `offset`, `min_score`, `min_match`, `filters`, `dedupe`)."""
        where = _form_filters(bodies.filters, filters)  # a bad filter: 422 before decoding
        filename, data = await read_image(image)
        img = await service.images.decode_upload(data)
        service.ready()
        vec = await service.encoders.encode_images([img])
        [results] = await service.search(vec, top_k, offset, min_score, min_match, where,
                                         dedupe=dedupe)
        return json_response(_out(request, filename, service.model_id, results, filters=where))

    @text.post("/search_images_by_texts", response_model=list[SearchOut], responses=TEXT_ERRORS,
                 description="Several text queries in one call (one batched forward pass, one "
                             "index search per distinct filter). `filters` apply to every "
                             "query; hints are read from each query. As a form: repeated "
                             "`queries` fields (or one holding a JSON list)." + FORM_NOTE)
    async def search_images_by_texts(request: Request, body: BatchBody):
        service = request.app.state.service
        service.ready()
        terms = [parse_typed(q, ("queries", i)) if body.parse_terms else None
                 for i, q in enumerate(body.queries)]
        plain_rows = [i for i, t in enumerate(terms) if t is None]
        out: list = [None] * len(terms)
        if plain_rows:  # the plain texts: one forward pass, one search per distinct filter
            texts = [body.queries[i] for i in plain_rows]
            asked = await _read_queries(request, texts, body.filters, body.parse_hints)
            vecs = await service.encoders.encode_texts([a.encoded_text for a in asked])
            found = await service.search(vecs, body.top_k, 0, body.min_score, body.min_match,
                                         [a.where for a in asked], dedupe=body.dedupe)
            for i, query, a, results in zip(plain_rows, texts, asked, found):
                out[i] = _out(request, query, service.model_id, results, asked=a)
        for i, query in enumerate(terms):  # queries of several terms: one search each
            if query is not None:
                query, a = await _read_terms(request, query, body.filters, body.parse_hints)
                results = await service.search_terms(query, body.top_k, 0, body.min_score,
                                                     body.min_match, a.where,
                                                     body.include_terms, body.dedupe)
                out[i] = _out(request, a.text, service.model_id, results,
                              asked=replace(a, encoded_text=None), terms=query)
        return json_response(out)

    ByKeyBody = bodies.by_key

    @text.post("/search_images_by_key", response_model=SearchOut, responses=TEXT_ERRORS,
               description="More like these indexed photos (`keys`), less like those "
                           "(`negative_keys`): their stored vectors are the query, nothing is "
                           "uploaded. The photos in `keys` are left out of the results unless "
                           "`include_terms`. `filters` and the paging fields as on every "
                           "search; a key that is not indexed is a 422 naming it." + FORM_NOTE)
    async def search_images_by_key(request: Request, body: ByKeyBody):
        service = request.app.state.service
        service.ready()
        query = check(TermQuery(
            [Term(False, key=k, loc=("keys", i)) for i, k in enumerate(body.keys)] +
            [Term(True, key=k, loc=("negative_keys", i))
             for i, k in enumerate(body.negative_keys)]), ("keys",))
        results = await service.search_terms(query, body.top_k, body.offset, body.min_score,
                                             body.min_match, body.filters, body.include_terms,
                                             body.dedupe)
        return json_response(_out(request, query.typed(), service.model_id, results,
                          filters=body.filters, terms=query))

    router.include_router(text)
    return router
