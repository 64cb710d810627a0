"""The compressed index as the product builds and serves it: a published FAISS version chosen by
the index policy under a memory budget (IVF-PQ + exact re-rank from fp16 vectors on disk)
against the IVF-Flat version it replaces, at the same size, in one run.

    python bench/compressed_version.py [--size 1000000] [--budget-mb 512] [--queries 200]

Collection: the 1,000 Flickr8k dev photos' real embeddings (ONNX image tower of the shipped
model), plus synthetic photos around them (bench/compressed_index.py's chunks: cosine ~0.8 to
a dev photo) up to --size; stored as the service stores them (the hubness-corrected model's
257 dimensions: embedding + bias column). Both versions are written by `FaissIndex.rebuild`
(nprobe tuned on the model's training-caption bank, as a rebuild does) and read back by
`FaissIndex.view` (memory-mapped), then searched through `IndexVersion.search` as the API does.

Reported per version: build time, files on disk (index.faiss is what a process holds of the
index: codes or vectors, ids, quantizers; vectors.npy sits in the page cache as memory allows),
the process's resident growth after loading and --queries single queries (anonymous, and
file-backed: mapped pages, shared by every process and evictable); p50/p95 of one query at one
thread (as the API searches) with the fp16 vectors in the page cache, and first with them
evicted from it (read from disk); recall@10 against exact float32 search for all 5,000 dev captions (real queries); and the
real-embedding check: the rank of each caption's own dev photo among the whole collection,
Recall@1/5/10 for exact search and for each version.
"""
from __future__ import annotations

import argparse
import gc
import os
import tempfile
import time
from pathlib import Path

import faiss
import numpy as np

from common import MODEL, header, median, pct, save_json, table
from compressed_index import chunk, chunks
from faiss_scale import dev_images


def rss_mb() -> dict[str, float]:
    """Resident MiB: anonymous (the process's own) and file-backed (mapped files' pages in the
    page cache, shared by every process mapping them)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(("RssAnon:", "RssFile:")):
            out[line.split(":")[0]] = int(line.split()[1]) / 1024
    return out


def evict(path: Path) -> None:
    """Drop a file's unmapped pages from the page cache (no-op for a missing file)."""
    if path.is_file():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def real_embeddings(checkpoint: str):
    """Dev photos' image embeddings, every dev caption's text embedding and its photo, the
    scoring (what an index stores), and the bank's tuning queries."""
    enc, dev, imgs = dev_images(checkpoint)
    texts, owner = dev.flat_captions()
    captions = np.concatenate([enc.encode_texts(texts[i:i + 256])
                               for i in range(0, len(texts), 256)])
    tuning = np.asarray(enc.scoring.bank[:300]) if enc.scoring.corrected else None
    return imgs, captions.astype(np.float32), np.asarray(owner), enc.scoring, tuning


def collection(base: np.ndarray, n: int, scoring) -> np.ndarray:
    """[n, index_dim] float32: the dev photos first, then synthetic ones, as stored."""
    out = np.empty((n, scoring.index_dim), np.float32)
    out[:len(base)] = scoring.image_vectors(base)
    for s, e in chunks(n):
        lo = max(s, len(base))
        if lo < e:
            out[lo:e] = scoring.image_vectors(chunk(base, lo, e))
    return out


def exact_top(x: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    faiss.omp_set_num_threads(2)
    _, rows = faiss.knn(queries, x, k, metric=faiss.METRIC_INNER_PRODUCT)
    return rows


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--size", type=int, default=1_000_000)
    p.add_argument("--budget-mb", type=int, default=512,
                   help="INDEX_MEMORY_MB of the compressed version (IVF-Flat: no budget)")
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--dir", default=None)
    p.add_argument("--skip-flat", action="store_true", help="only the compressed version "
                   "(10M: IVF-Flat's 10 GB would not fit beside the collection here)")
    args = p.parse_args()
    header("Compressed version (IVF-PQ + re-rank) vs IVF-Flat, as published and served")
    from indexer.faiss_index import FaissIndex

    base, captions, owner, scoring, tuning = real_embeddings(args.checkpoint)
    x = collection(base, args.size, scoring)
    keys = [f"p/{i:08d}" for i in range(args.size)]
    row_of_key = {k: i for i, k in enumerate(keys)}
    etags = ["e"] * args.size
    q_all = np.ascontiguousarray(scoring.query_vectors(captions), np.float32)
    pick = np.random.default_rng(1).choice(len(q_all), args.queries, replace=False)
    t = time.perf_counter()
    truth = exact_top(x, q_all, 10)
    print(f"{args.size:,} vectors of dim {x.shape[1]}; exact top 10 of {len(q_all)} captions "
          f"in {time.perf_counter() - t:.0f} s", flush=True)
    tuning_q = None if tuning is None else np.ascontiguousarray(scoring.query_vectors(tuning))

    def rank_recall(found_rows: np.ndarray) -> dict:
        """Recall@1/5/10 of each caption's own dev photo among the rows found."""
        hit = found_rows == owner[:, None]
        first = np.where(hit.any(axis=1), hit.argmax(axis=1), 99)
        return {f"R@{k}": round(100 * float(np.mean(first < k)), 2) for k in (1, 5, 10)}

    rows = [{"index": "exact float32 scan", **rank_recall(truth)}]
    work = Path(args.dir or tempfile.mkdtemp(prefix="compressed-version-"))
    kinds = (("IVF-Flat", 0),) * (not args.skip_flat) + (("IVF-PQ + re-rank", args.budget_mb),)
    for name, budget in kinds:
        folder = work / name.split()[0]
        backend = FaissIndex(folder, memory_mb=budget)
        faiss.omp_set_num_threads(2)
        t = time.perf_counter()
        backend.rebuild("bench", keys, x, etags, tuning_queries=tuning_q)
        build_s = time.perf_counter() - t
        gc.collect()
        before = rss_mb()
        view = backend.view("bench")
        vdir = backend.repo.versions_dir / view.version
        faiss.omp_set_num_threads(1)  # the API's one FAISS thread per query
        timed = {}
        for state in ("cold", "warm"):
            if state == "cold":  # the full vectors out of the page cache (read from disk)
                evict(vdir / "vectors.npy")
            times = timed[state] = []
            for i in pick:
                t = time.perf_counter()
                view.search(q_all[i:i + 1], 10)
                times.append((time.perf_counter() - t) * 1000)
        times = timed["warm"]
        after = rss_mb()  # loaded, and queried as a serving process is
        grown = {k: after[k] - before[k] for k in after}
        faiss.omp_set_num_threads(2)
        found = [r for s in range(0, len(q_all), 500) for r in view.search(q_all[s:s + 500], 10)[1]]
        found_rows = np.array([[row_of_key[k] for k in r] + [-1] * (10 - len(r))
                               for r in found])
        recall = float(np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found_rows, truth)]))
        files = {f.name: f.stat().st_size for f in vdir.iterdir()}
        params = view.manifest["index_params"]
        rows.append({
            "index": name, "factory": params.get("factory", f"IVF{params['nlist']},Flat"),
            "nprobe": params["nprobe"], "rerank": params.get("rerank", 0),
            "build s": round(build_s), "index.faiss MiB": round(files["index.faiss"] / 2**20),
            "vectors.npy MiB": round(files.get("vectors.npy", 0) / 2**20),
            "RSS anon MiB": round(grown["RssAnon"]), "RSS file MiB": round(grown["RssFile"]),
            "recall@10": round(recall, 4), "p50 ms": round(median(times), 2),
            "p95 ms": round(pct(times, 95), 2),
            "p50 ms, vectors cold": round(median(timed["cold"]), 2), **rank_recall(found_rows)})
        print(rows[-1], flush=True)
        del view, backend
        gc.collect()
    print(table(rows))
    save_json("compressed_version", {"size": args.size, "dim": int(x.shape[1]),
                                     "budget_mb": args.budget_mb, "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
