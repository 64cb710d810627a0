"""Incremental update vs full rebuild: time to index 1 % new images into an existing index,
against rebuilding the whole index, in the same run (alternating).

    python bench/update.py [--n 1000] [--new-frac 0.01] [--runtime onnx] [--rounds 2]

A local-directory store holds N Flickr8k images. Each round: a full `rebuild` of N (timed), then
1 % more images are put in the store and `update` embeds only those (timed), then they are
removed again for the next round. Both use the same encoder (runtime given).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from common import FLICKR, MODEL, header, median, save_json, table


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--new-frac", type=float, default=0.01)
    p.add_argument("--runtime", default="onnx")
    p.add_argument("--rounds", type=int, default=2)
    args = p.parse_args()
    header("incremental update vs full rebuild")

    from encoder import Encoder, load_checkpoint
    from indexer import pipeline
    from indexer.faiss_index import FaissIndex
    from indexer.repository import IndexRepository
    from objectstore import LocalStore

    work = Path(tempfile.mkdtemp(prefix="bench-update-"))
    store = LocalStore(work / "store", "bench")
    names = sorted(p.name for p in (FLICKR / "Images").iterdir())
    extra_n = max(1, int(round(args.n * args.new_frac)))
    base, extra = names[:args.n], names[args.n:args.n + extra_n]
    for name in base:
        store.put("img/" + name, (FLICKR / "Images" / name).read_bytes())
    enc = Encoder(load_checkpoint(args.checkpoint), image_runtime=args.runtime,
                  onnx_cache_dir=tempfile.mkdtemp(prefix="onnx-"))
    size = enc.model.image_spec.input_size
    enc.encode_pixels(__import__("torch").zeros(1, 3, size, size))  # export/warm outside timing
    repo = IndexRepository(work / "index")
    times = {"full rebuild": [], "update (+1 %)": [], "update (nothing new)": []}
    reports = []
    for _ in range(args.rounds):
        t = time.perf_counter()
        r = pipeline.rebuild(store, enc, FaissIndex(repo), "img/", progress=False)
        times["full rebuild"].append(time.perf_counter() - t)
        for name in extra:
            store.put("img/" + name, (FLICKR / "Images" / name).read_bytes())
        t = time.perf_counter()
        u = pipeline.update(store, enc, FaissIndex(repo), "img/", progress=False)
        times["update (+1 %)"].append(time.perf_counter() - t)
        assert u.added == len(extra), u
        t = time.perf_counter()
        pipeline.update(store, enc, FaissIndex(repo), "img/", progress=False)
        times["update (nothing new)"].append(time.perf_counter() - t)
        reports.append((r.to_dict(), u.to_dict()))
        for name in extra:
            store.delete("img/" + name)
    full = times["full rebuild"]
    rows = [{"what": k, "images embedded": {"full rebuild": args.n, "update (+1 %)": extra_n}
             .get(k, 0), "s (median)": median(v),
             "% of full rebuild (median of per-round ratios)":
                 round(100 * median([x / f for x, f in zip(v, full)]), 2)}
            for k, v in times.items()]
    print(f"{args.n} images in a local store, +{extra_n} new, image runtime {args.runtime}, "
          f"{args.rounds} rounds\n")
    print(table(rows))
    save_json("update", {"times": times, "reports": reports})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
