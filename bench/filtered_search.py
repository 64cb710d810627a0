"""Filtered search inside the index: recall@10 against an exact filtered search and p50 against
the unfiltered p50 of the same index, in one run, at filters matching 50 %, 5 % and 0.5 % of
the photos.

    python bench/filtered_search.py [--n 1000000] [--milvus-n 100000] [--queries 200]
                                    [--backends faiss,milvus] [--checkpoint MODEL]

Data (as bench/faiss_scale.py makes it): the real image embeddings of the 1,000 Flickr8k dev
images repeated with noise (cosine ~0.8 to the source), queries the real text embeddings of dev
captions; each photo with metadata through the backend's own `rebuild(..., info=)`. Two kinds of
filter at each selectivity: a date range (independent of the picture) and folders (the 1,000
source images in 200 k-means groups, one folder each: a folder's photos look alike, as a trip's
do: the hard case for IVF, whose lists nearest the query may hold none of them). Truth: exact
inner product over the photos that pass. Latency: one query per call, one FAISS thread (as the API runs),
filtered and unfiltered alternated. Per query, as the API meets a filter: "cold" clears what
the version keeps per filter, then searches (the filter's first search); "count" then counts
the photos passing (the total an answer with a full page gives); then the filter's second
search (it counts and keeps the filter if nothing was kept) and "warm", the third (a person
paging or refining words under the same filter). Milvus: a real standalone server (deploy.local_milvus), HNSW as
MILVUS_INDEX_TYPE defaults, Bounded consistency.
"""
from __future__ import annotations

import argparse
import tempfile
import time
from datetime import datetime, timedelta, timezone

import numpy as np

from common import MODEL, header, median, save_json, table

FOLDERS = 200  # each about 0.5 % of the photos
SELECTIVITIES = (0.5, 0.05, 0.005)
T0 = datetime(2020, 1, 1, tzinfo=timezone.utc)
SPAN_S = 4 * 365 * 86400


def library(base: np.ndarray, n: int, seed: int = 0):
    import faiss
    from faiss_scale import synth

    vectors = synth(base, n, seed)  # row i is a noisy copy of base[i % len(base)]
    kmeans = faiss.Kmeans(base.shape[1], FOLDERS, niter=20, seed=seed, spherical=True)
    kmeans.train(base)
    group = kmeans.index.search(base, 1)[1][:, 0]  # each source image's folder
    folder = group[np.arange(n) % len(base)]
    rng = np.random.default_rng(seed)
    taken = T0.timestamp() + rng.uniform(0, SPAN_S, n)
    keys = [f"f{folder[i]:03d}/{i:07d}.jpg" for i in range(n)]
    # the rest as a phone library has it: a few cameras, a hundred places, a GPS fix each
    place = rng.integers(0, 100, n)
    camera = rng.integers(0, 8, n)
    lat = rng.uniform(-60, 70, 100)[place] + rng.normal(0, 0.05, n)
    lon = rng.uniform(-180, 180, 100)[place] + rng.normal(0, 0.05, n)
    size = rng.integers(800_000, 6_000_000, n)
    infos = [{"taken_at": float(taken[i]), "taken_at_source": "exif",
              "camera_make": f"Make {camera[i] % 3}", "camera_model": f"Model {camera[i]}",
              "lat": float(lat[i]), "lon": float(lon[i]), "city": f"City {place[i]}",
              "region": f"Region {place[i] // 4}", "country": f"Country {place[i] // 10}",
              "country_code": f"C{place[i] // 10}", "width": 4032, "height": 3024,
              "orientation": 1, "bytes": int(size[i]), "content_type": "image/jpeg",
              "folder": f"f{folder[i]:03d}"} for i in range(n)]
    return keys, vectors, infos, taken, folder


def folder_groups(folder: np.ndarray, fraction: float) -> list[int]:
    """Folders holding about `fraction` of the photos (whole folders, taken in a fixed
    shuffled order until the share is reached)."""
    sizes = np.bincount(folder, minlength=FOLDERS) / len(folder)
    chosen, share = [], 0.0
    for j in np.random.default_rng(3).permutation(FOLDERS):
        if share >= fraction * 0.9:
            break
        if sizes[j] and share + sizes[j] <= fraction * 1.5:
            chosen.append(int(j))
            share += sizes[j]
    return chosen


def filters(fraction: float, groups: list[int]):
    """(name, PhotoFilter) of each kind at this selectivity."""
    from indexer.photo_filter import PhotoFilter

    start = T0 + timedelta(seconds=SPAN_S * 0.1)
    date = PhotoFilter(taken_after=start, taken_before=start + timedelta(seconds=SPAN_S *
                                                                         fraction))
    return [("date", date), ("folder", PhotoFilter(folders=[f"f{j:03d}" for j in groups]))]


def passing_rows(where, taken, folder) -> np.ndarray:
    after, before = where.time_range()
    ok = np.ones(len(taken), bool)
    if after is not None:
        ok &= (taken >= after) & (taken < before)
    if where.folders is not None:
        ok &= np.isin(folder, [int(f[1:]) for f in where.folders])
    return np.flatnonzero(ok)


def exact_top(vectors, rows, queries, k=10):
    scores = queries @ vectors[rows].T
    top = np.argsort(-scores, axis=1)[:, :k]
    return rows[top]


def measure(view, keys, vectors, queries, taken, folder, clear_cache=None):
    out = []
    key_row = {k: i for i, k in enumerate(keys)}
    unfiltered = []
    for fraction in SELECTIVITIES:
        for kind, where in filters(fraction, folder_groups(folder, fraction)):
            rows = passing_rows(where, taken, folder)
            truth = exact_top(vectors, rows, queries)
            found, cold, second, warm, plain, count = [], [], [], [], [], []
            for q in queries:
                q = q[None, :]
                t = time.perf_counter()
                view.search(q, 10)
                plain.append(time.perf_counter() - t)
                if clear_cache is not None:
                    clear_cache()
                t = time.perf_counter()
                _, hits = view.search(q, 10, where=where)
                cold.append(time.perf_counter() - t)
                if clear_cache is not None:  # the total an answer with a full page gives
                    t = time.perf_counter()
                    view.count_matching(where)
                    count.append(time.perf_counter() - t)
                t = time.perf_counter()
                view.search(q, 10, where=where)
                second.append(time.perf_counter() - t)
                t = time.perf_counter()
                view.search(q, 10, where=where)
                warm.append(time.perf_counter() - t)
                found.append([key_row[k] for k in hits[0]])
            recall = np.mean([len(set(f) & set(t)) / 10 for f, t in zip(found, truth)])
            full = np.mean([len(f) == min(10, len(rows)) for f in found])
            unfiltered += plain
            out.append({"filter": kind, "matches": f"{len(rows) / len(keys):.1%}",
                        "recall@10 vs exact filtered": round(float(recall), 4),
                        "full pages": f"{full:.0%}",
                        "p50 ms unfiltered": 1000 * median(plain),
                        "p50 ms filtered (cold)": 1000 * median(cold),
                        "p50 ms count (cold)": 1000 * median(count) if count else None,
                        "p50 ms 2nd search": 1000 * median(second),
                        "p50 ms filtered (warm)": 1000 * median(warm),
                        "x unfiltered (cold)": round(median(cold) / median(plain), 2),
                        "x unfiltered (warm)": round(median(warm) / median(plain), 2)})
    return out


def run_faiss(base, queries, tuning, n, rows_out):
    import faiss

    from indexer.faiss_index import FaissIndex

    keys, vectors, infos, taken, folder = library(base, n)
    faiss.omp_set_num_threads(2)
    with tempfile.TemporaryDirectory(prefix="bench-filter-") as tmp:
        index = FaissIndex(tmp)
        t = time.perf_counter()
        index.rebuild("bench-model", keys, vectors, ["e"] * n, info=infos,
                      tuning_queries=tuning)
        build = time.perf_counter() - t
        t = time.perf_counter()
        view = index.view("bench-model")
        load = time.perf_counter() - t
        faiss.omp_set_num_threads(1)
        params = view.manifest["index_params"]
        print(f"FAISS {n:,} vectors: {params}, built in {build:.0f} s, loaded in {load:.1f} s")
        for row in measure(view, keys, vectors, queries, taken, folder,
                           clear_cache=view.forget_filters):
            rows_out.append({"backend": f"FAISS {params['kind']} {n:,}", **row})
        # after the searches: loading copies of the version leaves the allocator in a state
        # that slowed the cold searches measured after it 4x
        print(version_costs(index, view.version, n))


def version_costs(index, version: str, n: int) -> str:
    """Bytes of metadata per photo, and the load time of the version with its table against
    the same version without it (a copy less info.parquet, as versions were made before)."""
    import json
    import shutil

    from common import interleaved

    from indexer.repository import INFO_FILE

    vdir = index.repo.versions_dir / version
    bare = index.repo.versions_dir / (version + "-bare")
    shutil.copytree(vdir, bare)
    (bare / INFO_FILE).unlink()
    manifest = json.loads((bare / "manifest.json").read_text())
    del manifest["checksums"][INFO_FILE]
    (bare / "manifest.json").write_text(json.dumps(manifest))
    times = interleaved({"with": lambda: index.repo.load(version),
                         "without": lambda: index.repo.load(bare.name)}, rounds=3)
    size = (vdir / INFO_FILE).stat().st_size
    return (f"metadata: {size / n:.1f} bytes per photo ({size / 2**20:.1f} MiB); load "
            f"{median(times['with']):.2f} s with it, {median(times['without']):.2f} s without")


def run_milvus(base, queries, n, rows_out):
    from deploy.local_milvus import LocalMilvus
    from indexer.milvus_index import MilvusIndex

    keys, vectors, infos, taken, folder = library(base, n)
    with tempfile.TemporaryDirectory(prefix="bench-milvus-") as tmp:
        server = LocalMilvus(tmp).start()
        try:
            index = MilvusIndex(server.uri, prefix="bench_filter", timeout_s=60)
            t = time.perf_counter()
            index.rebuild("bench-model", keys, vectors, ["e"] * n, info=infos)
            print(f"Milvus {n:,} vectors: HNSW, written and indexed in "
                  f"{time.perf_counter() - t:.0f} s")
            view = index.view("bench-model")
            for row in measure(view, keys, vectors, queries, taken, folder):
                rows_out.append({"backend": f"Milvus HNSW {n:,}", **row})
            index.close()
        finally:
            server.stop()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1_000_000, help="FAISS vectors")
    p.add_argument("--milvus-n", type=int, default=100_000)
    p.add_argument("--queries", type=int, default=200)
    p.add_argument("--backends", default="faiss,milvus")
    p.add_argument("--checkpoint", default=MODEL)
    args = p.parse_args()
    header("Filtered search: inside the index, vs exact filtered search and unfiltered p50")
    from faiss_scale import embeddings

    base, queries, tuning = embeddings(args)
    rows: list[dict] = []
    backends = args.backends.split(",")
    if "faiss" in backends:
        run_faiss(base, queries, tuning, args.n, rows)
    if "milvus" in backends:
        run_milvus(base, queries, args.milvus_n, rows)
    print(table(rows))
    save_json("filtered_search", {"rows": rows, "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
