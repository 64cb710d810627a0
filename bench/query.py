"""Query path: POST /search_images_by_text over HTTP against the in-process floor (text encode +
FAISS search in one Python call, same runtime, same index), at 1 and at 16 concurrent clients.

    python bench/query.py [--n 1000] [--text-runtime onnx] [--requests 200] [--rounds 2]
                          [--load-requests 2000] [--baseline-tree DIR]

Builds an index of N Flickr8k images in a temp dir, starts the real service (`python -m
search_api`, one uvicorn worker) on a free port, then alternates: floor calls and 1-client HTTP
calls one by one (ratio of p50s), then blocks of --load-requests searches from 16 concurrent
clients (asyncio + keep-alive httpx, or raw HTTP/1.1 on asyncio streams, in this process) for
throughput, against the text tower's own limit (texts per second fed batches of 16 in-process, as
many texts, same rounds; also fed batches of 8, the most 16 clients get from the service's batcher,
which takes a long queue half at a time), with the CPU the server and the clients used meanwhile
(blocks of 2,000 searches, ~2 s: blocks of 400 moved ±5 % between runs). The 1-client calls go
through httpx and through a lean keep-alive client (the standard library's http.client): httpx's
own per-request work (~1.4 ms here) runs on the same 2 cores as the server and is not the
service's. The service reads IMAGE_RUNTIME / TEXT_RUNTIME like any deployment. --baseline-tree DIR
also starts the service of another checkout (cwd and PYTHONPATH DIR, same index, same environment,
another port) and measures it in the same rounds, interleaved (floor, this tree, baseline), so a
before/after comparison is one command.
"""
from __future__ import annotations

import argparse
import asyncio
import http.client
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import FLICKR, MODEL, ROOT, header, median, pct, save_json, table
from deploy.ports import free_port

QUERIES = ["two dogs playing in the snow", "a man rides a bicycle down a city street",
           "a little girl in a pink dress", "people sitting on a bench next to the water",
           "a black dog jumps over a log", "a surfer riding a big wave",
           "children playing soccer on a field", "a woman climbing a rock wall",
           "a brown dog runs through the grass", "a group of people stand in front of a building"]


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds a process has used (all its threads), from /proc."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class LeanClient:
    """One keep-alive connection through http.client: a client's least work per request."""

    def __init__(self, base: str):
        self.host, port = base.removeprefix("http://").split(":")
        self.port = int(port)
        self.reconnect()

    def reconnect(self) -> None:
        """A fresh connection (the service closes one idle past its keep-alive timeout)."""
        if getattr(self, "conn", None) is not None:
            self.conn.close()
        self.conn = http.client.HTTPConnection(self.host, self.port, timeout=60)

    def post(self, path: str, data) -> None:
        self.conn.request("POST", path, json.dumps(data), {"Content-Type": "application/json"})
        r = self.conn.getresponse()
        r.read()
        if r.status != 200:
            raise RuntimeError(f"{path}: HTTP {r.status}")


async def clients(base: str, n_clients: int, n_requests: int) -> tuple[list[float], float]:
    """(latencies, req/s) of n_requests searches from n_clients concurrent keep-alive httpx
    clients against the service at `base`."""
    import httpx

    lat: list[float] = []
    todo = iter(range(n_requests))
    limits = httpx.Limits(max_connections=n_clients, max_keepalive_connections=n_clients)
    async with httpx.AsyncClient(limits=limits, timeout=60) as client:
        async def worker(w):
            for i in todo:
                q = QUERIES[(i + w) % len(QUERIES)]
                t = time.perf_counter()
                r = await client.post(base + "/search_images_by_text",
                                      json={"query": q, "top_k": 10})
                lat.append(time.perf_counter() - t)
                r.raise_for_status()
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(w) for w in range(n_clients)))
        wall = time.perf_counter() - t0
    return lat, n_requests / wall


async def lean_clients(base: str, n_clients: int, n_requests: int) -> tuple[list[float], float]:
    """`clients` through raw keep-alive HTTP/1.1 on asyncio streams (the requests written
    ahead, the answers read by their Content-Length): a load generator's least work per
    request, so the cores it shares with the server go to the server."""
    host, port = base.removeprefix("http://").split(":")
    requests = []
    for q in QUERIES:
        body = json.dumps({"query": q, "top_k": 10}).encode()
        requests.append(b"POST /search_images_by_text HTTP/1.1\r\nHost: %s\r\n"
                        b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                        % (host.encode(), len(body), body))
    lat: list[float] = []
    todo = iter(range(n_requests))

    async def worker(w):
        reader, writer = await asyncio.open_connection(host, int(port))
        try:
            for i in todo:
                t = time.perf_counter()
                writer.write(requests[(i + w) % len(requests)])
                head = await reader.readuntil(b"\r\n\r\n")
                status = head.split(b" ", 2)[1]
                length = int(head.lower().split(b"content-length:", 1)[1].split(b"\r\n", 1)[0])
                await reader.readexactly(length)
                lat.append(time.perf_counter() - t)
                if status != b"200":
                    raise RuntimeError(f"HTTP {status.decode()}")
        finally:
            writer.close()

    t0 = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(n_clients)))
    return lat, n_requests / (time.perf_counter() - t0)


# the 16 clients' load generators, each run in turn on every tree
GENERATORS = {"httpx": clients, "lean asyncio client": lean_clients}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--text-runtime", default="onnx")
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--load-requests", type=int, default=2000,
                   help="searches per block of --concurrency clients (and texts the tower "
                        "encodes for its limit)")
    p.add_argument("--baseline-tree", default=None,
                   help="another checkout whose service is measured side by side")
    args = p.parse_args()
    header("query path: HTTP vs in-process floor")

    import faiss
    import httpx

    from encoder import Encoder, load_checkpoint
    from indexer import pipeline
    from indexer.faiss_index import FaissIndex
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
    pipeline.rebuild(store, enc, FaissIndex(repo), "flickr8k/images/", progress=False)
    index = repo.load()
    enc.warmup()

    env = {**os.environ, "MODEL_PATH": args.checkpoint, "INDEX_DIR": str(work / "index"),
           "STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(work / "store"),
           "MINIO_BUCKET": "flickr8k", "IMAGE_RUNTIME": "onnx", "TEXT_RUNTIME": args.text_runtime,
           "ONNX_CACHE_DIR": cache}
    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    servers, urls = [], {}
    try:
        for name, tree in trees.items():
            port = free_port()
            servers.append(subprocess.Popen(
                [sys.executable, "-m", "search_api", "--port", str(port), "--log-level",
                 "warning"], env={**env, "PYTHONPATH": str(tree)}, cwd=tree))
            urls[name] = f"http://127.0.0.1:{port}"
        for server, base in zip(servers, urls.values()):
            for _ in range(600):
                try:
                    if httpx.get(base + "/health", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                if server.poll() is not None:
                    raise SystemExit(f"the service at {base} did not start")
                time.sleep(0.5)
        search = {name: base + "/search_images_by_text" for name, base in urls.items()}
        faiss.omp_set_num_threads(1)

        def floor(q):
            v = enc.encode_texts([q])
            v = enc.scoring.query_vectors(v)
            return index.search(v, 10)

        http = httpx.Client(timeout=60)
        lean = {name: LeanClient(base) for name, base in urls.items()}
        for q in QUERIES:  # warm every path
            floor(q)
            for name, url in search.items():
                http.post(url, json={"query": q, "top_k": 10}).raise_for_status()
                lean[name].post("/search_images_by_text", {"query": q, "top_k": 10})
        t_floor = []
        t_http1 = {name: [] for name in search}
        t_lean1 = {name: [] for name in search}
        tower16 = []  # texts/s of the text tower fed batches of 16, in-process
        tower_half = []  # the same fed batches of 8
        thr1 = {name: [] for name in search}
        # 16 clients per load generator: latencies, req/s and the CPU the server and this
        # (client) process used meanwhile, per block
        load16 = {(name, gen): {"lat": [], "thr": [], "server": [], "clients": []}
                  for name in search for gen in GENERATORS}
        for _ in range(args.rounds):
            for client in lean.values():
                client.reconnect()
            for i in range(args.requests):
                q = QUERIES[i % len(QUERIES)]
                t = time.perf_counter()
                floor(q)
                t_floor.append(time.perf_counter() - t)
                for name, url in search.items():  # floor, this tree, baseline, floor, ...
                    t = time.perf_counter()
                    http.post(url, json={"query": q, "top_k": 10}).raise_for_status()
                    t_http1[name].append(time.perf_counter() - t)
                    t = time.perf_counter()
                    lean[name].post("/search_images_by_text", {"query": q, "top_k": 10})
                    t_lean1[name].append(time.perf_counter() - t)
            batch = [QUERIES[i % len(QUERIES)] for i in range(args.concurrency)]
            batches = max(1, args.load_requests // args.concurrency)
            t = time.perf_counter()
            for _ in range(batches):
                enc.encode_texts(batch)
            tower16.append(batches * len(batch) / (time.perf_counter() - t))
            # the same texts in batches of half as many: what the service's text batcher
            # gives 16 waiting clients (a long queue is taken half at a time), so the most
            # they can get with the tower always busy
            half = batch[:max(1, len(batch) // 2)]
            t = time.perf_counter()
            for _ in range(batches * len(batch) // len(half)):
                enc.encode_texts(half)
            tower_half.append(batches * len(batch) / (time.perf_counter() - t))
            for name, server in zip(search, servers):
                # 1-client throughput: back-to-back requests, nothing else in between
                lat, thr = asyncio.run(clients(urls[name], 1, args.requests))
                thr1[name].append(thr)
                for gen, run in GENERATORS.items():
                    out = load16[name, gen]
                    before = cpu_seconds(server.pid), time.process_time(), time.perf_counter()
                    lat, thr = asyncio.run(run(urls[name], args.concurrency,
                                               args.load_requests))
                    wall = time.perf_counter() - before[2]
                    out["server"].append((cpu_seconds(server.pid) - before[0]) / wall)
                    out["clients"].append((time.process_time() - before[1]) / wall)
                    out["lat"] += lat
                    out["thr"].append(thr)
        health = http.get(urls["this tree"] + "/health").json()
    finally:
        for server in servers:
            server.terminate()
        for server in servers:
            server.wait(timeout=30)
    f50 = median(t_floor)
    limit = median(tower16)
    rows = [
        {"what": "in-process floor (encode + FAISS)", "clients": 1, "p50 ms": 1000 * f50,
         "p95 ms": 1000 * pct(t_floor, 95), "req/s": 1 / np.mean(t_floor), "ratio": "1 (baseline)"},
        {"what": f"text tower alone, batches of {args.concurrency}, in-process", "clients": "-",
         "p50 ms": "-", "p95 ms": "-", "req/s": limit, "ratio": "1 (throughput baseline)"},
        {"what": f"text tower alone, batches of {max(1, args.concurrency // 2)}, in-process",
         "clients": "-", "p50 ms": "-", "p95 ms": "-", "req/s": median(tower_half),
         "ratio": f"{median(tower_half) / limit:.2f} x: the most {args.concurrency} clients "
                  "get from batches of half of them"}]
    for name in search:
        h50, l50 = median(t_http1[name]), median(t_lean1[name])
        rows += [
            {"what": f"HTTP POST /search_images_by_text ({name}), httpx", "clients": 1,
             "p50 ms": 1000 * h50, "p95 ms": 1000 * pct(t_http1[name], 95),
             "req/s": median(thr1[name]), "ratio": f"p50 {h50 / f50:.2f} x floor"},
            {"what": f"HTTP POST /search_images_by_text ({name}), http.client", "clients": 1,
             "p50 ms": 1000 * l50, "p95 ms": 1000 * pct(t_lean1[name], 95),
             "req/s": 1 / np.mean(t_lean1[name]), "ratio": f"p50 {l50 / f50:.2f} x floor"}]
        for gen in GENERATORS:
            out = load16[name, gen]
            rows.append(
                {"what": f"HTTP POST /search_images_by_text ({name}), {gen}",
                 "clients": args.concurrency, "p50 ms": 1000 * median(out["lat"]),
                 "p95 ms": 1000 * pct(out["lat"], 95), "req/s": median(out["thr"]),
                 "ratio": f"throughput {median(out['thr']) / limit:.2f} x the tower's limit "
                          f"(CPU: server {median(out['server']):.2f}, clients "
                          f"{median(out['clients']):.2f} of 2 cores)"})
    print(f"index: {index.count} vectors ({index.manifest.get('index_type')}), text runtime "
          f"{args.text_runtime}, {args.rounds} rounds x {args.requests} requests, "
          f"{args.concurrency}-client blocks of {args.load_requests}, "
          f"trees: {', '.join(f'{k}={v}' for k, v in trees.items())}; "
          f"service reports {health.get('model_id', '?')}\n")
    print(table(rows))
    save_json("query", {"rows": rows, "floor": t_floor, "http1": t_http1, "lean1": t_lean1,
                        "thr1": thr1, "tower16": tower16, "tower_half": tower_half,
                        "load16": {f"{name}, {gen}": v for (name, gen), v in load16.items()}})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
