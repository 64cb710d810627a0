"""One settings object per process (pydantic-settings); the original variable names still work."""
from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from pydantic import AliasChoices, Field
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_file=".env", extra="ignore", populate_by_name=True)

    # model
    model_path: str = Field(str(REPO_ROOT / "models" / "flickr8k-dual-encoder.pt"),
                            validation_alias=AliasChoices("MODEL_PATH", "model_path"))
    embedding_dim: int = Field(256, validation_alias=AliasChoices("EMBEDDING_DIM", "embedding_dim"))

    # object store: "local" (a directory, the embedded default) or "s3" (MinIO / any S3)
    store_backend: str = Field("local", validation_alias=AliasChoices("STORE_BACKEND", "store_backend"))
    local_store_dir: str = Field(str(REPO_ROOT / "data" / "store"),
                                 validation_alias=AliasChoices("LOCAL_STORE_DIR", "local_store_dir"))
    minio_endpoint: str = Field("localhost:9000",
                                validation_alias=AliasChoices("MINIO_ENDPOINT", "minio_endpoint"))
    minio_access_key: str = Field("minioadmin",
                                  validation_alias=AliasChoices("MINIO_ACCESS_KEY", "minio_access_key"))
    minio_secret_key: str = Field("minioadmin",
                                  validation_alias=AliasChoices("MINIO_SECRET_KEY", "minio_secret_key"))
    minio_bucket: str = Field("flickr8k", validation_alias=AliasChoices("MINIO_BUCKET", "minio_bucket"))
    minio_secure: bool = Field(False, validation_alias=AliasChoices("MINIO_SECURE", "minio_secure"))

    # data layout inside the bucket
    images_prefix: str = "flickr8k/images/"
    text_prefix: str = "flickr8k/text/"

    # index versions live here (a shared volume in docker-compose)
    index_dir: str = Field(str(REPO_ROOT / "data" / "index"),
                           validation_alias=AliasChoices("INDEX_DIR", "index_dir"))

    # where `ingest` reads Flickr8k from by default (folder, zip path or URL)
    flickr8k_source: str = Field(str(REPO_ROOT.parent / "shared" / "datasets" / "flickr8k"),
                                 validation_alias=AliasChoices("FLICKR8K_SOURCE", "flickr8k_source"))

    device: str = Field("cpu", validation_alias=AliasChoices("DEVICE", "device"))
    # tower runtimes on CPU: "onnx" (ONNX Runtime fp32: same embeddings as PyTorch, several
    # times faster), "onnx-int8" (faster again; dev Recall@K within 0.5 point, BENCHMARKS.md)
    # or "torch" (eager). A runtime that cannot start falls back to eager PyTorch.
    image_runtime: str = Field("onnx", validation_alias=AliasChoices("IMAGE_RUNTIME", "image_runtime"))
    text_runtime: str = Field("onnx", validation_alias=AliasChoices("TEXT_RUNTIME", "text_runtime"))
    # exported ONNX graphs, one folder per model id (written once, then reused)
    onnx_cache_dir: str = Field(str(REPO_ROOT / ".cache" / "onnx"),
                                validation_alias=AliasChoices("ONNX_CACHE_DIR", "onnx_cache_dir"))
    embed_batch_size: int = 32


@lru_cache
def get_settings() -> Settings:
    return Settings()
