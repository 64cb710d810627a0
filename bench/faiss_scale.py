"""FAISS at scale: exact flat search vs the index the project chooses (indexer.index_policy.choose_index
+ build_index), at 100k and 1M vectors of dimension 256.

    python bench/faiss_scale.py [--sizes 100000,1000000] [--queries 200]

Data: the real image embeddings of the 1,000 Flickr8k dev images (ONNX fp32 image tower),
repeated with Gaussian noise (each copy has cosine ~0.8 to its source) and re-normalised.
Queries: real text embeddings of dev captions (what the service searches with). The IVF's nprobe
is tuned at build time on the model's own bank of *training* caption embeddings, never on the
evaluation queries. Single-query latency uses one FAISS thread (as the API does), flat and
chosen index queried alternately; recall@10 is against exact search.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import faiss
import numpy as np
import torch

from common import FLICKR, MODEL, header, median, pct, save_json, table


def dev_images(checkpoint: str):
    """(the ONNX encoder, the dev split, its photos' image embeddings float32 [1000, dim])."""
    from encoder import Encoder, load_checkpoint
    from encoder.preprocessing import decode_image
    from training.data import load_split_from_folder

    enc = Encoder(load_checkpoint(checkpoint), image_runtime="onnx", text_runtime="onnx",
                  onnx_cache_dir=tempfile.mkdtemp(prefix="onnx-"))
    dev = load_split_from_folder(str(FLICKR), "dev")
    imgs = []
    for i in range(0, len(dev), 64):
        px = torch.stack([enc.preprocess(decode_image(dev.read(n))) for n in dev.images[i:i + 64]])
        imgs.append(enc.encode_pixels(px))
    return enc, dev, np.concatenate(imgs).astype(np.float32)


def embeddings(args):
    enc, dev, imgs = dev_images(args.checkpoint)
    texts, _ = dev.flat_captions()
    rng = np.random.default_rng(1)
    pick = rng.choice(len(texts), args.queries, replace=False)
    queries = enc.encode_texts([texts[i] for i in pick])
    # raw embeddings here (no bias column): tune on the bank's raw caption embeddings
    tuning = np.asarray(enc.scoring.bank[:300]) if enc.scoring.corrected else None
    return imgs, queries.astype(np.float32), tuning


def synth(base: np.ndarray, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    out = np.empty((n, base.shape[1]), np.float32)
    sigma = 0.75 / np.sqrt(base.shape[1])  # noise norm 0.75 -> cosine ~0.8 to the source
    for s in range(0, n, 100_000):
        e = min(n, s + 100_000)
        chunk = base[np.arange(s, e) % len(base)] + \
            sigma * rng.standard_normal((e - s, base.shape[1]), dtype=np.float32)
        chunk /= np.linalg.norm(chunk, axis=1, keepdims=True)
        out[s:e] = chunk
    return out


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--sizes", default="100000,1000000")
    p.add_argument("--queries", type=int, default=200)
    args = p.parse_args()
    header("FAISS: exact flat vs the chosen index")

    from indexer.index_policy import build_index, choose_index, recall_at

    base, queries, tuning = embeddings(args)
    rows, raw = [], {}
    for n in [int(x) for x in args.sizes.split(",")]:
        x = synth(base, n)
        ids = np.arange(n, dtype=np.int64)
        faiss.omp_set_num_threads(2)
        t = time.perf_counter()
        flat, _ = build_index(x, ids, choose_index(0, x.shape[1]))  # kind flat
        flat_build = time.perf_counter() - t
        t = time.perf_counter()
        chosen, params = build_index(x, ids, tuning_queries=tuning)
        chosen_build = time.perf_counter() - t
        _, truth = flat.search(queries, 10)
        faiss.omp_set_num_threads(1)  # single queries: one thread, as the API runs
        lat = {"flat": [], "chosen": []}
        found = {"flat": [], "chosen": []}
        for q in queries:
            for name, index in (("flat", flat), ("chosen", chosen)):
                t = time.perf_counter()
                _, f = index.search(q[None, :], 10)
                lat[name].append(time.perf_counter() - t)
                found[name].append(f[0])
        sizes = {name: len(faiss.serialize_index(index)) for name, index in
                 (("flat", flat), ("chosen", chosen))}
        for name, index, build in (("flat", flat, flat_build), ("chosen", chosen, chosen_build)):
            rows.append({
                "vectors": f"{n:,}", "index": "IndexFlatIP (exact)" if name == "flat" else
                f"{type(index).__name__} {params}",
                "p50 ms (1 thread)": 1000 * median(lat[name]), "p95 ms": 1000 * pct(lat[name], 95),
                "x flat p50": round(median(lat["flat"]) / median(lat[name]), 1),
                "recall@10 vs exact": round(recall_at(np.array(found[name]), truth, 10), 4),
                "memory MiB (serialized)": sizes[name] / 2**20, "build s": build})
        raw[n] = {"lat": lat, "params": params}
        del flat, chosen, x
    print(f"dim {base.shape[1]}, {len(queries)} real caption queries\n")
    print(table(rows))
    save_json("faiss_scale", {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
