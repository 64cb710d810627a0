"""Queries of several terms: does a negative term help, and what do more terms cost?

    python bench/query_terms.py [--checkpoint models/flickr8k-dual-encoder.pt] [--rounds 100]

On the Flickr8k dev split (1,000 photos, FAISS index, the service's own path):

- quality: for pairs (positive word, negative word) that both occur in the captions, the share
  of unwanted photos (any of its five captions names the negative word) in the top 10 of
  "<positive> - <negative>" against "<positive>" alone, and the share of the top 10 whose
  captions name the positive word (what must stay). Pairs with fewer than 10 photos of both,
  or fewer than 10 of the positive alone, are skipped.
- latency through the HTTP route (in process), interleaved: a one-text query against a 3-term
  query (2 texts + 1 stored photo): p50 and p99, and the ratio of the p50s (target <= 1.5).

The dev images' embeddings are cached in .cache/bench (keyed by the checkpoint's size and
time), so a second run skips the image tower.
"""
from __future__ import annotations

import argparse
import asyncio
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import FLICKR, MODEL, ROOT, header, interleaved, median, pct, save_json, table  # noqa: E402

POSITIVE = ["dog", "man", "woman", "boy", "girl", "people", "child"]
NEGATIVE = ["grass", "water", "snow", "ball", "beach", "street", "bike", "rock", "sand",
            "shirt", "field", "pool"]


def dev_embeddings(enc, checkpoint: str):
    """The dev photos' image embeddings (cached) and the split."""
    import torch

    from encoder.preprocessing import decode_image
    from training.data import load_split_from_folder

    dev = load_split_from_folder(str(FLICKR), "dev")
    stat = Path(checkpoint).stat()
    cache = ROOT / ".cache" / "bench" / f"query_terms_dev_{stat.st_size}_{int(stat.st_mtime)}.npy"
    if cache.is_file():
        return np.load(cache), dev
    out = []
    with torch.inference_mode():
        for i in range(0, len(dev), 64):
            px = torch.stack([enc.preprocess(decode_image(dev.read(n)))
                              for n in dev.images[i:i + 64]])
            out.append(np.asarray(enc.encode_pixels(px), np.float32))
    emb = np.concatenate(out)
    cache.parent.mkdir(parents=True, exist_ok=True)
    np.save(cache, emb)
    return emb, dev


def mentions(captions: list[str], word: str) -> bool:
    pattern = re.compile(rf"\b{re.escape(word)}s?\b")
    return any(pattern.search(c.lower()) for c in captions)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--rounds", type=int, default=100)
    args = p.parse_args()
    header("Query terms: negative terms against the positive text alone; 3-term query cost")
    from fastapi.testclient import TestClient

    from core.settings import Settings
    from encoder import Encoder, load_checkpoint
    from indexer.faiss_index import FaissIndex
    from indexer.repository import IndexRepository
    from objectstore import LocalStore
    from search_api.main import build_service, create_app
    from search_api.query_terms import parse_typed

    tmp = Path(tempfile.mkdtemp(prefix="query-terms-"))
    enc = Encoder(load_checkpoint(args.checkpoint), image_runtime="onnx", text_runtime="onnx",
                  onnx_cache_dir=str(tmp / "onnx"))
    emb, dev = dev_embeddings(enc, args.checkpoint)
    keys = list(dev.images)
    index = FaissIndex(IndexRepository(tmp / "index"))
    index.rebuild(enc.model_id, keys, enc.scoring.image_vectors(emb), ["e"] * len(keys))
    settings = Settings(index_dir=str(tmp / "index"), reload_interval_s=0, _env_file=None)
    service = build_service(settings, encoder=enc, index=index,
                            store=LocalStore(tmp / "store", "b"))
    caps = dict(zip(keys, dev.captions))

    # --- quality ---------------------------------------------------------------------------
    async def top10(text: str) -> list[str]:
        query = parse_typed(text)
        if query is None:
            [res] = await service.search(await service.encoders.encode_texts([text]), 10)
        else:
            res = await service.search_terms(query, 10)
        return [h.key for h in res.hits]

    rows = []
    loop = asyncio.new_event_loop()
    for pos in POSITIVE:
        for neg in NEGATIVE:
            both = sum(mentions(c, pos) and mentions(c, neg) for c in caps.values())
            alone = sum(mentions(c, pos) and not mentions(c, neg) for c in caps.values())
            if both < 10 or alone < 10:
                continue
            plain = loop.run_until_complete(top10(pos))
            minus = loop.run_until_complete(top10(f"{pos} - {neg}"))
            rows.append({
                "query": f"{pos} - {neg}", "photos with both": both,
                "unwanted, positive alone": sum(mentions(caps[k], neg) for k in plain) / 10,
                "unwanted, with - term": sum(mentions(caps[k], neg) for k in minus) / 10,
                "positive kept, alone": sum(mentions(caps[k], pos) for k in plain) / 10,
                "positive kept, with - term": sum(mentions(caps[k], pos) for k in minus) / 10})
    mean = {c: float(np.mean([r[c] for r in rows])) for c in rows[0] if c != "query"}
    rows.append({"query": f"mean of {len(rows)} pairs", **mean})
    print(table(rows))
    print()

    # --- latency -----------------------------------------------------------------------------
    photo = keys[0]
    with TestClient(create_app(settings, service)) as client:
        one = {"text": "a dog running on the beach", "top_k": 10}
        three = {"text": f"a dog running + the beach at sunset + key:{photo}", "top_k": 10}
        for body in (one, three):
            r = client.post("/search_images_by_text", json=body)
            assert r.status_code == 200, r.text
        times = interleaved({
            "one text": lambda: client.post("/search_images_by_text", json=one),
            "2 texts + 1 photo": lambda: client.post("/search_images_by_text", json=three)},
            args.rounds, warmup=5)
    lat = [{"query": k, "p50 ms": median(v) * 1e3, "p99 ms": pct(v, 99) * 1e3}
           for k, v in times.items()]
    ratio = median(times["2 texts + 1 photo"]) / median(times["one text"])
    print(table(lat))
    print(f"\n3-term p50 / one-text p50: {ratio:.2f} (target <= 1.5)")
    save_json("query_terms", {"quality": rows, "latency": lat, "ratio": ratio,
                              "args": vars(args)})
    service.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
