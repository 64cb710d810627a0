"""`flickr8k_reindex`: on a schedule, bring the index in line with the bucket.

    find_changes (short-circuit) -> update_index -> prune_versions

`find_changes` compares the bucket's images with the current index version (new or changed
objects, removed objects) and the model id of MODEL_PATH with the index's, without loading the
model; when nothing differs the run stops there (the other tasks are skipped, no new version).
`update_index` embeds only the new objects and drops removed ones; a changed model id means a full
rebuild (also forced with the `force_rebuild` param). The work is done by `indexer.jobs`.

Schedule: REINDEX_SCHEDULE (cron or preset, read when the file is parsed; default @hourly).
"""
from __future__ import annotations

import logging
from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task

from core.settings import get_settings
from flickr8k_common import DEFAULT_ARGS, fail_fast


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
    def find_changes(params=None) -> bool:
        from indexer import jobs

        changes = jobs.find_changes()
        logging.getLogger(__name__).info("changes: %s", changes)
        return bool(changes["changed"] or params["force_rebuild"])

    @task(execution_timeout=timedelta(hours=6))
    @fail_fast
    def update_index(params=None) -> dict:
        from indexer import jobs

        return jobs.publish_index(force_rebuild=params["force_rebuild"])

    @task
    @fail_fast
    def prune_versions(published: dict) -> dict:
        from indexer import jobs

        return jobs.prune_versions()

    changed = find_changes()
    published = update_index()
    changed >> published
    prune_versions(published)


flickr8k_reindex()
