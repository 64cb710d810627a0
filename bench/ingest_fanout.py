"""Ingest: the fanned-out re-index DAG against the single-process rebuild, on the same images
and the same cores, interleaved.

    python bench/ingest_fanout.py [--n N] [--rounds 1] [--shard-sizes auto,2000]
                                  [--parallelism 2]

Both rebuild the whole index from a local-directory store holding the first N Flickr8k images
(default: all of FLICKR8K_SOURCE):
    one process   `python -m indexer rebuild` (process start, model load, embed, publish)
    DAG           `airflow dags test flickr8k_reindex --use-executor --conf {"force_rebuild": true}`
                  with the LocalExecutor (PARALLELISM worker slots): plan_shards, embed_shard
                  mapped over the shards (one process and one model load each), publish_index,
                  prune_versions; the wall time of the whole command, DAG parsing included.
Shard sizes: "auto" = N / PARALLELISM (one shard per worker slot), or a number (EMBED_SHARD_SIZE).
The Airflow DB is migrated and an `airflow api-server` (execution API) started before timing:
in a deployment they are standing services.
"""
from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
import urllib.request
from contextlib import closing
from pathlib import Path

from common import FLICKR, MODEL, ROOT, header, load_average, median, save_json, table
from deploy.ports import free_port

AIRFLOW = Path(sys.executable).parent / "airflow"


def _airflow(tmp: Path, parallelism: int) -> tuple[dict, subprocess.Popen]:
    home = tmp / "airflow"
    home.mkdir()
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("AIRFLOW")}
    env.update({"AIRFLOW_HOME": str(home), "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
                "AIRFLOW__CORE__LOAD_EXAMPLES": "False", "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
                "AIRFLOW__CORE__PARALLELISM": str(parallelism),
                "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"http://127.0.0.1:{port}/execution/",
                "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_hex(32)})
    subprocess.run([str(AIRFLOW), "db", "migrate"], env=env, cwd=home, check=True,
                   capture_output=True, timeout=300)
    api = subprocess.Popen([str(AIRFLOW), "api-server", "--host", "127.0.0.1", "--port", str(port),
                            "--apps", "execution", "--workers", "1"], env=env, cwd=home,
                           stdout=open(tmp / "api-server.log", "w"), stderr=subprocess.STDOUT,
                           start_new_session=True)
    for _ in range(240):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/execution/health", timeout=2):
                return env, api
        except OSError:
            time.sleep(0.5)
    raise RuntimeError("api-server did not start")


def _stop(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)


def _task_times(home: str) -> dict:
    """The last run's task instances: seconds each, and the shards' pids."""
    with closing(sqlite3.connect(Path(home) / "airflow.db")) as db:
        run_id, = db.execute("SELECT run_id FROM dag_run ORDER BY id DESC LIMIT 1").fetchone()
        rows = db.execute("SELECT task_id, map_index, duration, pid FROM task_instance WHERE "
                          "run_id=? ORDER BY task_id, map_index", (run_id,)).fetchall()
    return {(t if m < 0 else f"{t}[{m}]"): {"s": round(d or 0, 1), "pid": pid}
            for t, m, d, pid in rows}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=None, help="images (default: all)")
    p.add_argument("--rounds", type=int, default=1)
    p.add_argument("--shard-sizes", default="auto,2000")
    p.add_argument("--parallelism", type=int, default=os.cpu_count() or 2)
    args = p.parse_args()
    header("ingest: mapped DAG (LocalExecutor) vs one process")

    tmp = Path(tempfile.mkdtemp(prefix="bench-fanout-"))
    from objectstore import LocalStore

    store = LocalStore(tmp / "store", "bench")
    names = sorted(x.name for x in (FLICKR / "Images").iterdir())[: args.n]
    for name in names:
        store.put(f"flickr8k/images/{name}", (FLICKR / "Images" / name).read_bytes())
    t0 = time.perf_counter()
    env, api = _airflow(tmp, args.parallelism)
    print(f"airflow db migrate + api-server start (not timed below): "
          f"{time.perf_counter() - t0:.0f} s\n")
    base = {**env, "STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(tmp / "store"),
            "MINIO_BUCKET": "bench", "MODEL_PATH": MODEL, "FLICKR8K_TASK_RETRIES": "0"}
    sizes = [-(-len(names) // args.parallelism) if s == "auto" else int(s)
             for s in args.shard_sizes.split(",")]
    variants = {"one process": ([sys.executable, "-m", "indexer", "--quiet", "rebuild"],
                                {**base, "INDEX_DIR": str(tmp / "index-one")})}
    for size in sizes:
        shards = -(-len(names) // size)
        variants[f"DAG, {shards} shards of ≤{size}"] = (
            [str(AIRFLOW), "dags", "test", "flickr8k_reindex", "--use-executor",
             "--conf", json.dumps({"force_rebuild": True})],
            {**base, "INDEX_DIR": str(tmp / f"index-{size}"), "EMBED_SHARD_SIZE": str(size)})
    times: dict[str, list[float]] = {k: [] for k in variants}
    tasks: dict[str, dict] = {}
    try:
        for _ in range(args.rounds):
            for name, (cmd, run_env) in variants.items():
                t = time.perf_counter()
                r = subprocess.run(cmd, env=run_env, cwd=env["AIRFLOW_HOME"],
                                   capture_output=True, text=True, timeout=3600)
                times[name].append(time.perf_counter() - t)
                if r.returncode != 0:
                    raise RuntimeError(f"{name} failed:\n{(r.stdout + r.stderr)[-3000:]}")
                if cmd[0] == str(AIRFLOW):
                    tasks[name] = _task_times(env["AIRFLOW_HOME"])
    finally:
        _stop(api)
    one = times["one process"]
    rows = [{"what": k, "wall s (median)": median(v),
             "× one process (median of per-round ratios)":
                 round(median([x / o for x, o in zip(v, one)]), 3)} for k, v in times.items()]
    print(f"{len(names)} Flickr8k images in a local store, model {Path(MODEL).name}, "
          f"LocalExecutor parallelism {args.parallelism}, {args.rounds} round(s), "
          f"load average at end {load_average()}\n")
    print(table(rows))
    for name, t in tasks.items():
        print(f"\n{name}: task seconds (last round): " +
              ", ".join(f"{k} {v['s']}" for k, v in t.items()))
        print("  shard pids: " + ", ".join(str(v["pid"]) for k, v in t.items()
                                           if k.startswith("embed_shard[")))
    save_json("ingest_fanout", {"n": len(names), "times": times, "tasks": tasks})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
