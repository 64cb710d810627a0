"""Indexing throughput: end-to-end images/s from the object store (list, fetch, decode,
preprocess, forward, FAISS add, publish) against the same tower's raw batched forward rate on
pre-decoded tensors, measured in the same run, interleaved.

    python bench/indexing.py [--n 512] [--runtimes onnx,onnx-int8,torch] [--rounds 2]
    python bench/indexing.py --candidate NEW.pt [--checkpoint BASE.pt] [--runtimes onnx]

With --candidate: end-to-end indexing of the same images by two checkpoints, interleaved, and
the candidate's images/s as a ratio of the baseline's (the cost of a bigger image tower), and
the p50 of one text query encode of each (same runtime).

The store is a local-directory store holding N Flickr8k images (dev split first). For every
runtime: raw forward (batch 32, tensors already decoded) and `indexer.pipeline.rebuild`
(batch 32), alternately, `rounds` times; plus the pipeline as it was before prefetching
(fetch/decode of a batch only after the previous forward, `--no-overlap-baseline` to skip).
"""
from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from common import FLICKR, MODEL, header, median, save_json, table


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--torch-n", type=int, default=128, help="images for the slow eager runtime")
    p.add_argument("--runtimes", default="onnx,onnx-int8,torch")
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--no-overlap-baseline", action="store_true")
    p.add_argument("--candidate", help="compare this checkpoint's indexing rate with --checkpoint's")
    args = p.parse_args()
    if args.candidate:
        return compare(args)
    header("indexing: end to end vs raw forward")

    from encoder import Encoder, load_checkpoint
    from encoder.preprocessing import decode_image
    from indexer import pipeline
    from indexer.faiss_index import FaissIndex
    from indexer.repository import IndexRepository
    from objectstore import LocalStore
    from training.data import load_split_from_folder

    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    store = LocalStore(work / "store", "bench")
    names = sorted(p.name for p in (FLICKR / "Images").iterdir())
    dev = load_split_from_folder(str(FLICKR), "dev").images
    order = dev + [n for n in names if n not in set(dev)]
    loaded = load_checkpoint(args.checkpoint)
    cache = tempfile.mkdtemp(prefix="onnx-")
    rows, raw_json = [], {}
    for rt in args.runtimes.split(","):
        n = args.torch_n if rt == "torch" else args.n
        prefix = f"img-{n}/"
        for name in order[:n]:
            if not store.exists(prefix + name):
                store.put(prefix + name, (FLICKR / "Images" / name).read_bytes())
        enc = Encoder(loaded, image_runtime=rt, text_runtime="torch", onnx_cache_dir=cache)
        if rt == "onnx-int8":
            train = load_split_from_folder(str(FLICKR), "train")
            calib = torch.stack([enc.preprocess(decode_image(train.read(x)))
                                 for x in train.images[:64]]).numpy()
            enc.onnx.quantize_image(calib)
        t = time.perf_counter()
        pixels = [enc.preprocess(decode_image(store.get(prefix + x))) for x in order[:n]]
        decode_s = (time.perf_counter() - t) / n
        pixels = torch.stack(pixels)
        enc.encode_pixels(pixels[:args.batch])  # warm (export / session load)
        repo = IndexRepository(work / f"index-{rt}")

        def raw():
            for i in range(0, n, args.batch):
                enc.scoring.image_vectors(enc.encode_pixels(pixels[i:i + args.batch]))

        def e2e():
            pipeline.rebuild(store, enc, FaissIndex(repo), prefix, batch_size=args.batch, progress=False)

        def e2e_no_overlap():
            # the old behaviour: a batch is fetched+decoded only after the previous forward
            orig = pipeline.iter_batches

            def serial(store_, enc_, objects, batch_size, workers=4):
                for s in range(0, len(objects), batch_size):
                    yield from orig(store_, enc_, objects[s:s + batch_size], batch_size, workers)
            pipeline.iter_batches = serial
            try:
                pipeline.rebuild(store, enc, FaissIndex(repo), prefix, batch_size=args.batch, progress=False)
            finally:
                pipeline.iter_batches = orig

        fns = {"raw forward": raw, "end to end": e2e}
        if not args.no_overlap_baseline:
            fns["end to end, no overlap (before)"] = e2e_no_overlap
        times = {k: [] for k in fns}
        for _ in range(args.rounds):
            for k, fn in fns.items():
                t = time.perf_counter()
                fn()
                times[k].append(time.perf_counter() - t)
        raw_rate = [n / t for t in times["raw forward"]]
        for k, ts in times.items():
            rate = [n / t for t in ts]
            rows.append({"runtime": rt, "images": n, "what": k,
                         "img/s (median)": median(rate),
                         "x raw forward (median of per-round ratios)":
                             round(median([r / b for r, b in zip(rate, raw_rate)]), 2)})
        rows.append({"runtime": rt, "images": n, "what": "decode+preprocess alone, 1 thread",
                     "img/s (median)": 1 / decode_s, "x raw forward (median of per-round ratios)": ""})
        raw_json[rt] = times
    print(f"batch {args.batch}, {args.rounds} rounds per runtime, local store at {work}\n")
    print(table(rows))
    save_json("indexing", {"rows": rows, "times": raw_json})
    return 0


def compare(args) -> int:
    header("indexing: candidate checkpoint vs baseline, end to end")
    from encoder import Encoder, load_checkpoint
    from indexer import pipeline
    from indexer.faiss_index import FaissIndex
    from objectstore import LocalStore

    work = Path(tempfile.mkdtemp(prefix="bench-index-"))
    store = LocalStore(work / "store", "bench")
    names = sorted(p.name for p in (FLICKR / "Images").iterdir())[:args.n]
    for name in names:
        store.put("img/" + name, (FLICKR / "Images" / name).read_bytes())
    cache = tempfile.mkdtemp(prefix="onnx-")
    rows = []
    for rt in args.runtimes.split(","):
        encs = {label: Encoder(load_checkpoint(path), image_runtime=rt, text_runtime=rt,
                               onnx_cache_dir=cache)
                for label, path in (("baseline", args.checkpoint), ("candidate", args.candidate))}
        times = {label: [] for label in encs}
        for _ in range(args.rounds + 1):  # the first round warms (export, session load)
            for label, enc in encs.items():
                t = time.perf_counter()
                pipeline.rebuild(store, enc, FaissIndex(work / f"{rt}-{label}"), "img/",
                                 batch_size=args.batch, progress=False)
                times[label].append(time.perf_counter() - t)
        rates = {label: [len(names) / t for t in ts[1:]] for label, ts in times.items()}
        text_ms = {label: [] for label in encs}  # what a query pays: one caption, interleaved
        for enc in encs.values():
            enc.encode_texts(["warm up"])
        for i in range(60):
            for label, enc in encs.items():
                t = time.perf_counter()
                enc.encode_texts([f"a dog runs across the grass number {i}"])
                text_ms[label].append(1000 * (time.perf_counter() - t))
        for label, path in (("baseline", args.checkpoint), ("candidate", args.candidate)):
            rows.append({"runtime": rt, "model": f"{label}: {Path(path).name}",
                         "img/s (median)": median(rates[label]),
                         "x baseline (median of per-round ratios)": round(median(
                             [c / b for c, b in zip(rates[label], rates["baseline"])]), 2),
                         "text query p50 ms": round(median(text_ms[label]), 2),
                         "text x baseline": round(median(text_ms[label])
                                                  / median(text_ms["baseline"]), 2)})
    print(f"{len(names)} images, batch {args.batch}, {args.rounds} timed rounds, interleaved\n")
    print(table(rows))
    save_json("indexing_compare", {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
