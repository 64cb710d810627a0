"""`flickr8k_data_ingestion`: Flickr8k (URL, zip or folder) -> object store -> a new index version.

    fetch_archives -> verify_and_unpack -> upload_to_store -> plan_shards (short-circuit)
        -> embed_shard x N (mapped) -> publish_index -> verify_index
        -> prune_versions, find_duplicates

Each task is an idempotent transaction done by `indexer.jobs` (this file only wires them):
downloads resume and are checked (size / sha256 / zip CRC) before use, uploads are skipped when
the object's content hash already matches. `plan_shards` splits what the index lacks into key
ranges (EMBED_SHARD_SIZE keys each, at most EMBED_MAX_SHARDS); nothing to do -> the run stops
there; while a re-index run is active it first waits for it to finish (that run publishes
first; the plan is then made on its version, so nothing is embedded twice and no plan goes
stale). `embed_shard` is mapped over the ranges (Airflow dynamic task mapping: one task instance
per shard, run in parallel by the executor, a failed shard retried alone), and `publish_index`
merges them into one new version once all succeeded (atomically: a failed run leaves the current
version in place), and `verify_index` checks the published version against the store
(`python -m indexer verify`: the run fails when they differ, except by what changed in the
store after the plan listed it, which the next run indexes).

Configuration (core.settings: environment of the Airflow workers or .env; a run's params win):
FLICKR8K_SOURCE (a folder, a Flickr8k_Dataset.zip path or URL, as for `python -m indexer ingest`;
one that does not exist fails the run at once), FLICKR8K_TEXT_SOURCE, FLICKR8K_IMAGES_SHA256 /
FLICKR8K_TEXT_SHA256, FLICKR8K_WORK_DIR, STORE_BACKEND=s3, MINIO_*, MODEL_PATH, INDEX_DIR,
INDEX_KEEP_VERSIONS, EMBED_SHARD_SIZE, EMBED_MAX_SHARDS.
"""
from __future__ import annotations

from datetime import datetime, timedelta

from airflow.sdk import Param, dag, task
from flickr8k_common import DEFAULT_ARGS, embed_publish_prune, fail_fast, other_index_runs


@dag(
    dag_id="flickr8k_data_ingestion",
    description="Download/unpack Flickr8k, upload to the object store, embed, publish an index version",
    schedule=None,
    start_date=datetime(2024, 1, 1),
    catchup=False,
    max_active_runs=1,
    default_args=DEFAULT_ARGS,
    tags=["flickr8k", "ingest", "index"],
    doc_md=__doc__,
    params={
        "source": Param(None, type=["null", "string"],
                        description="folder, Flickr8k_Dataset.zip path or URL (default FLICKR8K_SOURCE)"),
        "text_source": Param(None, type=["null", "string"],
                             description="Flickr8k_text.zip path or URL (default: beside source)"),
        "images_sha256": Param(None, type=["null", "string"], description="expected sha256"),
        "text_sha256": Param(None, type=["null", "string"], description="expected sha256"),
        "split": Param("all", enum=["all", "train", "dev", "test"]),
        "limit": Param(None, type=["null", "integer"], minimum=1, description="at most N images"),
    },
)
def flickr8k_data_ingestion():
    @task(execution_timeout=timedelta(hours=3))
    @fail_fast
    def fetch_archives(params=None) -> dict:
        from indexer import jobs

        return jobs.fetch_archives(params["source"], params["text_source"],
                                   params["images_sha256"], params["text_sha256"])

    @task(execution_timeout=timedelta(hours=1))
    @fail_fast
    def verify_and_unpack(fetched: dict) -> dict:
        from indexer import jobs

        return jobs.unpack(fetched)

    @task(execution_timeout=timedelta(hours=2))
    @fail_fast
    def upload_to_store(unpacked: dict, params=None) -> dict:
        from indexer import jobs

        return jobs.upload(unpacked["folder"], split=params["split"], limit=params["limit"])

    @task.short_circuit(execution_timeout=timedelta(hours=8))
    @fail_fast
    def plan_shards(uploaded: dict, **context) -> list[dict]:
        from indexer import jobs

        # a re-index run embedding meanwhile publishes first: plan on top of its version
        return jobs.plan_shards(other_runs=lambda: other_index_runs(context),
                                wait_for_others=True)

    embed_publish_prune(plan_shards(upload_to_store(verify_and_unpack(fetch_archives()))))


flickr8k_data_ingestion()
