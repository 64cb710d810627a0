"""The Milvus backend next to FAISS, in one run on this machine (ratios are what to read).

    python bench/milvus_backend.py [--n 100000] [--requests 300] [--skip-scale]
    python bench/milvus_backend.py --skip-query-path --big 1000000 [--milvus-index IVF_FLAT]

1. Query path: N vectors published into both backends under the shipped model's id; two real
   services (`python -m search_api`, INDEX_BACKEND=faiss and =milvus) on a real Milvus
   standalone (deploy/local_milvus.py); POST /search_images_by_text, 1 client (p50) and 16
   concurrent clients (throughput), alternating between the two services.
2. Scale: --big vectors in Milvus (--milvus-index: IVF_FLAT by default, IVF_SQ8 or HNSW) and in
   FAISS (IVF as index_policy picks it); each searched at the smallest nprobe (HNSW: ef) whose
   recall@10 against exact search on --queries queries reaches --recall (0.95): build time,
   recall, p50 of one query (direct calls, no HTTP, one FAISS thread as the API), searches per
   second from --clients threads, memory
   (Milvus: the server's RSS growth and its index files; FAISS: the index's bytes).

Vectors: clustered unit vectors of the model's index dimension (random centres, each copied with
noise of cosine ~0.8, as bench/faiss_scale.py does around real embeddings): neighbours are
meaningful, unlike uniform random vectors where every method fails alike.
"""
from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, header, save_json, table
from load_test import run_load, start_service
from deploy.ports import free_port
from search_api.testing import rss_mb

sys.path.insert(0, str(ROOT))


def clustered(n: int, dim: int, centres: int = 5000, seed: int = 0,
              centre_seed: int | None = None) -> np.ndarray:
    """n unit vectors around `centres` random centres (centre_seed, default seed), noise from
    seed: queries drawn with the data's centre_seed and another seed fall near the data."""
    base_rng = np.random.default_rng(seed if centre_seed is None else centre_seed)
    base = base_rng.standard_normal((centres, dim)).astype(np.float32)
    base /= np.linalg.norm(base, axis=1, keepdims=True)
    rng = np.random.default_rng(seed)
    out = np.empty((n, dim), np.float32)
    sigma = 0.75 / np.sqrt(dim)
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        chunk = base[rng.integers(0, centres, e - s)] + \
            sigma * rng.standard_normal((e - s, dim), dtype=np.float32)
        out[s:e] = chunk / np.linalg.norm(chunk, axis=1, keepdims=True)
    return out


def exact_top(vectors: np.ndarray, queries: np.ndarray, k: int = 10) -> np.ndarray:
    """Exact top-k ids by inner product, in chunks of 100k vectors (bounded memory)."""
    best_s = np.full((len(queries), 0), -np.inf, np.float32)
    best_i = np.zeros((len(queries), 0), np.int64)
    for s in range(0, len(vectors), 100_000):
        sc = queries @ vectors[s:s + 100_000].T
        part = np.argpartition(-sc, min(k, sc.shape[1] - 1), axis=1)[:, :k]
        best_s = np.concatenate([best_s, np.take_along_axis(sc, part, 1)], axis=1)
        best_i = np.concatenate([best_i, part + s], axis=1)
        keep = np.argsort(-best_s, axis=1, kind="stable")[:, :k]
        best_s, best_i = np.take_along_axis(best_s, keep, 1), np.take_along_axis(best_i, keep, 1)
    return best_i


def recall(found: list[list[int]], truth: np.ndarray, k: int = 10) -> float:
    return float(np.mean([len(set(f[:k]) & set(t[:k].tolist())) / k
                          for f, t in zip(found, truth)]))


def p50_ms(fn, queries: np.ndarray) -> float:
    fn(queries[:1])
    lat = []
    for q in queries:
        t = time.perf_counter()
        fn(q[None, :])
        lat.append(time.perf_counter() - t)
    return round(float(np.median(lat)) * 1000, 2)


def throughput(fn, queries: np.ndarray, clients: int, total: int) -> float:
    """Searches per second with `clients` threads each sending one query at a time (as the
    API's concurrent requests reach the index), `total` in all."""
    from concurrent.futures import ThreadPoolExecutor

    def client(c: int) -> None:
        for i in range(c, total, clients):
            fn(queries[i % len(queries)][None, :])

    fn(queries[:1])
    t = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        list(pool.map(client, range(clients)))
    return round(total / (time.perf_counter() - t), 1)


def settle(index, collection: str, quiet_s: float, limit_s: float) -> float | str:
    """Wait until the server's background work on a fresh collection is over: the loaded
    segments unchanged and no row waiting for the vector index for quiet_s (compaction merges
    the small fresh segments and indexes the merged ones again). Seconds waited."""
    t0 = last_change = time.monotonic()
    last = None
    while time.monotonic() - t0 < limit_s:
        segs = tuple(sorted(x.segment_id for x in index.client.list_loaded_segments(collection)))
        info = index.client.describe_index(collection, "vector")
        state = (segs, int(info.get("pending_index_rows", 0)))
        if state != last or state[1]:
            last, last_change = state, time.monotonic()
        elif time.monotonic() - last_change >= quiet_s:
            waited = round(last_change - t0)
            print(f"Milvus: settled {waited} s after publish ({len(segs)} segments)",
                  flush=True)
            return waited
        time.sleep(5)
    return f"> {limit_s:.0f} (not settled)"


def query_path(args, milvus, model_path, model_id, dim, work: Path) -> list[dict]:
    from indexer.faiss_index import FaissIndex
    from indexer.milvus_index import MilvusIndex

    vecs = clustered(args.n, dim)
    keys = [f"flickr8k/images/synthetic_{i:07d}.jpg" for i in range(args.n)]
    etags = ["0" * 32] * args.n
    t = time.perf_counter()
    FaissIndex(work / "index").rebuild(model_id, keys, vecs, etags)
    print(f"FAISS: {args.n} vectors published in {time.perf_counter() - t:.1f} s", flush=True)
    t = time.perf_counter()
    MilvusIndex(milvus.uri, prefix="bench").rebuild(model_id, keys, vecs, etags)
    print(f"Milvus: {args.n} vectors published in {time.perf_counter() - t:.1f} s", flush=True)
    common = {"MODEL_PATH": str(model_path), "INDEX_DIR": str(work / "index"),
              "LOCAL_STORE_DIR": str(work / "store"), "STORE_BACKEND": "local"}
    services = {}
    for name, extra in (("faiss", {"INDEX_BACKEND": "faiss"}),
                        ("milvus", {"INDEX_BACKEND": "milvus", "MILVUS_URI": milvus.uri,
                                    "MILVUS_COLLECTION_PREFIX": "bench"})):
        port = free_port()
        services[name] = (start_service(common, port, extra), f"http://127.0.0.1:{port}")
    results = {name: {"p50": [], "rps": [], "search": []} for name in services}
    try:
        for _ in range(args.rounds):  # alternate, so drifts of the machine hit both alike
            for name, (_, url) in services.items():
                one = asyncio.run(run_load(url, args.requests, 1, 10, warmup=5))
                many = asyncio.run(run_load(url, args.requests, 16, 10, warmup=5))
                assert one["errors"] == many["errors"] == 0, (one, many)
                results[name]["p50"].append(one["latency_ms"]["p50"])
                results[name]["rps"].append(many["throughput_rps"])
                # the search stage inside the service (mean since its start, from /metrics)
                results[name]["search"].append(
                    one["server_stages"].get("index_search_mean_ms", float("nan")))
    finally:
        for proc, _ in services.values():
            proc.terminate()
            proc.wait(30)
    rows = []
    for name, r in results.items():
        rows.append({"backend": name, "vectors": args.n,
                     "HTTP p50 ms (1 client)": float(np.median(r["p50"])),
                     "req/s (16 clients)": float(np.median(r["rps"])),
                     "search stage ms (server mean, 1 client)": r["search"][-1]})
    f, m = results["faiss"], results["milvus"]
    p50_ratios = [round(a / b, 2) for a, b in zip(m["p50"], f["p50"])]
    rps_ratios = [round(a / b, 2) for a, b in zip(m["rps"], f["rps"])]
    print(f"per round: FAISS p50 {f['p50']} req/s {f['rps']}; Milvus p50 {m['p50']} "
          f"req/s {m['rps']}; ratios p50 {p50_ratios}, req/s {rps_ratios}", flush=True)
    rows.append({"backend": "milvus / faiss (median of per-round ratios)", "vectors": "",
                 "HTTP p50 ms (1 client)": float(np.median(p50_ratios)),
                 "req/s (16 clients)": float(np.median(rps_ratios)),
                 "search stage ms (server mean, 1 client)": ""})
    return rows


def smallest_reaching(target: float, settings: list[int], measure) -> tuple[int, float]:
    """The first setting (ascending) whose recall reaches the target, and that recall (the
    last one tried when none does)."""
    for value in settings:
        r = measure(value)
        print(f"    {value}: recall@10 {r:.3f}", flush=True)
        if r >= target:
            return value, r
    return value, r


def dir_mb(path: Path, part: str) -> float:
    """Size of the files under `path` whose path contains `part` (Milvus's index files)."""
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file() and part in str(f)) / 2**20


def scale(args, milvus, dim: int) -> list[dict]:
    """--big vectors in Milvus (--milvus-index) and in FAISS IVF (index_policy's choice), each
    searched at the smallest nprobe (ef for HNSW) whose recall@10 on the queries reaches
    --recall: p50 at the same recall, build time, memory."""
    import faiss

    from indexer.index_policy import build_index, ivf_or_none
    from indexer.milvus_index import MilvusIndex

    faiss.omp_set_num_threads(1)  # as the API searches (one thread per query)
    t = time.perf_counter()
    vecs = clustered(args.big, dim, seed=1)
    queries = clustered(args.queries, dim, seed=2, centre_seed=1)  # near the data, not in it
    truth = exact_top(vecs, queries)
    print(f"{args.big} vectors, {args.queries} queries, exact top-10 in "
          f"{time.perf_counter() - t:.0f} s", flush=True)
    keys = [f"k{i:08d}" for i in range(args.big)]
    rows = []

    kind = args.milvus_index
    base_rss = rss_mb(milvus.pid)
    index = MilvusIndex(milvus.uri, prefix="bench_big", index_type=kind, nlist=args.nlist,
                        search_ef=args.ef, index_wait_s=7200, timeout_s=30)
    t = time.perf_counter()
    version = index.begin("bench-model", dim)
    index.write(version, keys, vecs, ["e"] * args.big)
    insert_s = time.perf_counter() - t
    print(f"Milvus: {args.big} rows upserted in {insert_s:.0f} s", flush=True)
    index.publish(version)  # flush, wait for the index on every sealed segment, load, alias
    build_s = time.perf_counter() - t
    print(f"Milvus: flushed, indexed ({kind}) and loaded after {build_s:.0f} s", flush=True)
    view = index.view("bench-model")
    fresh_p50 = p50_ms(lambda q: view.search(q, 10), queries[:50])
    settle_s = settle(index, view.collection, args.settle, args.settle_limit)
    rss = rss_mb(milvus.pid)
    try:  # what the query node holds: sealed segments, each with its own index
        loaded = index.client.list_loaded_segments(view.collection)
        segments = f"{len(loaded)} segments of {min(x.num_rows for x in loaded)}-" \
            f"{max(x.num_rows for x in loaded)} rows, loaded size " \
            f"{sum(x.mem_size for x in loaded) / 2**20:.0f} MB"
    except Exception as exc:  # noqa: BLE001 (informative only)
        segments = f"segments: {type(exc).__name__}"
    print(f"Milvus: {segments}", flush=True)

    def milvus_recall(value: int) -> float:
        if kind == "HNSW":
            index.search_ef = value
        else:
            index.nprobe = value
        found = [[int(k[1:]) for k in row] for row in view.search(queries, 10)[1]]
        return recall(found, truth)

    knob = "ef" if kind == "HNSW" else "nprobe"
    print(f"Milvus {kind}: {knob} sweep", flush=True)
    value, rec = smallest_reaching(args.recall, [16, 32, 64, 128, 256] if kind == "HNSW" else
                                   [4, 8, 16, 32, 64, 128], milvus_recall)
    milvus_recall(value)  # searches below use it
    params = f"M 16, efConstruction 200, ef {value}" if kind == "HNSW" else \
        f"nlist {args.nlist} per segment, nprobe {value}"
    rows.append({"engine": f"Milvus {kind} ({params})", "vectors": args.big,
                 "build s": f"{build_s:.0f} (insert {insert_s:.0f})",
                 "recall@10": round(rec, 3),
                 "p50 ms": p50_ms(lambda q: view.search(q, 10), queries),
                 f"{args.clients} clients q/s": throughput(lambda q: view.search(q, 10), queries,
                                                           args.clients, args.throughput_n),
                 "p50 ms right after publish": fresh_p50,
                 "settled after s": settle_s,
                 "memory MB": f"{rss - base_rss:.0f} RSS growth; index files "
                              f"{dir_mb(milvus.base_dir, 'index_files'):.0f}",
                 "segments": segments})
    print(table(rows), flush=True)
    index.client.drop_collection(view.collection)

    t = time.perf_counter()
    built, params = build_index(vecs, np.arange(args.big, dtype=np.int64))
    build_s = time.perf_counter() - t
    ivf = ivf_or_none(built)
    if ivf is not None:
        def faiss_recall(value: int) -> float:
            ivf.nprobe = value
            return recall(built.search(queries, 10)[1].tolist(), truth)

        print(f"FAISS IVF nlist {params['nlist']}: nprobe sweep", flush=True)
        value, rec = smallest_reaching(args.recall, [2, 4, 8, 12, 16, 24, 32, 64],
                                       faiss_recall)
        faiss_recall(value)
        name = f"FAISS IVFFlat (nlist {params['nlist']}, nprobe {value}; policy tuned " \
            f"{params['nprobe']})"
    else:
        rec, name = recall(built.search(queries, 10)[1].tolist(), truth), "FAISS flat (exact)"
    rows.append({"engine": name, "vectors": args.big, "build s": f"{build_s:.0f}",
                 "recall@10": round(rec, 3),
                 "p50 ms": p50_ms(lambda q: built.search(q, 10), queries),
                 f"{args.clients} clients q/s": throughput(lambda q: built.search(q, 10), queries,
                                                           args.clients, args.throughput_n),
                 "memory MB": f"{args.big * (dim * 4 + 8) / 2**20:.0f} (vectors + ids)",
                 "segments": "one index"})
    return rows


def start_milvus(cls, tmp: Path, attempts: int = 3):
    """A server, retried when it does not answer its health check in time (a loaded machine,
    another Milvus starting at the same moment): the log's last lines say what it was doing."""
    for attempt in range(1, attempts + 1):
        milvus = cls(tmp / f"milvus-{attempt}")
        try:
            return milvus.start()
        except TimeoutError as exc:
            log = milvus.base_dir / "logs" / "milvus-stdout.log"
            tail = log.read_text(errors="replace").splitlines()[-5:] if log.is_file() else []
            print(f"Milvus start {attempt}: {exc}; log ends with:", *tail, sep="\n  ",
                  flush=True)
            milvus.stop()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=100_000)
    p.add_argument("--big", type=int, default=1_000_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--requests", type=int, default=300)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--ef", type=int, default=64)
    p.add_argument("--milvus-index", default="IVF_FLAT", choices=["IVF_FLAT", "IVF_SQ8", "HNSW"],
                   help="the index type of the --big run")
    p.add_argument("--nlist", type=int, default=1024, help="IVF lists per Milvus segment")
    p.add_argument("--recall", type=float, default=0.95, help="the recall@10 both must reach")
    p.add_argument("--clients", type=int, default=16,
                   help="scale: concurrent searching threads of the throughput figure")
    p.add_argument("--throughput-n", type=int, default=1600,
                   help="scale: searches of the throughput figure")
    p.add_argument("--settle", type=float, default=120,
                   help="scale: seconds without segment changes that count as settled")
    p.add_argument("--settle-limit", type=float, default=1800,
                   help="scale: stop waiting for the server to settle after this many seconds")
    p.add_argument("--skip-query-path", action="store_true")
    p.add_argument("--skip-scale", action="store_true")
    p.add_argument("--checkpoint", default=str(ROOT / "models" / "flickr8k-dual-encoder.pt"),
                   help="copied first: a checkpoint rewritten during the run changes nothing")
    args = p.parse_args()
    header("Milvus backend vs FAISS")
    from encoder import Scoring, load_checkpoint
    from deploy.local_milvus import LocalMilvus

    out = {}
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as tmp:
        model_path = Path(tmp) / "model.pt"
        shutil.copyfile(args.checkpoint, model_path)
        loaded = load_checkpoint(str(model_path))
        model_id, dim = loaded.model_id, Scoring.of(loaded.model).index_dim
        print(f"model {model_id}, index dimension {dim}", flush=True)
        milvus = start_milvus(LocalMilvus, Path(tmp))
        try:
            if not args.skip_query_path:
                out["query_path"] = query_path(args, milvus, model_path, model_id, dim,
                                               Path(tmp))
                print(table(out["query_path"]), flush=True)
            if not args.skip_scale:
                out["scale"] = scale(args, milvus, dim)
                print(table(out["scale"]), flush=True)
        finally:
            milvus.stop()
    save_json("milvus_backend", out)
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    sys.exit(main())
