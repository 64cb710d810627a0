"""What both Flickr8k DAGs share: retry policy and the call into `indexer.jobs` (no DAG here)."""
from __future__ import annotations

import os
from datetime import timedelta

DEFAULT_ARGS = {
    "owner": "flickr-search",
    # FLICKR8K_TASK_RETRIES (default 3): attempts after the first, 30 s, 60 s, 120 s ... apart
    "retries": int(os.environ.get("FLICKR8K_TASK_RETRIES") or 3),
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}


def call_job(job: str, *args, **kwargs):
    """Run indexer.jobs.<job>; configuration/credential errors fail at once, without retries."""
    from airflow.sdk.exceptions import AirflowFailException

    from indexer import jobs

    try:
        return getattr(jobs, job)(*args, **kwargs)
    except jobs.PERMANENT_ERRORS as exc:
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc
