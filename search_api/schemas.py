"""Request/response models. Field aliases keep the original form field names working.

The request models here carry no configured limits; `bodies(limits, dim)` derives the ones an
app serves from the request limits (core.settings.RequestLimits: MAX_TOP_K, MAX_OFFSET,
MAX_QUERY_CHARS, MAX_BATCH_QUERIES, MAX_FILTER_FOLDERS, MAX_QUERY_TERMS, the fixed sizes of given
embeddings)
and the model (its dimension; whether it has a match scale, without which `min_match` can only
be null) as field constraints, so validation and the OpenAPI schema both come from them. The
other limits (body bytes, image pixels, request heads) are enforced where the bytes arrive; the
README's "Request limits" table lists each and where.

Every search takes `filters` (indexer.photo_filter.PhotoFilter: its own validation names the
field of an unknown name, an impossible range, a malformed date) and the text searches
`parse_hints`; answers carry the filters applied, the hints read from the text, the text the
model encoded and each hit's metadata in brief (`HitInfo`). The text search takes `text` or
`terms` (a query of several terms, `TermsIn`); `SearchByKeyIn` searches from indexed photos;
answers echo the terms as read (`TermsOut`).
"""
from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import AliasChoices, BaseModel, BeforeValidator, ConfigDict, Field, \
    StringConstraints, ValidationInfo, field_validator, model_validator
from pydantic_core import PydanticCustomError

from core.settings import RequestLimits
from indexer.photo_filter import Folder, PhotoFilter
from search_api.query_terms import MAX_WEIGHT


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


FILTERS_FORM_EXAMPLE = '{"folders": ["2023/beach"], "taken_after": "2023-06-01", "country": "PT"}'
FILTERS_DOC = ("only photos matching all of these (applied inside the nearest-neighbour "
               "search); see PhotoFilter. Form clients send it as a JSON string")
PARSE_HINTS_DOC = ("read dates and places written in the query (\"beach in July 2023\", "
                   "\"snow in Norway\") as filters: the answer's `hints` says which, "
                   "`encoded_text` what the model encoded; false: the whole text is encoded")


def _json_bool(value, info: ValidationInfo):
    """From JSON a boolean must be true or false (not "yes", 1 or "true")."""
    if not isinstance(value, bool) and value is not None and info.context \
            and info.context.get("json"):
        raise PydanticCustomError("bool_type", "Input should be true or false")
    return value


# an example of each filter field in the OpenAPI schema (together they still make one valid
# filter: schema-driven clients and tests combine them)
FILTER_FIELD_EXAMPLES = {
    "folders": [["2023/beach", "2024/Snow"]],
    "taken_after": ["2023-06-01T00:00:00Z", "2023-06-01T00:00:00+01:00"],
    "taken_before": ["2023-09-01T00:00:00Z", "2023-09-01T00:00:00+01:00"],
    "camera": ["iPhone 12", "Canon"],
    "country": ["Portugal", "PT"],
    "region": ["Lisbon"],
    "city": ["Lisbon"],
    "near": [{"lat": 38.72, "lon": -9.14, "km": 25}],
    "has_position": [True],
    "min_width": [1920],
    "min_height": [1080],
    "orientation": ["landscape"],
}


# what PhotoFilter accepts of a name or folder, said in the schema: no control characters
# (Unicode category Cc), and a name is more than blanks
NO_CONTROL = r"^[^\u0000-\u001f\u007f-\u009f]*$"
A_NAME = r"^[^\u0000-\u001f\u007f-\u009f]*[^\s\u0000-\u001f\u007f-\u009f][^\u0000-\u001f\u007f-\u009f]*$"


def _string_branch(prop: dict) -> dict:
    return next((b for b in prop.get("anyOf", [prop]) if b.get("type") in ("string", "array")),
                prop)


def _filter_schema(schema: dict) -> None:
    """PhotoFilter's own examples, one per field, and the text its names may hold."""
    schema["examples"] = PhotoFilter.model_config["json_schema_extra"]["examples"]
    props = schema.get("properties", {})
    for name, examples in FILTER_FIELD_EXAMPLES.items():
        if name in props:
            props[name].setdefault("examples", examples)
    for name in ("camera", "country", "region", "city"):
        if name in props:
            _string_branch(props[name])["pattern"] = A_NAME
    if "folders" in props:
        _string_branch(props["folders"]).get("items", {})["pattern"] = NO_CONTROL


class PhotoFilterIn(PhotoFilter):
    """PhotoFilter as clients send it, typed as its schema says: dates are ISO 8601 text (not
    unix numbers), and from JSON numbers are JSON numbers and booleans JSON booleans."""
    model_config = ConfigDict(json_schema_extra=_filter_schema)

    @field_validator("taken_after", "taken_before", mode="before")
    @classmethod
    def _iso_text(cls, value):
        if value is not None and not isinstance(value, (str, datetime)):
            raise PydanticCustomError("datetime_type",
                                      "Input should be an ISO 8601 date or date-time text")
        return value

    @field_validator("min_width", "min_height", mode="before")
    @classmethod
    def _numbers(cls, value, info: ValidationInfo):
        return _json_number(value, info)

    @field_validator("has_position", mode="before")
    @classmethod
    def _boolean(cls, value, info: ValidationInfo):
        return _json_bool(value, info)

    @field_validator("near", mode="before")
    @classmethod
    def _near_numbers(cls, value, info: ValidationInfo):
        if isinstance(value, dict):
            for part in ("lat", "lon", "km"):
                if part in value:
                    _json_number(value[part], info)
        return value


DEDUPE_DOC = ("collapse near-duplicate photos: the best-ranked of each group stays, with "
              "`duplicates` (how many were collapsed into it) and `duplicate_keys`; offset and "
              "top_k count the collapsed results. Groups come from the duplicates report of the "
              "served version, else from the ranked photos' own vectors (the answer's `dedupe` "
              "says which)")
Dedupe = Annotated[bool, BeforeValidator(_json_bool)]


class DedupeIn(BaseModel):
    model_config = ConfigDict(extra="ignore")
    dedupe: Dedupe = Field(False, description=DEDUPE_DOC)


class FiltersIn(BaseModel):
    """The fields every search takes besides the query."""
    model_config = ConfigDict(extra="ignore")
    filters: PhotoFilterIn | None = Field(None, description=FILTERS_DOC)


class TextFiltersIn(FiltersIn):
    parse_hints: Annotated[bool, BeforeValidator(_json_bool)] = Field(
        True, description=PARSE_HINTS_DOC)


# --- queries of several terms (search_api.query_terms) -----------------------------------------
TERMS_DOC = ("a query of several terms instead of `text`: texts and stored photos (by key), "
             "each with a weight (default 1); the negative ones steer away. Combined in the "
             "model's embedding space and searched once. Typed into `text` the same reads "
             "`dog + 2:beach - people + key:holidays/img_01.jpg`")
INCLUDE_TERMS_DOC = "keep the photos used as positive terms in their own results"
PARSE_TERMS_DOC = ("read `+`, `-`, `weight:` and `key:` in `text` as a query of several terms "
                   "(false: the whole text is one query, as typed)")
Weight = Annotated[float, Field(gt=0.0, le=MAX_WEIGHT, allow_inf_nan=False),
                   BeforeValidator(_json_number)]
ONE_OF_TEXT_KEY = {"oneOf": [
    {"required": ["text"], "properties": {"text": {"type": "string"}}},
    {"required": ["key"], "properties": {"key": {"type": "string"}}}],
                   "examples": [{"text": "sunset", "weight": 2},
                                {"key": "holidays/img_01.jpg"}]}


class TermIn(BaseModel):
    """One term: a text or an indexed photo's key."""
    model_config = ConfigDict(extra="ignore", json_schema_extra=ONE_OF_TEXT_KEY)
    text: str | None = Field(None, min_length=1, pattern=r"\S")
    key: str | None = Field(None, min_length=1, pattern=r"\S")
    weight: Weight = 1.0

    @field_validator("text", "key")
    @classmethod
    def _text(cls, v):
        return v if v is None else _unicode(v)

    @model_validator(mode="after")
    def _one(self):
        if (self.text is None) == (self.key is None):
            raise ValueError("a term is a `text` or a `key` (one of them)")
        return self


class TermsIn(BaseModel):
    model_config = ConfigDict(extra="ignore", json_schema_extra={"examples": [
        {"positive": [{"text": "dog"}, {"text": "beach", "weight": 2}],
         "negative": [{"text": "people"}]}]})
    positive: list[TermIn] = Field(min_length=1, max_length=RequestLimits.MAX_QUERY_TERMS)
    negative: list[TermIn] = Field(default_factory=list,
                                   max_length=RequestLimits.MAX_QUERY_TERMS)


class TermFieldsIn(BaseModel):
    """What the text search takes besides `text` for a query of several terms."""
    model_config = ConfigDict(extra="ignore")
    terms: TermsIn | None = Field(None, description=TERMS_DOC)
    include_terms: Annotated[bool, BeforeValidator(_json_bool)] = Field(
        False, description=INCLUDE_TERMS_DOC)
    parse_terms: Annotated[bool, BeforeValidator(_json_bool)] = Field(
        True, description=PARSE_TERMS_DOC)


class SearchByKeyIn(PageIn, FiltersIn, DedupeIn):
    """More like these photos (and less like those): stored photos as the query, no upload."""
    model_config = ConfigDict(extra="ignore")
    keys: list[str] = Field(min_length=1, max_length=RequestLimits.MAX_QUERY_TERMS,
                            description="indexed photos' keys to search like")
    negative_keys: list[str] = Field(default_factory=list,
                                     max_length=RequestLimits.MAX_QUERY_TERMS,
                                     description="indexed photos' keys to steer away from")
    include_terms: Annotated[bool, BeforeValidator(_json_bool)] = Field(
        False, description=INCLUDE_TERMS_DOC)

    @field_validator("keys", "negative_keys")
    @classmethod
    def _keys(cls, v: list[str]) -> list[str]:
        for key in v:
            _unicode(key)
            if not key.strip():
                raise ValueError("a key must not be empty")
        return v


class TermOut(BaseModel):
    text: str | None = None
    key: str | None = None
    weight: float = 1.0
    encoded_text: str | None = Field(None, description="what the model encoded of the text "
                                                       "(when hints were read from it)")


class TermsOut(BaseModel):
    """How the query was read: it is a valid `terms` to send again."""
    positive: list[TermOut] = []
    negative: list[TermOut] = []


# exactly one of them, not null
TEXT_OR_TERMS = {"oneOf": [
    {"required": ["text"], "properties": {"text": {"type": "string"}}},
    {"required": ["terms"], "properties": {"terms": {"type": "object"}}}]}


class SearchIn(PageIn, TextIn, TextFiltersIn, TermFieldsIn, DedupeIn):
    model_config = ConfigDict(json_schema_extra=TEXT_OR_TERMS)
    text: str = Field(None, validation_alias=AliasChoices("text", "query"),
                      description="the query text (`query` accepted too); or `terms`",
                      json_schema_extra={"minLength": 1, "pattern": r"\S"})

    @field_validator("text")
    @classmethod
    def not_blank(cls, v: str | None) -> str | None:
        return v if v is None else _not_blank(v)

    @model_validator(mode="after")
    def _text_or_terms(self):
        if (self.text is None) == (self.terms is None):
            raise ValueError("give `text` or `terms` (one of them)")
        return self

    image_embeddings: list[ImageEmbeddingIn] | None = Field(
        None, max_length=RequestLimits.MAX_GIVEN_EMBEDDINGS,
        description="rank exactly these embeddings (as /encode_image returned them, each with "
                    "a filename) instead of the index; form clients send it as a JSON string")


class BatchSearchIn(TextFiltersIn, DedupeIn):
    """`filters` apply to every query; hints are read from each query on its own, and so are
    terms (`dog - grass`)."""
    model_config = ConfigDict(extra="ignore")
    include_terms: Annotated[bool, BeforeValidator(_json_bool)] = Field(
        False, description=INCLUDE_TERMS_DOC)
    parse_terms: Annotated[bool, BeforeValidator(_json_bool)] = Field(
        True, description=PARSE_TERMS_DOC)
    queries: list[str] = Field(min_length=1, description="1..MAX_BATCH_QUERIES query texts")
    top_k: Int = Field(5, ge=1)
    min_score: Score | None = None
    min_match: Match | None = Field(None, description=MIN_MATCH_DOC)

    @field_validator("queries")
    @classmethod
    def not_blank(cls, v: list[str]) -> list[str]:
        return [_not_blank(q) for q in v]


HIT_INFO_EXAMPLE = {"taken_at": "2023-07-14T09:30:00+00:00", "taken_at_source": "exif",
                    "place": "Lisbon, Portugal", "camera": "Apple iPhone 12",
                    "width": 4032, "height": 3024}


class HitInfo(BaseModel):
    taken_at: str | None = Field(None, description="when it was taken, ISO 8601 in UTC")
    taken_at_source: str | None = Field(
        None, description="exif (the camera's date and offset) | exif-no-offset (the camera's "
                          "date read as UTC) | modified (the file's date)")
    place: str | None = Field(None, description="city (or region), country")
    camera: str | None = None
    width: int | None = None
    height: int | None = None

    model_config = ConfigDict(json_schema_extra={"examples": [HIT_INFO_EXAMPLE]})


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
    info: HitInfo | None = Field(None, description="the photo's date, place, camera and size "
                                                   "(null: the index holds no metadata for it)")
    duplicates: int | None = Field(None, ge=0, description="with `dedupe`: how many of the "
                                   "photos ranked were collapsed into this one")
    duplicate_keys: list[str] | None = Field(
        None, max_length=RequestLimits.MAX_COLLAPSED_KEYS,
        description="with `dedupe`: the keys of the first ones collapsed into it, best first "
                    f"(at most {RequestLimits.MAX_COLLAPSED_KEYS})")

    model_config = ConfigDict(json_schema_extra={"examples": [{
        "rank": 1, "key": "photos/2023/beach/IMG_0042.HEIC", "filename": "IMG_0042.HEIC",
        "score": -0.102, "similarity": 0.412, "match": 87.5,
        "url": "/images/photos/2023/beach/IMG_0042.HEIC",
        "info": HIT_INFO_EXAMPLE}]})


class QueryHint(BaseModel):
    """A filter read from the query's own words."""
    field: str = Field(description="the filter field it sets (e.g. `taken`: taken_after and "
                                   "taken_before; `country`, `city`)")
    value: Any = Field(description="the value it set")
    text: str = Field(description="the words of the query it was read from")

    model_config = ConfigDict(json_schema_extra={"examples": [
        {"field": "country", "value": "Portugal", "text": "in Portugal"}]})


class SearchOut(BaseModel):
    query: str
    model_id: str
    index_version: str | None
    total: int = Field(description="results available before offset/top_k were applied (with "
                                   "filters: the photos they match)")
    results: list[Hit]
    encoded_text: str | None = Field(
        None, description="what the model encoded: the query less the words read as hints "
                          "(null for a search by image)")
    filters: PhotoFilter = Field(
        default_factory=PhotoFilter,
        description="the filters applied: the request's, with those read from the text")
    hints: list[QueryHint] = Field(default_factory=list,
                                   description="the filters read from the query text")
    terms: TermsOut | None = Field(None, description="how the query was read, term by term "
                                                     "(null for a search by upload)")
    dedupe: Literal["report", "report+page", "page", "none"] | None = Field(
        None, description="with `dedupe`, where the groups came from: report (the duplicates "
                          "report of the served version), report+page (that report and, for "
                          "photos it does not cover, the ranked photos' vectors), page (no "
                          "report: the ranked photos' vectors at the duplicates threshold), none "
                          "(nothing to collapse by)")


class PhotoInfoOut(BaseModel):
    """The metadata stored with a photo in the index (fields the index holds no value for are
    null or absent)."""
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "key": "photos/2023/beach/IMG_0042.HEIC", "taken_at": "2023-07-14T09:30:00+00:00",
        "taken_at_source": "exif", "camera_make": "Apple", "camera_model": "iPhone 12",
        "lat": 38.6916, "lon": -9.2160, "city": "Lisbon", "region": "Lisbon",
        "country": "Portugal", "country_code": "PT", "width": 4032, "height": 3024,
        "orientation": 6, "bytes": 1843200, "content_type": "image/heic",
        "folder": "photos/2023/beach"}]})
    key: str
    taken_at: str | None = Field(None, description="ISO 8601, UTC")
    taken_at_source: str | None = Field(None, description="exif | exif-no-offset | modified")


# [value, how many photos have it] (a pair: the schema says list, OpenAPI tuples are not
# understood everywhere)
FacetValue = Annotated[list[str | int], Field(min_length=2, max_length=2)]


class FacetsOut(BaseModel):
    """The most common values of each field, with how many photos hold them, most first."""
    model_config = ConfigDict(extra="allow", json_schema_extra={"examples": [{
        "folder": [["photos/2023/beach", 412], ["photos/2024/Snow", 97]],
        "country": [["Portugal", 380], ["Norway", 97]], "city": [["Lisbon", 201]],
        "camera": [["iPhone 12", 455]], "year": [[2023, 412], [2024, 97]]}]})
    folder: list[FacetValue] = []
    country: list[FacetValue] = []
    city: list[FacetValue] = []
    camera: list[FacetValue] = []
    year: list[FacetValue] = []


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
    # photos of the served version with a date, a GPS position, a place name
    with_date: int = 0
    with_position: int = 0
    with_place: int = 0


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
    filters: type[PhotoFilter]  # PhotoFilter within the request limits
    by_key: type[SearchByKeyIn] | None = None  # POST /search_images_by_key


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

    class FilterBody(PhotoFilterIn):
        folders: list[Folder] | None = Field(
            None, max_length=limits.MAX_FILTER_FOLDERS,
            description=f"folders (key prefixes up to a '/'), any of them, subfolders "
                        f"included; at most {limits.MAX_FILTER_FOLDERS}",
            examples=[["2023/beach", "2024/Snow"]])

    emb_field = Field(min_length=dim or 1, max_length=dim or limits.MAX_EMBEDDING_NUMBERS,
                      description=f"the model's dimension: {dim} numbers" if dim else None)

    class ImageEmbeddingBody(ImageEmbeddingIn):
        embedding: list[float] = emb_field

    filters_field = Field(None, description=FILTERS_DOC)

    term_text = Annotated[str | None, Field(None, min_length=1, max_length=chars,
                                            pattern=r"\S")]

    class TermBody(TermIn):
        text: term_text = None
        key: term_text = None

    class TermsBody(TermsIn):
        positive: list[TermBody] = Field(min_length=1, max_length=limits.MAX_QUERY_TERMS)
        negative: list[TermBody] = Field(default_factory=list,
                                         max_length=limits.MAX_QUERY_TERMS)

    class SearchBody(SearchIn):
        # a string when given (absent with `terms`): the schema keeps its limits in one place
        text: str = Field(None, validation_alias=AliasChoices("text", "query"),
                          min_length=1, max_length=chars, pattern=r"\S",
                          description=f"the query text, at most {chars} characters "
                                      "(`query` accepted too); or `terms`")
        terms: TermsBody | None = Field(None, description=TERMS_DOC)
        filters: FilterBody | None = filters_field
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
        filters: FilterBody | None = filters_field

    key_text = Annotated[str, StringConstraints(min_length=1, max_length=chars, pattern=r"\S")]

    class SearchByKeyBody(SearchByKeyIn):
        keys: list[key_text] = Field(min_length=1, max_length=limits.MAX_QUERY_TERMS,
                                     description="indexed photos' keys to search like "
                                                 f"(1..{limits.MAX_QUERY_TERMS})")
        negative_keys: list[key_text] = Field(default_factory=list,
                                              max_length=limits.MAX_QUERY_TERMS,
                                              description="indexed photos' keys to steer "
                                                          "away from")
        filters: FilterBody | None = filters_field
        top_k: Int = top_k_field
        offset: Int = offset_field
        min_match: MinMatch = min_match_field

    for model, name in ((TermBody, "TermIn"), (TermsBody, "TermsIn"),
                        (SearchByKeyBody, "SearchByKeyIn")):
        model.__name__ = model.__qualname__ = name
    for model, name in ((TextBody, "TextIn"), (SearchBody, "SearchIn"),
                        (BatchSearchBody, "BatchSearchIn"), (ImageEmbeddingBody, "ImageEmbeddingIn"),
                        (FilterBody, "PhotoFilterIn")):
        model.__name__ = model.__qualname__ = name  # schema names as before
    return Bodies(TextBody, SearchBody, BatchSearchBody, {
        "top_k": dict(ge=1, le=top_k, description=f"number of results (1..{top_k})"),
        "offset": dict(ge=0, le=offset, description="skip this many results (pagination)"),
        "min_score": dict(ge=-1.0, le=1.0, description="drop results that score below this"),
        "min_match": dict(description=NO_MATCH_SCALE_DOC) if match_scale is False else
        dict(ge=0.0, le=100.0, description=MIN_MATCH_DOC)},
        float | None if match_scale is not False else None, FilterBody, SearchByKeyBody)
