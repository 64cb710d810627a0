"""API settings: the shared settings plus what only the service needs."""
from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field

from indexer.settings import Settings


def _env(name: str) -> AliasChoices:
    return AliasChoices(name.upper(), name)


class ApiSettings(Settings):
    api_key: str | None = Field(None, validation_alias=_env("api_key"))
    # limits (each refusal is a 4xx JSON error, never a 5xx)
    max_top_k: int = Field(100, validation_alias=_env("max_top_k"))
    max_offset: int = 10_000
    max_query_chars: int = Field(1000, validation_alias=_env("max_query_chars"))
    max_upload_bytes: int = Field(20 * 1024 * 1024, validation_alias=_env("max_upload_bytes"))
    max_image_pixels: int = Field(40_000_000, validation_alias=_env("max_image_pixels"))
    max_batch_queries: int = 32
    # concurrent text queries are encoded together, up to this many per forward pass (1: off)
    text_batch_max: int = Field(64, ge=1, validation_alias=_env("text_batch_max"))
    # thumbnails for the web page (`GET /images/{key}?size=N`)
    thumbnail_cache_items: int = 1024
    reload_interval_s: float = Field(10.0, validation_alias=_env("reload_interval_s"))
    # seconds between attempts to reopen an object store that was down when the service started
    store_retry_s: float = 10.0


@lru_cache
def get_api_settings() -> ApiSettings:
    return ApiSettings()
