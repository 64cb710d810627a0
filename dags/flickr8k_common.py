"""What both Flickr8k DAGs share: retry policy, the permanent-error rule, the index writers'
pool, how a run tells that another index run is active (`other_index_runs`), and the fanned-out
tail embed_shard x N -> publish_index -> verify_index -> prune_versions, with find_duplicates
beside prune_versions (no DAG here).

The task ids are those of earlier runs (Airflow keys task history, logs and XComs by them);
each task here calls the `indexer.jobs` function of the same name.
"""
from __future__ import annotations

import functools
from datetime import timedelta

from airflow.sdk import task
from airflow.sdk.exceptions import AirflowFailException

from core.settings import get_settings

# The tasks that write the index (publish_index, prune_versions) of every run of every DAG take
# the one slot of this pool: INDEX_DIR's file lock serializes writers on one machine only, and
# on Milvus they may run on different workers. Created by the deployment's Airflow setup
# (`airflow pools set`, deploy/SCALING.md); a task of a missing pool is never scheduled.
INDEX_WRITERS_POOL = "flickr8k_index_writers"
INDEX_WRITERS_POOL_SLOTS = 1
# the DAGs whose runs plan, embed and publish index versions
INDEX_DAGS = ("flickr8k_data_ingestion", "flickr8k_reindex")

DEFAULT_ARGS = {
    "owner": "flickr-search",
    # attempts after the first (FLICKR8K_TASK_RETRIES), 30 s, 60 s, 120 s ... apart
    "retries": get_settings().flickr8k_task_retries,
    "retry_delay": timedelta(seconds=30),
    "retry_exponential_backoff": 2.0,
    "max_retry_delay": timedelta(minutes=10),
}


def fail_fast(fn):
    """Errors no retry can fix (`indexer.jobs.PERMANENT_ERRORS`: configuration, credentials, a
    missing source or model) fail the task at once, without Airflow's retries."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        from indexer.jobs import PERMANENT_ERRORS  # not at parse time: DAG files stay light

        try:
            return fn(*args, **kwargs)
        except PERMANENT_ERRORS as exc:
            raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc

    return run


def other_index_runs(context) -> int:
    """Runs of the index DAGs active now besides this task's own (Airflow's record of runs:
    `plan_shards` skips or waits while there are any, see `indexer.jobs`)."""
    ti, own = context["ti"], context["dag_run"].dag_id
    return sum(max(0, ti.get_dr_count(dag_id=d, states=["running"]) - (d == own))
               for d in INDEX_DAGS)


@task(execution_timeout=timedelta(hours=6))
@fail_fast
def embed_shard(shard: dict) -> dict:
    from indexer import jobs

    return jobs.embed_shard(shard)


@task(execution_timeout=timedelta(hours=2), pool=INDEX_WRITERS_POOL)
@fail_fast
def publish_index(plan: list[dict], embedded: list[dict]) -> dict:
    from indexer import jobs

    return jobs.publish_index(plan, embedded)


@task(execution_timeout=timedelta(hours=2))
@fail_fast
def verify_index(published: dict) -> dict:
    """The published version holds exactly the store's images (else the run fails, naming the
    missing, stale, extra and duplicated keys). What changed in the store after the run's plan
    listed it (`published` carries when) is logged, not failed: the next run indexes it."""
    from indexer import jobs

    return jobs.verify_index(published)


@task(pool=INDEX_WRITERS_POOL)
@fail_fast
def prune_versions(verified: dict) -> dict:
    from indexer import jobs

    return jobs.prune_versions()


@task(execution_timeout=timedelta(hours=2))
@fail_fast
def find_duplicates(verified: dict) -> dict:
    """The groups of near-duplicate photos in the version just published, written beside the
    index for `GET /duplicates` (`python -m indexer duplicates`)."""
    from indexer import jobs

    return jobs.find_duplicates()


def embed_publish_prune(plan):
    """Inside a DAG: `embed_shard` mapped over the plan's shards, `publish_index` once all
    succeeded, `verify_index`, then `prune_versions` and `find_duplicates`."""
    verified = verify_index(publish_index(plan, embed_shard.expand(shard=plan)))
    find_duplicates(verified)
    return prune_versions(verified)
