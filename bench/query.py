"""Query path: POST /search_images_by_text over HTTP against the in-process floor (text encode +
FAISS search in one Python call, same runtime, same index), at 1 and at 16 concurrent clients.

    python bench/query.py [--n 1000] [--text-runtime onnx] [--requests 200] [--rounds 2]

Builds an index of N Flickr8k images in a temp dir, starts the real service (`python -m
search_api`, one uvicorn worker) on a free port, then alternates: floor calls and 1-client HTTP
calls one by one (ratio of p50s), then blocks of 16 concurrent clients (asyncio + keep-alive
httpx, in this process) for throughput. The load generator shares the 2 cores with the server,
as any client on this machine would. The service reads IMAGE_RUNTIME / TEXT_RUNTIME like
any deployment.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import FLICKR, MODEL, ROOT, header, median, pct, save_json, table

QUERIES = ["two dogs playing in the snow", "a man rides a bicycle down a city street",
           "a little girl in a pink dress", "people sitting on a bench next to the water",
           "a black dog jumps over a log", "a surfer riding a big wave",
           "children playing soccer on a field", "a woman climbing a rock wall",
           "a brown dog runs through the grass", "a group of people stand in front of a building"]



def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def clients(url: str, n_clients: int, n_requests: int) -> tuple[list[float], float]:
    import httpx

    lat: list[float] = []
    todo = iter(range(n_requests))
    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def worker(w):
            for i in todo:
                q = QUERIES[(i + w) % len(QUERIES)]
                t = time.perf_counter()
                r = await client.post(url, json={"query": q, "top_k": 10})
                lat.append(time.perf_counter() - t)
                r.raise_for_status()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(n_clients)))
        wall = time.perf_counter() - t0
    return lat, n_requests / wall


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--text-runtime", default="onnx")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    header("query path: HTTP vs in-process floor")

    import faiss
    import httpx

    from encoder import Encoder, load_checkpoint
    from indexer import pipeline
    from indexer.repository import IndexRepository
    from objectstore import LocalStore

    work = Path(tempfile.mkdtemp(prefix="bench-query-"))
    cache = str(work / "onnx")
    store = LocalStore(work / "store", "flickr8k")
    names = sorted(x.name for x in (FLICKR / "Images").iterdir())[:args.n]
    for name in names:
        store.put("flickr8k/images/" + name, (FLICKR / "Images" / name).read_bytes())
    enc = Encoder(load_checkpoint(args.checkpoint), image_runtime="onnx",
                  text_runtime=args.text_runtime, onnx_cache_dir=cache)
    repo = IndexRepository(work / "index")
    pipeline.rebuild(store, enc, repo, "flickr8k/images/", progress=False)
    index = repo.load()
    enc.warmup()

    port = free_port()
    env = {**os.environ, "MODEL_PATH": args.checkpoint, "INDEX_DIR": str(work / "index"),
           "STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(work / "store"),
           "MINIO_BUCKET": "flickr8k", "IMAGE_RUNTIME": "onnx", "TEXT_RUNTIME": args.text_runtime,
           "ONNX_CACHE_DIR": cache, "PYTHONPATH": str(ROOT)}
    server = subprocess.Popen([sys.executable, "-m", "search_api", "--port", str(port),
                               "--log-level", "warning"], env=env, cwd=ROOT)
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(600):
            try:
                if httpx.get(base + "/health", timeout=1).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None:
                raise SystemExit("the service did not start")
            time.sleep(0.5)
        url = base + "/search_images_by_text"
        faiss.omp_set_num_threads(1)

        def floor(q):
            v = enc.encode_texts([q])
            v = enc.scoring.query_vectors(v)
            return index.search(v, 10)

        http = httpx.Client(timeout=60)
        for q in QUERIES:  # warm both paths
            floor(q)
            http.post(url, json={"query": q, "top_k": 10}).raise_for_status()
        t_floor, t_http1, thr1, lat16, thr16 = [], [], [], [], []
        for _ in range(args.rounds):
            for i in range(args.requests):
                q = QUERIES[i % len(QUERIES)]
                t = time.perf_counter()
                floor(q)
                t_floor.append(time.perf_counter() - t)
                t = time.perf_counter()
                http.post(url, json={"query": q, "top_k": 10}).raise_for_status()
                t_http1.append(time.perf_counter() - t)
            # 1-client throughput: back-to-back requests, nothing else in between
            lat, thr = asyncio.run(clients(url, 1, args.requests))
            thr1.append(thr)
            lat, thr = asyncio.run(clients(url, args.concurrency, args.requests * 2))
            lat16 += lat
            thr16.append(thr)
        health = http.get(base + "/health").json()
    finally:
        server.terminate()
        server.wait(timeout=30)
    f50, h50 = median(t_floor), median(t_http1)
    rows = [
        {"what": "in-process floor (encode + FAISS)", "clients": 1, "p50 ms": 1000 * f50,
         "p95 ms": 1000 * pct(t_floor, 95), "req/s": 1 / np.mean(t_floor), "ratio": "1 (baseline)"},
        {"what": "HTTP POST /search_images_by_text", "clients": 1, "p50 ms": 1000 * h50,
         "p95 ms": 1000 * pct(t_http1, 95), "req/s": median(thr1),
         "ratio": f"p50 {h50 / f50:.2f} x floor"},
        {"what": "HTTP POST /search_images_by_text", "clients": args.concurrency,
         "p50 ms": 1000 * median(lat16), "p95 ms": 1000 * pct(lat16, 95), "req/s": median(thr16),
         "ratio": f"throughput {median(thr16) / median(thr1):.2f} x 1 client"},
    ]
    print(f"index: {index.count} vectors ({index.manifest.get('index_type')}), text runtime "
          f"{args.text_runtime}, {args.rounds} rounds x {args.requests} requests; "
          f"service reports {health.get('model_id', '?')}\n")
    print(table(rows))
    save_json("query", {"rows": rows, "floor": t_floor, "http1": t_http1, "thr1": thr1,
                        "thr16": thr16})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
