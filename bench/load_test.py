"""Bounded load test of the search API on loopback: N requests from C concurrent clients.

    python bench/load_test.py                      # builds a throwaway setup, starts uvicorn
    python bench/load_test.py --requests 2000 --concurrency 16 --vectors 8091
    python bench/load_test.py --url http://127.0.0.1:8000   # an already running service

Without --url it needs no data: it uses MODEL_PATH (models/flickr8k-dual-encoder.pt) when that
exists, else a freshly initialised model with the real pretrained towers (same cost per query),
publishes an index of --vectors random unit vectors under that model's id (Flickr8k has 8,091
images), and starts `python -m search_api` as a separate process. Each request is a different
caption-like query sent to POST /search_images_by_text (top_k 10), so nothing is served from a
cache. Prints errors, throughput and latency percentiles (and --json writes them).
"""
from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from deploy.ports import free_port  # noqa: E402

SUBJECTS = ["a dog", "two dogs", "a black dog", "a little girl", "a man", "a woman", "children",
            "a boy", "a brown dog", "a group of people", "a cyclist", "a surfer", "a skier",
            "a white dog", "two men", "a child in a red shirt", "a football player", "a climber"]
ACTIONS = ["running", "jumping", "playing", "sitting", "walking", "swimming", "riding a bike",
           "climbing a rock", "catching a ball", "standing", "smiling", "sliding down"]
PLACES = ["on the beach", "in the snow", "through the grass", "in a park", "on a street",
          "in the water", "near a fountain", "on a mountain", "in front of a building",
          "at the lake", "in a field", "on a wave"]


def queries(seed: int = 0) -> list[str]:
    combos = [" ".join(c) for c in itertools.product(SUBJECTS, ACTIONS, PLACES)]
    random.Random(seed).shuffle(combos)
    return combos  # 2,592 distinct queries


def percentile(sorted_values: list[float], p: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * p / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


# --- a throwaway service ----------------------------------------------------------------------
def prepare(workdir: Path, vectors: int, model: str | None) -> dict:
    sys.path.insert(0, str(ROOT))
    import numpy as np

    from encoder import Scoring, load_checkpoint
    from indexer.repository import IndexRepository
    from indexer.index_policy import new_flat_index

    model_path = Path(model) if model else ROOT / "models" / "flickr8k-dual-encoder.pt"
    if model_path.is_file():
        loaded = load_checkpoint(str(model_path))
        model_id, dim = loaded.model_id, Scoring.of(loaded.model).index_dim
        print(f"model: {model_path} ({model_id})")
    else:
        import torch

        from encoder import DualEncoder, ModelConfig, save_checkpoint

        torch.manual_seed(0)
        model_path = workdir / "bench-model.pt"
        net = DualEncoder(ModelConfig())
        model_id = save_checkpoint(net, model_path, {"name": "load-test model (untrained heads)"})
        dim = net.config.embed_dim
        print(f"model: untrained heads over the pretrained towers ({model_id})")
    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((vectors, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    index = new_flat_index(dim)
    ids = np.arange(vectors, dtype=np.int64)
    index.add_with_ids(vecs, ids)
    repo = IndexRepository(workdir / "index")
    keys = [f"flickr8k/images/synthetic_{i:05d}.jpg" for i in range(vectors)]
    version = repo.commit_version(index, ids, keys, ["0" * 32] * vectors, model_id)
    print(f"index: {vectors} random unit vectors, dim {dim}, version {version}")
    return {"MODEL_PATH": str(model_path), "INDEX_DIR": str(workdir / "index"),
            "LOCAL_STORE_DIR": str(workdir / "store"), "STORE_BACKEND": "local"}


def start_service(env: dict, port: int, extra_env: dict) -> subprocess.Popen:
    log = open(Path(env["INDEX_DIR"]).parent / "api.log", "wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "search_api", "--port", str(port), "--log-level", "warning"],
        cwd=ROOT, env={**os.environ, **env, **extra_env}, stdout=log, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the service exited with {proc.returncode}; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise SystemExit("the service did not start in 180 s")


# --- the load -----------------------------------------------------------------------------------
async def run_load(url: str, n: int, concurrency: int, top_k: int, warmup: int) -> dict:
    texts = queries()
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60) as http:
        for i in range(warmup):  # load lazily built things (tokenizer caches, threads)
            await http.post("/search_images_by_text", json={"query": texts[-1 - i % 50],
                                                            "top_k": top_k})
        latencies: list[float] = []
        errors: dict[str, int] = {}
        counter = itertools.count()

        async def client():
            while (i := next(counter)) < n:
                body = {"query": texts[i % len(texts)], "top_k": top_k}
                t0 = time.perf_counter()
                try:
                    r = await http.post("/search_images_by_text", json=body)
                    ok = r.status_code == 200 and len(r.json()["results"]) == top_k
                    why = f"HTTP {r.status_code}"
                except httpx.HTTPError as exc:
                    ok, why = False, type(exc).__name__
                latencies.append(time.perf_counter() - t0)
                if not ok:
                    errors[why] = errors.get(why, 0) + 1

        t0 = time.perf_counter()
        await asyncio.gather(*(client() for _ in range(concurrency)))
        wall = time.perf_counter() - t0
        metrics = (await http.get("/metrics")).text
    lat = sorted(latencies)
    return {
        "requests": n, "concurrency": concurrency, "errors": sum(errors.values()),
        "error_kinds": errors, "seconds": round(wall, 2),
        "throughput_rps": round(n / wall, 1),
        "latency_ms": {"p50": round(percentile(lat, 50) * 1000, 1),
                       "p95": round(percentile(lat, 95) * 1000, 1),
                       "p99": round(percentile(lat, 99) * 1000, 1),
                       "max": round(lat[-1] * 1000, 1),
                       "mean": round(statistics.fmean(lat) * 1000, 1)},
        "server_stages": stage_summary(metrics),
    }


def stage_summary(text: str) -> dict:
    """Mean time per stage call and the mean text batch size, from the service's /metrics."""
    try:
        from prometheus_client.parser import text_string_to_metric_families
    except ImportError:
        return {}
    sums, counts, requests = {}, {}, 0.0
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            if s.name == "search_api_stage_duration_seconds_sum":
                sums[s.labels["stage"]] = s.value
            elif s.name == "search_api_stage_duration_seconds_count":
                counts[s.labels["stage"]] = s.value
            elif (s.name == "search_api_request_duration_seconds_count"
                  and s.labels.get("route") == "/search_images_by_text"):
                requests += s.value
    out = {f"{k}_mean_ms": round(sums[k] / counts[k] * 1000, 2) for k in sums if counts.get(k)}
    if counts.get("text_encode"):
        out["text_queries_per_forward_pass"] = round(requests / counts["text_encode"], 2)
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="load an already running service instead of starting one")
    p.add_argument("--requests", type=int, default=2000)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--top-k", type=int, default=10)
    p.add_argument("--warmup", type=int, default=32)
    p.add_argument("--vectors", type=int, default=8091, help="index size (without --url)")
    p.add_argument("--model", help="checkpoint (without --url); default MODEL_PATH's default")
    p.add_argument("--text-batch-max", type=int, default=None,
                   help="the service's TEXT_BATCH_MAX (1 turns query batching off)")
    p.add_argument("--json", help="also write the results to this file")
    args = p.parse_args(argv)

    proc = workdir = None
    url = args.url
    try:
        if url is None:
            workdir = Path(tempfile.mkdtemp(prefix="loadtest-"))
            env = prepare(workdir, args.vectors, args.model)
            port = free_port()
            extra = {"RELOAD_INTERVAL_S": "0"}
            if args.text_batch_max:
                extra["TEXT_BATCH_MAX"] = str(args.text_batch_max)
            t0 = time.perf_counter()
            proc = start_service(env, port, extra)
            print(f"service: uvicorn on 127.0.0.1:{port} (pid {proc.pid}), ready in "
                  f"{time.perf_counter() - t0:.1f} s")
            url = f"http://127.0.0.1:{port}"
        health = httpx.get(f"{url}/health", timeout=10).json()
        print(f"index {health['index_version']}: {health['vector_count']} vectors, "
              f"model {health['model_id']}")
        print(f"load: {args.requests} x POST /search_images_by_text (top_k {args.top_k}), "
              f"{args.concurrency} concurrent clients, {os.cpu_count()} CPU cores")
        res = asyncio.run(run_load(url, args.requests, args.concurrency, args.top_k, args.warmup))
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
        if workdir is not None:
            shutil.rmtree(workdir, ignore_errors=True)

    lat = res["latency_ms"]
    print(f"errors      {res['errors']} of {res['requests']} {res['error_kinds'] or ''}")
    print(f"throughput  {res['throughput_rps']} requests/s ({res['seconds']} s)")
    print(f"latency ms  p50 {lat['p50']}  p95 {lat['p95']}  p99 {lat['p99']}  "
          f"max {lat['max']}  mean {lat['mean']}")
    if res["server_stages"]:
        print("server      " + "  ".join(f"{k} {v}" for k, v in res["server_stages"].items()))
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())
