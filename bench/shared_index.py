"""Several processes serving one FAISS version: what each added process costs the machine, with
versions memory-mapped from their file (how IndexRepository.load reads them) against read into
each process's own memory (how it read them before, and what `writable_index` still does);
for a flat version also mapped as an IndexIDMap2 (how `load` served it before it dropped
FAISS's per-process id -> position map: "mapped-idmap2").

    python bench/shared_index.py [--n 1000000] [--kind flat] [--processes 3]

One version of N synthetic unit vectors (dimension 256, the model's; the values do not change
what memory holds) is published in a temp dir. Per mode, reader processes are started one after
another; each loads the version, runs 20 searches (a flat scan touches every page; an IVF index
is probed with nprobe = nlist for the same reason; "mapped" searches through the loaded
version and reads each hit's last component back, as the API does) and waits. After each
start: the machine's used memory (MemTotal - MemAvailable: file pages that can be dropped count
as available) and the readers' summed Pss (proportional set size: a page shared by k processes
counts 1/k in each, so the sum is what the readers hold together, shared file pages included).
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import header, save_json, table  # noqa: E402

READER = r"""
import sys, time
import numpy as np
import faiss
from indexer.repository import IndexRepository
from indexer.index_policy import ivf_or_none
repo, mode = IndexRepository(sys.argv[1]), sys.argv[2]
version = repo.current_version()
served = None
if mode == "mapped":  # as the API serves it: searched through the version, hits read back
    served = repo.load(version)
    index = served.index
elif mode == "mapped-idmap2":  # a flat version as loaded before: IndexIDMap2, whose read
    repo.load(version)  # builds an id -> position hash map in each process
    index = faiss.read_index(str(repo.versions_dir / version / "index.faiss"),
                             faiss.IO_FLAG_MMAP_IFC)
else:
    index = repo.writable_index(version)
ivf = ivf_or_none(index)
if ivf is not None:
    ivf.nprobe = ivf.nlist
faiss.omp_set_num_threads(1)
q = np.random.default_rng(0).normal(size=(20, index.d)).astype(np.float32)
for row in q:
    if served is not None:
        served.search(row[None], 10, readback=index.d - 1)
    else:
        index.search(row[None], 10)
print("ready", flush=True)
time.sleep(3600)
"""


def meminfo() -> dict[str, int]:
    with open("/proc/meminfo") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f}


def used_bytes() -> int:
    m = meminfo()
    return m["MemTotal"] - m["MemAvailable"]


def pss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def publish(root: Path, n: int, kind: str, dim: int = 256) -> int:
    from indexer.index_policy import build_index, choose_index
    from indexer.repository import IndexRepository

    rng = np.random.default_rng(0)
    vecs = rng.normal(size=(n, dim)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(n, dtype=np.int64)
    spec = choose_index(n, dim, flat_max_madds=(n * dim if kind == "flat" else 0))
    from dataclasses import replace
    index, params = build_index(vecs, ids, replace(spec, nprobe=8) if spec.kind == "ivf" else spec)
    keys = [f"p/{i}.jpg" for i in range(n)]
    IndexRepository(root).commit_version(index, ids, keys, ["e"] * n, "m",
                                         extra={"index_params": params})
    return (root / "versions" / IndexRepository(root).current_version() / "index.faiss").stat().st_size


def measure(root: Path, mode: str, processes: int) -> list[dict]:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    procs, rows = [], []
    time.sleep(1)
    base = used_bytes()
    try:
        for k in range(1, processes + 1):
            p = subprocess.Popen([sys.executable, "-c", READER, str(root), mode], env=env,
                                 stdout=subprocess.PIPE, text=True)
            procs.append(p)
            assert p.stdout.readline().strip() == "ready", "a reader failed"
            time.sleep(1)
            rows.append({"mode": mode, "processes": k, "used_mb": (used_bytes() - base) / 2**20,
                         "pss_mb": sum(pss_bytes(q.pid) for q in procs) / 2**20})
    finally:
        for p in procs:
            p.kill()
            p.wait()
    return rows


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=1_000_000)
    ap.add_argument("--kind", choices=("flat", "ivf"), default="flat")
    ap.add_argument("--processes", type=int, default=3)
    args = ap.parse_args()
    header("Several processes serving one FAISS version")
    with tempfile.TemporaryDirectory(prefix="shared-index-") as tmp:
        t0 = time.perf_counter()
        size = publish(Path(tmp), args.n, args.kind)
        print(f"published {args.n} vectors ({args.kind}): index.faiss {size / 2**20:.0f} MiB "
              f"in {time.perf_counter() - t0:.0f} s", flush=True)
        rows = []
        modes = ("in-memory", "mapped-idmap2", "mapped") if args.kind == "flat" else \
            ("in-memory", "mapped")
        for mode in modes:
            rows += measure(Path(tmp), mode, args.processes)
    for r in rows:
        prev = next((q for q in rows if q["mode"] == r["mode"] and
                     q["processes"] == r["processes"] - 1), None)
        r["added_pss_mb"] = r["pss_mb"] - (prev["pss_mb"] if prev else 0)
        r["added_share_of_index"] = r["added_pss_mb"] / (size / 2**20)
    print(table(rows, ["mode", "processes", "used_mb", "pss_mb", "added_pss_mb",
                       "added_share_of_index"]))
    save_json("shared_index", {"args": vars(args), "index_bytes": size, "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
