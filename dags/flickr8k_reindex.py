"""`flickr8k_reindex`: on a schedule, bring the index in line with the bucket.

    plan_shards (short-circuit) -> embed_shard x N (mapped) -> publish_index -> verify_index
        -> prune_versions, find_duplicates

While another index run is active (an ingestion embedding an upload), `plan_shards` plans
nothing and the run stops there: that run indexes what there is. Otherwise `plan_shards` compares the bucket's images with the current index version (new or changed
objects, removed objects) and the model id of MODEL_PATH with the index's, without loading the
model; when nothing differs the run stops there (the other tasks are skipped, no new version).
Otherwise it splits the keys to embed into ranges (EMBED_SHARD_SIZE keys each, at most
EMBED_MAX_SHARDS); `embed_shard`, mapped over them (one task instance per shard, in parallel, a
failed one retried alone), embeds its range's new objects and finds its removed ones, and
`publish_index` publishes all shards' work at once (FAISS: one new version; Milvus updates
in place). A changed model id means a full rebuild into a new version (also forced with the
`force_rebuild` param; the plan then loads the model to begin it). `verify_index` then checks
that the published version holds exactly the bucket's images (`python -m indexer verify`) and
fails the run when not; uploads, changes and deletions made after the plan listed the bucket
are logged, not failed (the next run indexes them). The work is done by `indexer.jobs` and `indexer.shards`.

Schedule: REINDEX_SCHEDULE (cron or preset, read when the file is parsed; default @hourly).
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from core.settings import get_settings
from flickr8k_common import DEFAULT_ARGS, embed_publish_prune, fail_fast, other_index_runs


@dag(
    dag_id="flickr8k_reindex",
    description="Scheduled incremental re-indexing of the bucket (rebuild when the model changed)",
    schedule=get_settings().reindex_schedule,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    dagrun_timeout=timedelta(hours=6),
    tags=["flickr8k", "index"],
    doc_md=__doc__,
    params={"force_rebuild": Param(False, type="boolean",
                                   description="re-embed everything even if nothing changed")},
)
def flickr8k_reindex():
    @task.short_circuit
    @fail_fast
    def plan_shards(params=None, **context) -> list[dict]:
        from indexer import jobs

        # while an ingestion (or any other index run) is active, it indexes what there is
        return jobs.plan_shards(force_rebuild=params["force_rebuild"],
                                other_runs=lambda: other_index_runs(context))

    embed_publish_prune(plan_shards())


flickr8k_reindex()
