"""The one settings object of every process (pydantic-settings).

Each field is read from the environment variable of the same name in upper case (or from
`.env`): `model_path` <- MODEL_PATH; an empty value (docker-compose passes `VAR=` for unset ones)
counts as unset, except for IMAGES_PREFIX, where empty means the whole bucket. Command lines and DAGs take their defaults from here; the README's
configuration table lists exactly these fields.
"""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import ClassVar, Literal
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pydantic import BaseModel, Field, field_validator
from pydantic_settings import (BaseSettings, DotEnvSettingsSource, EnvSettingsSource,
                               PydanticBaseSettingsSource, SettingsConfigDict)

REPO_ROOT = Path(__file__).resolve().parent.parent
SHIPPED_MODEL = REPO_ROOT / "models" / "flickr8k-dual-encoder.pt"


class RequestLimits(BaseModel):
    """What the search API accepts from one request: every limit it enforces, in one group.

    The configurable ones are settings fields (Settings inherits them: MAX_TOP_K etc.); the fixed
    ones are class constants. Each refusal is a 4xx JSON error (MAX_CONNECTIONS: a 503), never a
    5xx. The README's "Request limits" table lists each, its default and where it is enforced
    (tests/search_api/test_limits.py keeps it true); enforcement points read `settings.limits`.
    """
    # a page of results: top_k <= MAX_TOP_K, offset <= MAX_OFFSET (a search goes this deep)
    max_top_k: int = Field(100, ge=1)
    max_offset: int = Field(10_000, ge=0)
    max_query_chars: int = Field(1000, ge=1)
    max_batch_queries: int = Field(32, ge=1)
    max_upload_bytes: int = Field(20 * 1024 * 1024, ge=1)
    max_image_pixels: int = Field(40_000_000, ge=1)
    # image decodes (uploads, thumbnails) running at once, and the memory (MiB) their estimated
    # peaks share; a larger image waits, then decodes alone
    max_concurrent_decodes: int = Field(2, ge=1)
    decode_memory_mb: int = Field(192, ge=16)
    # JSON (and urlencoded) bodies: far below MAX_UPLOAD_BYTES; 4 MiB still carries several
    # hundred `image_embeddings` of 256 numbers. Large ones are parsed off the event loop.
    max_json_bytes: int = Field(4 * 1024 * 1024, ge=1024)
    # request head limits, refused at once: request line + headers (431), URL (414), header count (431)
    max_head_bytes: int = Field(64 * 1024, ge=1024)
    max_url_bytes: int = Field(8 * 1024, ge=256)
    max_headers: int = Field(100, ge=8)
    # seconds a client may take to send a request head, or between two pieces of a body (408)
    client_timeout_s: float = Field(15.0, gt=0)
    # open connections served at once; requests beyond get a 503 (uvicorn limit_concurrency)
    max_connections: int = Field(1000, ge=1)

    # fixed: the original clients' `image_embeddings` mode, and form bodies
    MAX_GIVEN_EMBEDDINGS: ClassVar[int] = 10_000  # embeddings ranked per request
    MAX_EMBEDDING_NUMBERS: ClassVar[int] = 4096  # numbers per embedding (before the model's dim)
    MAX_FILENAME_CHARS: ClassVar[int] = 1024  # filename of a given embedding (echoed back)
    MAX_FORM_FIELDS: ClassVar[int] = 100
    MAX_FORM_FILES: ClassVar[int] = 4
    MAX_THUMBNAIL_SIDE: ClassVar[int] = 1024  # GET /images/{key}?size=N
    # a search's `filters.folders`: each folder is a prefix test over the whole index
    MAX_FILTER_FOLDERS: ClassVar[int] = 20
    MAX_FACET_VALUES: ClassVar[int] = 100  # GET /facets?limit=N, values per facet
    # GET /duplicates: groups per page, and photos listed per group (a group's size is given)
    MAX_DUPLICATE_GROUPS: ClassVar[int] = 100
    MAX_DUPLICATE_GROUP_PHOTOS: ClassVar[int] = 50
    # a deduplicated search result: keys listed of the photos collapsed into it (all counted)
    MAX_COLLAPSED_KEYS: ClassVar[int] = 10
    # terms of one query (texts and stored photos, positive and negative): each is encoded
    # or read from the index
    MAX_QUERY_TERMS: ClassVar[int] = 16
    # multipart framing allowed around an upload of MAX_UPLOAD_BYTES (the whole-body cap)
    UPLOAD_BODY_SLACK: ClassVar[int] = 64 * 1024

    @property
    def limits(self) -> "RequestLimits":
        """Just the limits (a copy: Settings carries them among its other fields)."""
        return RequestLimits.model_validate({f: getattr(self, f) for f in RequestLimits.model_fields})


class _EmptyIsAValue(PydanticBaseSettingsSource):
    """The fields where an empty value is a value, not "unset", read from `source` (an
    environment or .env source that keeps empty values)."""
    FIELDS = ("images_prefix",)  # IMAGES_PREFIX= : the whole bucket

    def __init__(self, settings_cls, source: EnvSettingsSource):
        super().__init__(settings_cls)
        self.source = source

    def get_field_value(self, field, field_name):  # unused: __call__ reads the source whole
        return None, field_name, False

    def __call__(self) -> dict:
        return {k: v for k, v in self.source().items() if k in self.FIELDS and v == ""}


class Settings(RequestLimits, BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", env_ignore_empty=True, extra="ignore",
                                      protected_namespaces=())

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, env_settings,
                                   dotenv_settings, file_secret_settings):
        env_empty = _EmptyIsAValue(settings_cls, EnvSettingsSource(
            settings_cls, env_ignore_empty=False))
        dotenv_empty = _EmptyIsAValue(settings_cls, DotEnvSettingsSource(
            settings_cls, env_file=dotenv_settings.env_file,
            env_file_encoding=dotenv_settings.env_file_encoding, env_ignore_empty=False))
        return (init_settings, env_empty, env_settings, dotenv_empty, dotenv_settings,
                file_secret_settings)

    # --- model -------------------------------------------------------------------------------
    model_path: str = str(SHIPPED_MODEL)
    # embedding size of newly trained models (`python -m training --embed-dim` default); a
    # checkpoint carries its own
    embedding_dim: int = Field(256, ge=8)
    device: str = "cpu"
    # tower runtimes on CPU: "onnx" (ONNX Runtime fp32: same embeddings as PyTorch, several
    # times faster), "onnx-int8" (faster again; dev Recall@K within 0.5 point, BENCHMARKS.md)
    # or "torch" (eager). A runtime that cannot start falls back to eager PyTorch.
    image_runtime: str = "onnx"
    text_runtime: str = "onnx"
    # exported ONNX graphs, one folder per model id (written once, then reused)
    onnx_cache_dir: str = str(REPO_ROOT / ".cache" / "onnx")
    # a local copy of distilbert-base-uncased (the text backbone option without shipped weights)
    distilbert_path: str | None = None

    # --- object store: "local" (a directory, the embedded default) or "s3" (MinIO / any S3) --
    store_backend: str = "local"
    local_store_dir: str = str(REPO_ROOT / "data" / "store")
    minio_endpoint: str = "localhost:9000"
    minio_access_key: str = "minioadmin"
    minio_secret_key: str = "minioadmin"
    minio_bucket: str = "flickr8k"
    minio_secure: bool = False
    # data layout inside the bucket: photos are every image under IMAGES_PREFIX, at any depth
    # (keys keep their relative paths); IMAGES_PREFIX= (empty) is the whole bucket
    images_prefix: str = "flickr8k/images/"
    text_prefix: str = "flickr8k/text/"

    # --- index -------------------------------------------------------------------------------
    # index versions live here (a shared volume in docker-compose)
    index_dir: str = str(REPO_ROOT / "data" / "index")
    # versions kept by `prune` (the CLI's and the DAGs'); the current one is always kept
    index_keep_versions: int = Field(5, ge=1)
    # FAISS: above this many MB of float32 vectors (dim*4 + 8 bytes a photo) a version is
    # written as IVF-PQ (~dim/4 + 8 bytes a photo) with an exact re-rank from fp16 vectors on
    # disk; 0: never compressed; unset: indexer.index_policy.INDEX_MEMORY_MB (2048)
    index_memory_mb: int | None = Field(None, ge=0)
    embed_batch_size: int = Field(32, ge=1)
    # the DAGs' fanned-out embedding: keys to embed per shard (one mapped `embed_shard` task
    # each, one model load each) and at most this many shards (Airflow maps at most
    # core.max_map_length = 1024 tasks; bigger collections get bigger shards)
    embed_shard_size: int = Field(2000, ge=1)
    embed_max_shards: int = Field(64, ge=1, le=1024)

    # --- vector index backend (indexer/vector_index.py; "faiss": files under INDEX_DIR, the
    # embedded default; "milvus": collections on a Milvus server, the scale-out one) ----------
    # any name of indexer.vector_index.BACKENDS, the one list of them (checked on opening)
    index_backend: str = "faiss"
    # a Milvus server (http://host:19530) or a milvus-lite file (./index.db, one process only)
    milvus_uri: str = "http://localhost:19530"
    # "user:password" or an API key (empty: a server without authentication)
    milvus_token: str | None = None
    # collections are <prefix>__<model>__<version>, searched through the alias <prefix>__<model>
    milvus_collection_prefix: str = "flickr_search"
    # HNSW (default: recall >= 0.95 at ef 64, BENCHMARKS.md), IVF_FLAT, IVF_SQ8 or FLAT (exact)
    milvus_index_type: Literal["HNSW", "IVF_FLAT", "IVF_SQ8", "FLAT"] = "HNSW"
    milvus_search_ef: int = Field(64, ge=1)
    milvus_nlist: int = Field(1024, ge=1)
    milvus_nprobe: int = Field(32, ge=1)
    # seconds per Milvus call before the API answers 503 (writers allow several times that)
    milvus_timeout_s: float = Field(5.0, gt=0)
    # seconds an API replica trusts its resolution of the alias (collection and count)
    milvus_refresh_s: float = Field(1.0, gt=0)

    # --- where Flickr8k comes from (ingest: CLI and DAG alike) ---------------------------------
    # a folder in the original layout, a Flickr8k_Dataset.zip path, or its URL (e.g. the public
    # copy, flickr8k.sources.PUBLIC_IMAGES_URL); a missing one fails at once, naming this variable
    flickr8k_source: str = str(REPO_ROOT.parent / "shared" / "datasets" / "flickr8k")
    # Flickr8k_text.zip path or URL (default: beside a zip source)
    flickr8k_text_source: str | None = None
    # expected sha256 of downloaded archives (checked when set)
    flickr8k_images_sha256: str | None = None
    flickr8k_text_sha256: str | None = None
    # downloads and unpacked archives (CLI and DAG alike)
    flickr8k_work_dir: str = str(REPO_ROOT / "data" / "downloads")

    # --- Airflow -----------------------------------------------------------------------------
    reindex_schedule: str = "@hourly"
    flickr8k_task_retries: int = Field(3, ge=0)

    # --- search API --------------------------------------------------------------------------
    # when set, upload and admin routes need header X-API-Key
    api_key: str | None = None
    # request limits: the fields of RequestLimits above (MAX_TOP_K, MAX_UPLOAD_BYTES, ...)
    # public URL of the service (e.g. https://search.example.org/): result `url`s start with it,
    # never with the request's Host header; unset: relative URLs (`/images/<key>`)
    public_base_url: str | None = None
    # concurrent text queries are encoded together, up to this many per forward pass (1: off)
    text_batch_max: int = Field(64, ge=1)
    # thumbnails kept in memory for the web page (`GET /images/{key}?size=N`)
    thumbnail_cache_items: int = Field(1024, ge=0)
    # explanations (`GET /explain`: a photo's heat map for a query) kept in memory
    explain_cache_items: int = Field(64, ge=0)
    # the serving bundle's image tower: opened at start (True) or on the first image request
    image_tower_at_start: bool = False
    # seconds between checks for a newly published index version (0: only /admin/reload)
    reload_interval_s: float = Field(10.0, ge=0)
    # seconds between attempts to reopen an object store that was down when the service started
    store_retry_s: float = Field(10.0, ge=0)
    # the time zone query hints read dates in ("last summer", "July 2023"): an IANA name
    query_time_zone: str = "UTC"

    @field_validator("query_time_zone")
    @classmethod
    def known_time_zone(cls, v: str) -> str:
        try:
            ZoneInfo(v)
        except (ZoneInfoNotFoundError, ValueError):
            raise ValueError(f"unknown time zone {v!r} (an IANA name such as Europe/Lisbon)") \
                from None
        return v


@lru_cache
def get_settings() -> Settings:
    return Settings()
