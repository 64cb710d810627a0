"""Peak memory of publishing a FAISS version written in parts (the index DAG's fan-out: each
worker writes a part, one task publishes), this tree against a baseline commit, in one run.

    python bench/publish_memory.py [--rows 1000000] [--parts 10] [--dim 257] [--baseline REV]

The parts are written once (random unit vectors, `FaissIndex.write`, the draft format both
trees share); each tree then publishes its own copy of the draft in a fresh process, which
reports its peak resident memory (VmHWM) before and after `publish`, and the time it took.
The index built is the one the policy picks for --rows (IVF-Flat at 1M under the default
INDEX_MEMORY_MB); what differs is how the parts are merged into the vectors it is built from.
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from common import ROOT, header, save_json, table

CHILD = r"""
import json, sys, time
sys.path.insert(0, sys.argv[1])
import indexer.faiss_index as module

def peak_mb():  # VmHWM: this process's peak (ru_maxrss would start from the parent's at fork)
    for line in open("/proc/self/status"):
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024

index = module.FaissIndex(sys.argv[2])
before = peak_mb()
t = time.perf_counter()
out = index.publish(sys.argv[3])
print(json.dumps({"before_mb": before, "seconds": time.perf_counter() - t,
                  "peak_mb": peak_mb(),
                  "count": out["count"], "module": module.__file__}))
"""


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=1_000_000)
    p.add_argument("--parts", type=int, default=10)
    p.add_argument("--dim", type=int, default=257)
    p.add_argument("--baseline", default="5b607af", help="the commit to compare with")
    args = p.parse_args()
    header("Publishing a version written in parts: peak memory, this tree vs a baseline")
    from indexer.faiss_index import FaissIndex

    work = Path(tempfile.mkdtemp(prefix="publish-memory-"))
    template = work / "template"
    index = FaissIndex(template)
    version = index.begin("bench", args.dim)
    rng = np.random.default_rng(0)
    per = -(-args.rows // args.parts)
    # shuffled keys, as shards of a listing are not in key order once merged
    names = rng.permutation(args.rows)
    for n, start in enumerate(range(0, args.rows, per)):
        size = min(per, args.rows - start)
        x = rng.standard_normal((size, args.dim), dtype=np.float32)
        x /= np.linalg.norm(x, axis=1, keepdims=True)
        keys = [f"photos/{i:09d}.jpg" for i in names[start:start + size]]
        index.write(version, keys, x, ["etag"] * size, part=f"{n:05d}")
    parts_mb = sum(f.stat().st_size for f in template.rglob("part-*.npz")) / 2**20
    print(f"{args.rows:,} rows of dim {args.dim} in {args.parts} parts ({parts_mb:.0f} MiB)",
          flush=True)
    baseline = work / "baseline"
    subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(baseline),
                    args.baseline], check=True, capture_output=True)
    rows = []
    try:
        for name, root in ((f"baseline {args.baseline}", baseline), ("this tree", ROOT)):
            copy = work / "copy"
            shutil.rmtree(copy, ignore_errors=True)
            shutil.copytree(template, copy)
            run = subprocess.run([sys.executable, "-c", CHILD, str(root), str(copy), version],
                                 check=True, capture_output=True, text=True)
            out = json.loads(run.stdout.strip().splitlines()[-1])
            assert out["count"] == args.rows and out["module"].startswith(str(root)), out
            rows.append({"publish by": name, "peak MiB": round(out["peak_mb"]),
                         "peak − before MiB": round(out["peak_mb"] - out["before_mb"]),
                         "s": round(out["seconds"], 1)})
            print(rows[-1], flush=True)
    finally:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(baseline)],
                       capture_output=True)
        shutil.rmtree(work, ignore_errors=True)
    vectors_mb = args.rows * args.dim * 4 / 2**20
    print(table(rows))
    print(f"float32 vectors: {vectors_mb:.0f} MiB; peak ratio this tree / baseline: "
          f"{rows[1]['peak MiB'] / rows[0]['peak MiB']:.2f}")
    save_json("publish_memory", {"rows": args.rows, "parts": args.parts, "dim": args.dim,
                                 "vectors_mib": round(vectors_mb), "results": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
