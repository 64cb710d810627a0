"""Reading a search's hits back from an IVF-Flat version: FAISS's direct map (id -> list and
offset, a hash map in every process) against the served version's lists by table row, in one
run on the same version.

    python bench/ivf_readback.py [--n 200000] [--hits 10] [--searches 3000] [--rounds 3]

One IVF-Flat version of N random unit vectors (dimension 257, the index policy's IVF), published
in a temp dir; the same version read mapped with its direct map (`reconstruct_batch`) and as
`IndexRepository.load` serves it (`vectors_of_ids`), alternated round by round; the vectors
read are checked equal.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, header, save_json, table

sys.path.insert(0, str(ROOT))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--n", type=int, default=200_000)
    p.add_argument("--hits", type=int, default=10)
    p.add_argument("--searches", type=int, default=3000)
    p.add_argument("--rounds", type=int, default=3)
    args = p.parse_args()
    header("IVF-Flat readback: direct map vs lists by row")
    import faiss

    from indexer.index_policy import build_index, choose_index
    from indexer.repository import IndexRepository

    rng = np.random.default_rng(0)
    vecs = rng.standard_normal((args.n, 257)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    ids = np.arange(args.n, dtype=np.int64)
    index, params = build_index(vecs, ids, choose_index(args.n, 257, flat_max_madds=0))
    faiss.omp_set_num_threads(1)
    rows = []
    with tempfile.TemporaryDirectory(prefix="ivf-readback-") as tmp:
        repo = IndexRepository(Path(tmp))
        repo.commit_version(index, ids, [f"p/{i}.jpg" for i in range(args.n)], ["e"] * args.n,
                            "m", extra={"index_params": params})
        served = repo.load()
        mapped = faiss.read_index(str(repo.versions_dir / served.version / "index.faiss"),
                                  faiss.IO_FLAG_MMAP_IFC)
        hits = [rng.choice(args.n, args.hits, replace=False) for _ in range(args.searches)]
        for h in hits[:50]:
            assert np.array_equal(served.vectors_of_ids(h), mapped.reconstruct_batch(h))
        for r in range(args.rounds):
            took = {}
            for name, fn in (("direct map", mapped.reconstruct_batch),
                             ("lists by row", served.vectors_of_ids)):
                t = time.perf_counter()
                for h in hits:
                    fn(h)
                took[name] = (time.perf_counter() - t) / len(hits) * 1e6
            rows.append({"round": r, "direct map us": round(took["direct map"], 1),
                         "lists by row us": round(took["lists by row"], 1),
                         "ratio": round(took["lists by row"] / took["direct map"], 2)})
    print(table(rows))
    save_json("ivf_readback", {"args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
