"""The cost of reading each photo's metadata while indexing, against the whole indexing time.

    python bench/photo_info.py [--n 200] [--rounds 2] [--checkpoint MODEL] [--runtime onnx]

N Flickr8k images (dev split first) in a local-directory store; each carries camera EXIF
(DateTimeOriginal + OffsetTimeOriginal, Make/Model, a GPS position spread over Europe) put
into its JPEG as an APP1 segment, pixels untouched, so every image pays the full price: EXIF
parse, GPS, and the place lookup (once per batch of 32, as the pipeline does).

Measured in one run, interleaved:
  metadata alone       `extract_photo_info(..., places=False)` on the fetched bytes + one
                       `add_places` per batch of 32, per image (the table already loaded;
                       its one-off load is reported on its own)
  indexing, end to end `indexer.pipeline.rebuild` of the N images (list, fetch, decode,
                       preprocess, forward, metadata, FAISS publish), per image
  indexing without     the same rebuild with metadata reading switched off (the pipeline as
    metadata           it was before), per image: the end-to-end difference, noisier
  storing metadata     the index backend's own cost: `index.rebuild` of the same, already
                       embedded vectors with `info=` minus without it, per image
and the ratios (metadata + storing) / indexing (target <= 5 %).

    python bench/photo_info.py [--backend faiss]   (any INDEX_BACKEND the registry knows)
"""
from __future__ import annotations

import argparse
import random
import struct
import tempfile
import time
from pathlib import Path

from common import FLICKR, MODEL, header, load_average, median, save_json, table


def with_exif(jpeg: bytes, exif_block: bytes) -> bytes:
    """The JPEG with `exif_block` ("Exif\\0\\0" + TIFF) as an APP1 segment after SOI (an
    existing APP1 stays after it; readers take the first)."""
    assert jpeg[:2] == b"\xff\xd8"
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(exif_block) + 2) + exif_block + jpeg[2:]


def camera_exif(rng: random.Random) -> bytes:
    from tests.photo_samples import photo_exif

    day = rng.randrange(1, 28)
    return photo_exif(taken=f"2023:07:{day:02d} 1{rng.randrange(10)}:30:05",
                      offset=rng.choice(["+01:00", "+02:00", "+00:00"]),
                      make="Canon", model="EOS R6",
                      position=(rng.uniform(36.0, 60.0), rng.uniform(-9.5, 25.0))).tobytes()


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--n", type=int, default=200)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--runtime", default="onnx", help="the image tower's runtime")
    p.add_argument("--backend", default="faiss", help="INDEX_BACKEND of the index written")
    args = p.parse_args()
    header("photo metadata: extraction vs the whole indexing time per image")

    from encoder import Encoder, load_checkpoint
    from indexer import pipeline, photo_info
    from core.settings import Settings
    from indexer.vector_index import open_index
    from objectstore import LocalStore
    from training.data import load_split_from_folder

    work = Path(tempfile.mkdtemp(prefix="bench-photo-info-"))
    store = LocalStore(work / "store", "bench")
    names = sorted(q.name for q in (FLICKR / "Images").iterdir())
    dev = load_split_from_folder(str(FLICKR), "dev").images
    order = (dev + [n for n in names if n not in set(dev)])[:args.n]
    rng = random.Random(19)
    for name in order:
        store.put("photos/" + name, with_exif((FLICKR / "Images" / name).read_bytes(),
                                              camera_exif(rng)))
    objects = sorted(store.list("photos/"), key=lambda o: o.key)
    data = {o.key: store.get(o.key) for o in objects}

    t = time.perf_counter()
    from core.places import reverse
    reverse([(38.7, -9.1)])
    table_load_s = time.perf_counter() - t

    def metadata_alone():
        for s in range(0, len(objects), args.batch):
            batch = [photo_info.extract_photo_info(data[o.key], o, places=False)
                     for o in objects[s:s + args.batch]]
            photo_info.add_places(batch)

    enc = Encoder(load_checkpoint(args.checkpoint), image_runtime=args.runtime,
                  text_runtime="torch", onnx_cache_dir=tempfile.mkdtemp(prefix="onnx-"))
    real_extract, real_add_places = pipeline.extract_photo_info, pipeline.add_places

    def index_at(name: str):
        return open_index(Settings(_env_file=None, index_backend=args.backend,
                                   index_dir=str(work / name), milvus_uri=str(work / "lite.db")))

    def rebuild():
        pipeline.rebuild(store, enc, index_at("index"), "photos/",
                         batch_size=args.batch, progress=False)

    def rebuild_without_metadata():
        pipeline.extract_photo_info = lambda data_, info, places=True: None
        pipeline.add_places = lambda infos: None
        try:
            rebuild()
        finally:
            pipeline.extract_photo_info, pipeline.add_places = real_extract, real_add_places

    # sanity: what the bench measures is read
    sample = photo_info.extract_photo_info(data[objects[0].key], objects[0])
    assert sample["taken_at_source"] == "exif" and sample["country"], sample
    rebuild()  # warm: ONNX export / session, page cache
    embedded = pipeline.embed_objects(store, enc, objects, args.batch, progress=False)
    assert len(embedded.infos) == len(embedded.keys) == len(objects)

    def store_vectors(info):
        def run():
            index_at("store-only").rebuild(enc.model_id, embedded.keys, embedded.vectors,
                                           embedded.etags, info=info)
        return run

    fns = {"metadata alone": metadata_alone, "indexing, end to end": rebuild,
           "indexing without metadata": rebuild_without_metadata,
           "index write with metadata": store_vectors(embedded.infos),
           "index write without metadata": store_vectors(None)}
    times = {k: [] for k in fns}
    for _ in range(args.rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    n = len(objects)
    per_image = {k: median(v) / n * 1e3 for k, v in times.items()}
    storing = [max(0.0, a - b) for a, b in zip(times["index write with metadata"],
                                                times["index write without metadata"])]
    per_image["storing metadata (difference)"] = median(storing) / n * 1e3
    ratios = [m / e for m, e in zip(times["metadata alone"], times["indexing, end to end"])]
    total_ratios = [(m + s) / e for m, s, e in zip(times["metadata alone"], storing,
                                                   times["indexing, end to end"])]
    e2e_diff = [(a - b) / a for a, b in zip(times["indexing, end to end"],
                                             times["indexing without metadata"])]
    rows = [{"what": k, "ms per image (median)": v} for k, v in per_image.items()]
    print(f"{n} images with EXIF+GPS, batch {args.batch}, image runtime {args.runtime}, "
          f"index backend {args.backend}, "
          f"{args.rounds} rounds interleaved, checkpoint {args.checkpoint}\n")
    print(table(rows))
    print(f"\nmetadata / indexing per image: {median(ratios):.2%} "
          f"(per round: {', '.join(f'{r:.2%}' for r in ratios)})")
    print(f"(metadata + storing it) / indexing per image: {median(total_ratios):.2%} "
          f"(per round: {', '.join(f'{r:.2%}' for r in total_ratios)}; target <= 5 %)")
    print("end to end, (with - without) / with: "
          + ", ".join(f"{d:+.1%}" for d in e2e_diff) + " (noisy: machine load)")
    print(f"place table, one-off load per process: {table_load_s:.2f} s")
    print(f"load average at end: {load_average()}")
    save_json("photo_info", {"n": n, "times": times, "per_image_ms": per_image,
                             "ratios": ratios, "with_storing": total_ratios,
                             "table_load_s": table_load_s})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
