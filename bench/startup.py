"""The search service's weight and start: resident memory and the time from process start to the
first answered query, this tree against another checkout, interleaved; with --rebuild the
indexer's fixed start-up instead.

    python bench/startup.py [--n 200] [--rounds 2] [--baseline-tree DIR] [--model MODEL_PATH]
    python bench/startup.py --rebuild [--n 32] [--rounds 3] [--batch-size 1] [--baseline-tree DIR]

Builds an index of N Flickr8k photos (this tree's pipeline, a local store in a temp dir), then
per round starts `python -m search_api` of each tree (cwd and PYTHONPATH the tree, the same
index, its own ONNX cache) and reads its VmRSS from /proc: when /health first answers, after one
text query, after one image query (the image tower may load only then). The start time is
process start -> the first 200 of POST /search_images_by_text. With --model an open_clip spec
(no index: the encode routes) the same for that model.

--rebuild: a local store of the first N Flickr8k dev photos; per round, each tree runs `python -m
indexer rebuild --batch-size B` (a fresh index folder each time), after one unmeasured run per
tree that writes the ONNX graphs / the bundle. The fixed start-up is process start -> the first
batch embedded, read off the progress bar's first count above zero on stderr (both trees draw
it); also the whole command, and the figure a tree logs itself ("first batch embedded ... after
the process started") where it does.
"""
from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common import FLICKR, MODEL, ROOT, header, median, save_json, table
from deploy.ports import free_port
from search_api.testing import rss_mb


def measure(tree: Path, env: dict, photo: bytes, encode_only: bool) -> dict:
    import httpx

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "search_api", "--port", str(port),
                             "--log-level", "warning"], cwd=tree,
                            env={**env, "PYTHONPATH": str(tree)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True)
    text_route, body = (("/encode_text", {"text": "a dog runs on the beach"}) if encode_only else
                        ("/search_images_by_text", {"query": "a dog runs on the beach"}))
    image_route = "/encode_image" if encode_only else "/search_images_by_image"
    try:
        health = None
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"{tree}: the service exited: {proc.stderr.read()[-2000:]}")
            try:
                if health is None and httpx.get(url + "/health", timeout=5).status_code == 200:
                    health = rss_mb(proc.pid)
                if health is not None and \
                        httpx.post(url + text_route, json=body, timeout=30).status_code == 200:
                    first = time.monotonic() - t0
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
        after_text = rss_mb(proc.pid)
        r = httpx.post(url + image_route, files={"image": ("a.jpg", photo, "image/jpeg")},
                       timeout=60)
        r.raise_for_status()
        return {"first_query_s": first, "rss_health_mb": health, "rss_text_mb": after_text,
                "rss_image_mb": rss_mb(proc.pid), "load": os.getloadavg()[0]}
    finally:
        proc.terminate()
        proc.wait(timeout=60)


# the progress bar's first count above zero: the first batch is embedded
FIRST_BATCH = re.compile(rb"\| *[1-9][0-9]*/[0-9]+ \[")
REPORTED = re.compile(rb"first batch embedded \([0-9]+ photos\), ([0-9.]+) s after the process")


def measure_rebuild(tree: Path, env: dict, batch_size: int, index_dir: Path) -> dict:
    """Process start -> first batch embedded, and -> the command's exit, of one rebuild."""
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "indexer", "rebuild", "--batch-size",
                             str(batch_size)], cwd=tree,
                            env={**env, "PYTHONPATH": str(tree), "INDEX_DIR": str(index_dir)},
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    first, err = None, b""
    while chunk := os.read(proc.stderr.fileno(), 65536):
        err += chunk
        if first is None and FIRST_BATCH.search(err):
            first = time.monotonic() - t0
    if proc.wait() != 0 or first is None:
        raise SystemExit(f"{tree}: rebuild failed: {err.decode(errors='replace')[-2000:]}")
    reported = REPORTED.search(err)
    return {"first_batch_s": first, "total_s": time.monotonic() - t0,
            "reported_s": float(reported.group(1)) if reported else None,
            "load": os.getloadavg()[0]}


def rebuild_startup(args) -> int:
    header("indexer: process start -> first batch embedded (`python -m indexer rebuild`)")
    from objectstore import LocalStore

    work = Path(tempfile.mkdtemp(prefix="bench-rebuild-"))
    dev = (FLICKR / "Flickr_8k.devImages.txt").read_text().split()[:args.n]
    store = LocalStore(work / "store", "b")
    for name in dev:
        store.put("flickr8k/images/" + name, (FLICKR / "Images" / name).read_bytes())
    env = {**os.environ, "MODEL_PATH": str(Path(args.model).resolve()),
           "STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(work / "store"),
           "MINIO_BUCKET": "b", "INDEX_BACKEND": "faiss"}
    for name in ("IMAGE_RUNTIME", "TEXT_RUNTIME", "DEVICE"):
        env.pop(name, None)  # each tree's defaults
    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    tree_env = {name: {**env, "ONNX_CACHE_DIR": str(work / f"onnx-{i}")}
                for i, name in enumerate(trees)}
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    folders = (work / f"index-{i}" for i in range(10**6))
    for name, tree in trees.items():  # first runs write ONNX graphs / bundles: not measured
        measure_rebuild(tree, tree_env[name], args.batch_size, next(folders))
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(measure_rebuild(tree, tree_env[name], args.batch_size,
                                              next(folders)))
    rows = [{"tree": name,
             "start -> first batch embedded s": " / ".join(f"{r['first_batch_s']:.2f}"
                                                            for r in rs),
             "median s": f"{median([r['first_batch_s'] for r in rs]):.2f}",
             "its own log line s": " / ".join(f"{r['reported_s']:.2f}" for r in rs
                                              if r["reported_s"] is not None) or "-",
             "whole command s": " / ".join(f"{r['total_s']:.2f}" for r in rs),
             "load": " / ".join(f"{r['load']:.1f}" for r in rs)} for name, rs in runs.items()]
    print(f"model {args.model}; {len(dev)} Flickr8k dev photos; batch size {args.batch_size}")
    print(table(rows))
    save_json("startup-rebuild", {"model": args.model, "n": len(dev),
                                  "batch_size": args.batch_size, "runs": runs})
    shutil.rmtree(work, ignore_errors=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", default=MODEL)
    p.add_argument("--n", type=int, default=None, help="photos (default 200; --rebuild: 32)")
    p.add_argument("--rounds", type=int, default=None, help="default 2; --rebuild: 3")
    p.add_argument("--baseline-tree", default=None)
    p.add_argument("--rebuild", action="store_true",
                   help="the indexer's start-up (`python -m indexer rebuild`) instead")
    p.add_argument("--batch-size", type=int, default=1,
                   help="--rebuild: photos per batch (1: to the first photo embedded)")
    args = p.parse_args()
    if args.rebuild:
        args.n, args.rounds = args.n or 32, args.rounds or 3
        return rebuild_startup(args)
    args.n, args.rounds = args.n or 200, args.rounds or 2
    header("search service: resident memory and start time")
    from encoder.spec import OpenClipSpec, parse_model_spec

    work = Path(tempfile.mkdtemp(prefix="bench-startup-"))
    encode_only = isinstance(parse_model_spec(args.model), OpenClipSpec)
    model = args.model if encode_only else str(Path(args.model).resolve())
    names = sorted(x.name for x in (FLICKR / "Images").iterdir())[:args.n]
    env = {**os.environ, "MODEL_PATH": model, "INDEX_DIR": str(work / "index"),
           "STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(work / "store"),
           "MINIO_BUCKET": "b", "RELOAD_INTERVAL_S": "0"}
    if not encode_only:
        from encoder import Encoder, load_checkpoint
        from indexer import pipeline
        from indexer.faiss_index import FaissIndex
        from objectstore import LocalStore

        store = LocalStore(work / "store", "b")
        for name in names:
            store.put("flickr8k/images/" + name, (FLICKR / "Images" / name).read_bytes())
        enc = Encoder(load_checkpoint(model), onnx_cache_dir=str(work / "onnx-build"))
        pipeline.rebuild(store, enc, FaissIndex(work / "index"), "flickr8k/images/",
                         progress=False)
    trees = {"this tree": ROOT}
    if args.baseline_tree:
        trees["baseline"] = Path(args.baseline_tree).resolve()
    photo = (FLICKR / "Images" / names[0]).read_bytes()
    runs: dict[str, list[dict]] = {name: [] for name in trees}
    for name, tree in trees.items():  # first starts write ONNX graphs / bundles: not measured
        measure(tree, {**env, "ONNX_CACHE_DIR": str(work / f"onnx-{name}")},
                photo, encode_only)
    for _ in range(args.rounds):
        for name, tree in trees.items():
            runs[name].append(measure(tree, {**env, "ONNX_CACHE_DIR":
                                             str(work / f"onnx-{name}")}, photo, encode_only))
    rows = [{"tree": name,
             "RSS at /health MB": round(median([r["rss_health_mb"] for r in rs])),
             "after a text query MB": round(median([r["rss_text_mb"] for r in rs])),
             "after an image query MB": round(median([r["rss_image_mb"] for r in rs])),
             "start -> first query s": " / ".join(f"{r['first_query_s']:.2f}" for r in rs),
             "load": " / ".join(f"{r['load']:.1f}" for r in rs)} for name, rs in runs.items()]
    print(f"model {args.model}; {'encode routes, no index' if encode_only else f'{args.n} photos'}")
    print(table(rows))
    save_json("startup", {"model": args.model, "runs": runs})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
