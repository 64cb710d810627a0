"""Compressed FAISS indexes with an exact re-rank: which one fits 10M photos on one machine?

    python bench/compressed_index.py [--sizes 1000000,10000000] [--queries 200]

The question of issue "Ten million photos on one machine" §1, measured before the index policy
chooses among them: for each candidate (a `faiss.index_factory` string), the index held in
memory (its serialized size: codes, ids, quantizers), recall@10 against exact search after
re-ranking the index's top R candidates exactly from full vectors kept on disk as fp16 and
memory-mapped, and the p50 of one query at one thread (search + re-rank), for nprobe x R.
Today's IVF-Flat is the baseline at the sizes where it fits in memory.

Data as `bench/faiss_scale.py` makes it: the real image embeddings of the 1,000 Flickr8k dev
photos, copied with Gaussian noise (cosine ~0.8 to the source), normalised; queries are real
caption embeddings. Generated in chunks (never all of it as float32 in memory): written once as
fp16 to a memory-mapped file, and the exact top 10 of every query found by a float32 scan over
the regenerated chunks, so the recall is against the float32 vectors, not their fp16 copy.
"""
from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from common import MODEL, header, median, pct, save_json, table
from faiss_scale import embeddings

CHUNK = 200_000
HNSW_EF = 128


def chunk(base: np.ndarray, start: int, end: int) -> np.ndarray:
    """Rows [start, end) of the synthetic collection, the same on every call."""
    rng = np.random.default_rng([7, start])
    sigma = 0.75 / np.sqrt(base.shape[1])  # noise norm 0.75 -> cosine ~0.8 to the source
    x = base[np.arange(start, end) % len(base)] + \
        sigma * rng.standard_normal((end - start, base.shape[1]), dtype=np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    return x


def chunks(n: int):
    for s in range(0, n, CHUNK):
        yield s, min(n, s + CHUNK)


def write_fp16(base: np.ndarray, n: int, path: Path) -> np.memmap:
    if path.exists():  # a run's vectors kept in --dir: the same rows (chunk() is deterministic)
        mm = np.load(path, mmap_mode="r")
        if mm.shape == (n, base.shape[1]):
            return mm
    mm = np.lib.format.open_memmap(path, "w+", np.float16, (n, base.shape[1]))
    for s, e in chunks(n):
        mm[s:e] = chunk(base, s, e)
    mm.flush()
    return np.load(path, mmap_mode="r")


def exact_top(base: np.ndarray, n: int, queries: np.ndarray, k: int = 10) -> np.ndarray:
    best_s = np.full((len(queries), k), -np.inf, np.float32)
    best_i = np.zeros((len(queries), k), np.int64)
    for s, e in chunks(n):
        sc = queries @ chunk(base, s, e).T
        top = np.argpartition(-sc, k, axis=1)[:, :k]
        cs = np.concatenate([best_s, np.take_along_axis(sc, top, 1)], 1)
        ci = np.concatenate([best_i, top + s], 1)
        keep = np.argsort(-cs, axis=1)[:, :k]
        best_s, best_i = np.take_along_axis(cs, keep, 1), np.take_along_axis(ci, keep, 1)
    return best_i


def build(spec: str, mm: np.memmap, nlist: int) -> tuple[faiss.Index, float]:
    d = mm.shape[1]
    index = faiss.index_factory(d, spec, faiss.METRIC_INNER_PRODUCT)
    ivf = faiss.extract_index_ivf(index)
    ivf.cp.niter = 10  # as the product's IVF (indexer.index_policy)
    quantizer = faiss.downcast_index(ivf.quantizer)
    if isinstance(quantizer, faiss.IndexHNSW):
        # HNSW's default efSearch (16) puts a vector in a list that is not its nearest often
        # enough to cap recall (0.87 at 10M, whatever nprobe and R): a wider search, adding
        # and searching
        quantizer.hnsw.efSearch = HNSW_EF
    if isinstance(index, faiss.IndexPreTransform):  # OPQ: 10 rounds, not 50 (minutes at 2 cores)
        opq = faiss.downcast_VectorTransform(index.chain.at(0))
        opq.niter = 10
    rng = np.random.default_rng(3)
    sample = np.asarray(mm[np.sort(rng.choice(len(mm), min(len(mm), 64 * nlist),
                                              replace=False))], np.float32)
    t = time.perf_counter()
    index.train(sample)
    for s, e in chunks(len(mm)):
        index.add(np.asarray(mm[s:e], np.float32))
    return index, time.perf_counter() - t


def search(index, mm, q, k, rerank):
    if not rerank:
        return index.search(q[None], k)[1][0]
    _, cand = index.search(q[None], rerank)
    rows = np.sort(cand[0][cand[0] >= 0])
    scores = np.asarray(mm[rows], np.float32) @ q
    return rows[np.argsort(-scores)[:k]]


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--sizes", default="1000000")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--nprobes", default="8,16,32,64")
    p.add_argument("--reranks", default="0,50,100,200")
    p.add_argument("--factories", default=None,
                   help="index_factory strings separated by ';' (default: by size)")
    p.add_argument("--dir", default=None, help="where the fp16 vectors and indexes go (kept "
                   "there and reused by the next run; default: a temporary folder)")
    args = p.parse_args()
    header("Compressed FAISS indexes + exact re-rank from fp16 on disk")
    base, queries, _ = embeddings(args)
    work = Path(args.dir or tempfile.mkdtemp(prefix="compressed-"))
    work.mkdir(parents=True, exist_ok=True)
    rows = []
    for n in [int(x) for x in args.sizes.split(",")]:
        nlist = 4096 if n <= 2_000_000 else 8192
        faiss.omp_set_num_threads(2)
        t = time.perf_counter()
        mm = write_fp16(base, n, work / f"vectors-{n}.npy")
        write_s = time.perf_counter() - t
        t = time.perf_counter()
        truth = exact_top(base, n, queries)
        print(f"{n:,} vectors: fp16 file {mm.nbytes / 2**30:.2f} GiB written in {write_s:.0f} s;"
              f" exact top 10 in {time.perf_counter() - t:.0f} s", flush=True)
        hnsw = "_HNSW32" if n > 2_000_000 else ""
        specs = args.factories.split(";") if args.factories else (
            [f"IVF{nlist},Flat", f"IVF{nlist},SQ8"] if n <= 2_000_000 else []) + [
            f"IVF{nlist}{hnsw},PQ32", f"OPQ32_256,IVF{nlist}{hnsw},PQ32",
            f"IVF{nlist}{hnsw},PQ64"]
        for spec in specs:
            index, build_s = build(spec, mm, nlist)
            path = work / f"{spec.replace(',', '_')}-{n}.faiss"
            faiss.write_index(index, str(path))
            size = path.stat().st_size
            print(f"  {spec}: built in {build_s:.0f} s, {size / 2**20:.0f} MiB", flush=True)
            faiss.omp_set_num_threads(1)  # one query, one thread: as the API runs
            ivf = faiss.extract_index_ivf(index)
            for nprobe in [int(x) for x in args.nprobes.split(",")]:
                ivf.nprobe = nprobe
                for rerank in [int(x) for x in args.reranks.split(",")]:
                    if rerank and "Flat" in spec:
                        continue
                    for q in queries[:5]:  # warm the pages the queries touch
                        search(index, mm, q, 10, rerank)
                    lat, found = [], []
                    for q in queries:
                        t = time.perf_counter()
                        found.append(search(index, mm, q, 10, rerank))
                        lat.append(time.perf_counter() - t)
                    recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
                    rows.append({"vectors": f"{n:,}", "index": spec, "nprobe": nprobe,
                                 "re-rank R": rerank or "-", "recall@10": round(recall, 3),
                                 "p50 ms": 1e3 * median(lat), "p95 ms": 1e3 * pct(lat, 95),
                                 "index MiB": size / 2**20, "build s": build_s})
                    print(f"    nprobe {nprobe:3d} R {rerank:4d}: recall {recall:.3f} "
                          f"p50 {1e3 * median(lat):.2f} ms", flush=True)
            faiss.omp_set_num_threads(2)
            del index
            path.unlink()
        rows.append({"vectors": f"{n:,}", "index": "fp16 vectors on disk (re-rank)",
                     "index MiB": mm.nbytes / 2**20})
        del mm
        if not args.dir:
            os.unlink(work / f"vectors-{n}.npy")
    print()
    print(table(rows))
    save_json("compressed_index", {"rows": rows, "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
