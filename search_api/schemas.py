"""Request/response models. Field aliases keep the original form field names working.

The request models here carry no configured limits; `bodies(limits, dim)` derives the ones an
app serves from the request limits (core.settings.RequestLimits: MAX_TOP_K, MAX_OFFSET,
MAX_QUERY_CHARS, MAX_BATCH_QUERIES, the fixed sizes of given embeddings) and the model (its
dimension; whether it has a match scale, without which `min_match` can only be null) as field
constraints, so validation and the OpenAPI schema both come from them. The
other limits (body bytes, image pixels, request heads) are enforced where the bytes arrive; the
README's "Request limits" table lists each and where.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, \
    StringConstraints, ValidationInfo, field_validator
from pydantic_core import PydanticCustomError

from core.settings import RequestLimits


def _unicode(v: str) -> str:
    """Lone surrogates (`"\\ud800"` is valid JSON) are not text: the tokenizer and the UTF-8
    response encoder would fail on them."""
    try:
        v.encode("utf-8")
    except UnicodeEncodeError:
        raise PydanticCustomError("string_unicode",
                                  "must be valid Unicode text (no lone surrogates)") from None
    return v


def _not_blank(v: str) -> str:
    _unicode(v)
    if not v.strip():
        raise ValueError("must not be empty or whitespace")
    return v.strip()


def _json_number(value, info: ValidationInfo):
    """From a JSON body numbers must be JSON numbers (`"5"` or `true` is refused, as the schema
    says; `3.0` is an integer there); form fields are always text and are converted."""
    if isinstance(value, (bool, str)) and info.context and info.context.get("json"):
        raise PydanticCustomError("number_type",
                                  "Input should be a number (not a string or a boolean)")
    return value


Int = Annotated[int, BeforeValidator(_json_number)]
# the bounds inside the Annotated: on the Optional's Field they would be left out of the schema
Score = Annotated[float, Field(ge=-1.0, le=1.0), BeforeValidator(_json_number)]
Match = Annotated[float, Field(ge=0.0, le=100.0), BeforeValidator(_json_number)]
MIN_MATCH_DOC = ("drop results whose `match` is below this (0..100); refused (422) when the "
                 "model has no match scale")
NO_MATCH_SCALE_DOC = ("null only: the served model has no match scale (use min_score; "
                      "python -m training.calibrate gives a model one)")
MATCH_DOC = ("how good a match this is, 0..100: the share (%) of true caption->image pairs of "
             "the model's dev split that score at or below this hit (50: a typical true match). "
             "Falls along the ranking as `score` does. null when the model has no match scale "
             "(its card was not calibrated: python -m training.calibrate)")


class TextIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    text: str = Field(validation_alias=AliasChoices("text", "query"),
                      description="text to embed (`query` accepted too)",
                      json_schema_extra={"minLength": 1, "pattern": r"\S"})

    @field_validator("text")
    @classmethod
    def not_blank(cls, v: str) -> str:
        return _not_blank(v)


class PageIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    top_k: Int = Field(5, ge=1, description="number of results (1..MAX_TOP_K)")
    offset: Int = Field(0, ge=0, description="skip this many results (pagination)")
    min_score: Score | None = Field(None,
                                    description="drop results that score below this")
    min_match: Match | None = Field(None, description=MIN_MATCH_DOC)


class ImageEmbeddingIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # always parsed from JSON
    filename: str = Field(max_length=RequestLimits.MAX_FILENAME_CHARS)
    embedding: list[float] = Field(min_length=1, max_length=RequestLimits.MAX_EMBEDDING_NUMBERS)

    @field_validator("filename")
    @classmethod
    def unicode_filename(cls, v: str) -> str:
        return _unicode(v)  # echoed in the results


class SearchIn(PageIn, TextIn):
    image_embeddings: list[ImageEmbeddingIn] | None = Field(
        None, max_length=RequestLimits.MAX_GIVEN_EMBEDDINGS,
        description="rank exactly these embeddings (as /encode_image returned them, each with "
                    "a filename) instead of the index; form clients send it as a JSON string")


class BatchSearchIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    queries: list[str] = Field(min_length=1, description="1..MAX_BATCH_QUERIES query texts")
    top_k: Int = Field(5, ge=1)
    min_score: Score | None = None
    min_match: Match | None = Field(None, description=MIN_MATCH_DOC)

    @field_validator("queries")
    @classmethod
    def not_blank(cls, v: list[str]) -> list[str]:
        return [_not_blank(q) for q in v]


class Hit(BaseModel):
    rank: int
    key: str
    filename: str
    score: float
    # cosine similarity of query and image (the original clients read this name); `score` is
    # what results are ranked by: the cosine minus the image's hubness term (README)
    similarity: float
    match: float | None = Field(None, ge=0.0, le=100.0, description=MATCH_DOC,
                                examples=[87.5])
    url: str | None = None

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "rank": 1, "key": "flickr8k/images/1234_abcd.jpg", "filename": "1234_abcd.jpg",
        "score": -0.102, "similarity": 0.412, "match": 87.5,
        "url": "/images/flickr8k/images/1234_abcd.jpg"}]})


class SearchOut(BaseModel):
    query: str
    model_id: str
    index_version: str | None
    total: int  # results available before offset/top_k were applied
    results: list[Hit]


class EmbeddingOut(BaseModel):
    model_id: str
    dim: int
    embedding: list[float]
    filename: str | None = None
    text: str | None = None


class HealthOut(BaseModel):
    status: str  # ok | degraded
    model_id: str
    index_version: str | None
    vector_count: int
    store: str
    last_reload_error: str | None = None
    index_loaded_at: float | None = None
    api_key_required: bool = False
    # faiss | milvus; on Milvus the alias searched and the collection it points at
    index_backend: str = "faiss"
    index_alias: str | None = None
    index_collection: str | None = None


class ReloadOut(BaseModel):
    changed: bool
    version: str | None
    previous: str | None = None
    vector_count: int | None = None
    error: str | None = None


@dataclass(frozen=True)
class Bodies:
    """The request models one app validates with (limits from its settings)."""
    text: type[TextIn]
    search: type[SearchIn]
    batch: type[BatchSearchIn]
    page_fields: dict  # Form(...) constraints of the upload route's paging fields
    min_match: object  # the type of min_match: float | None, or None for a model without a scale


def bodies(limits: RequestLimits, dim: int | None = None,
           match_scale: bool | None = None) -> Bodies:
    """Request models with the configured limits as constraints (validation and schema).
    `match_scale` False (the served model has none): min_match may only be null, as the schema
    says; None (not known yet): a number is accepted and refused at search time."""
    chars, top_k, offset = limits.max_query_chars, limits.max_top_k, limits.max_offset
    text_field = Field(validation_alias=AliasChoices("text", "query"), min_length=1,
                       max_length=chars, pattern=r"\S",
                       description=f"text to embed, at most {chars} characters "
                                   "(`query` accepted too)")
    top_k_field = Field(5, ge=1, le=top_k, description=f"number of results (1..{top_k})")
    offset_field = Field(0, ge=0, le=offset, description="skip this many results (pagination)")

    if match_scale is False:
        MinMatch, min_match_field = type(None), Field(None, description=NO_MATCH_SCALE_DOC)
    else:
        MinMatch, min_match_field = Match | None, Field(None, description=MIN_MATCH_DOC)

    class TextBody(TextIn):
        text: str = text_field

    emb_field = Field(min_length=dim or 1, max_length=dim or limits.MAX_EMBEDDING_NUMBERS,
                      description=f"the model's dimension: {dim} numbers" if dim else None)

    class ImageEmbeddingBody(ImageEmbeddingIn):
        embedding: list[float] = emb_field

    class SearchBody(SearchIn):
        text: str = text_field
        top_k: Int = top_k_field
        offset: Int = offset_field
        min_match: MinMatch = min_match_field
        image_embeddings: list[ImageEmbeddingBody] | None = Field(
            None, max_length=limits.MAX_GIVEN_EMBEDDINGS,
            description="rank exactly these embeddings (as /encode_image returned them, each "
                        "with a filename) instead of the index; form clients send it as a "
                        "JSON string")

    Query = Annotated[str, StringConstraints(min_length=1, max_length=chars, pattern=r"\S")]

    class BatchSearchBody(BatchSearchIn):
        queries: list[Query] = Field(min_length=1, max_length=limits.max_batch_queries,
                                     description=f"1..{limits.max_batch_queries} query texts")
        top_k: Int = top_k_field
        min_match: MinMatch = min_match_field

    for model, name in ((TextBody, "TextIn"), (SearchBody, "SearchIn"),
                        (BatchSearchBody, "BatchSearchIn"), (ImageEmbeddingBody, "ImageEmbeddingIn")):
        model.__name__ = model.__qualname__ = name  # schema names as before
    return Bodies(TextBody, SearchBody, BatchSearchBody, {
        "top_k": dict(ge=1, le=top_k, description=f"number of results (1..{top_k})"),
        "offset": dict(ge=0, le=offset, description="skip this many results (pagination)"),
        "min_score": dict(ge=-1.0, le=1.0, description="drop results that score below this"),
        "min_match": dict(description=NO_MATCH_SCALE_DOC) if match_scale is False else
        dict(ge=0.0, le=100.0, description=MIN_MATCH_DOC)},
        float | None if match_scale is not False else None)
