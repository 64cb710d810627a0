"""Request/response models. Field aliases keep the original form field names working.

Limits that depend on settings (MAX_TOP_K, MAX_QUERY_CHARS, MAX_BATCH_QUERIES) are checked in the
routes and written into the OpenAPI schema when the app is built (see main.py).
"""
from __future__ import annotations

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, field_validator


def _not_blank(v: str) -> str:
    if not v.strip():
        raise ValueError("must not be empty or whitespace")
    return v.strip()


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
    top_k: int = Field(5, ge=1, description="number of results (1..MAX_TOP_K)")
    offset: int = Field(0, ge=0, le=10_000, description="skip this many results (pagination)")
    min_score: float | None = Field(None, ge=-1.0, le=1.0,
                                    description="drop results that score below this")


class ImageEmbeddingIn(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)  # always parsed from JSON
    filename: str = Field(max_length=1024)
    embedding: list[float] = Field(min_length=1, max_length=4096)


class SearchIn(PageIn, TextIn):
    image_embeddings: list[ImageEmbeddingIn] | None = Field(
        None, max_length=10_000,
        description="rank exactly these embeddings (as /encode_image returned them, each with "
                    "a filename) instead of the index; form clients send it as a JSON string")


class ImageSearchIn(PageIn):
    """The non-file fields of `POST /search_images_by_image`."""


class BatchSearchIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    queries: list[str] = Field(min_length=1, description="1..MAX_BATCH_QUERIES query texts")
    top_k: int = Field(5, ge=1)
    min_score: float | None = Field(None, ge=-1.0, le=1.0)


class Hit(BaseModel):
    rank: int
    key: str
    filename: str
    score: float
    # cosine similarity of query and image (the original clients read this name); `score` is
    # what results are ranked by: the cosine minus the image's hubness term (README)
    similarity: float
    url: str | None = None


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


class ReloadOut(BaseModel):
    changed: bool
    version: str | None
    previous: str | None = None
    vector_count: int | None = None
    error: str | None = None
