"""API settings: the shared settings plus what only the service needs."""
from __future__ import annotations

from functools import lru_cache

from pydantic import AliasChoices, Field

from indexer.settings import Settings


class ApiSettings(Settings):
    api_key: str | None = Field(None, validation_alias=AliasChoices("API_KEY", "api_key"))
    max_top_k: int = 100
    max_query_chars: int = 1000
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_batch_queries: int = 32
    reload_interval_s: float = Field(10.0, validation_alias=AliasChoices(
        "RELOAD_INTERVAL_S", "reload_interval_s"))


@lru_cache
def get_api_settings() -> ApiSettings:
    return ApiSettings()
