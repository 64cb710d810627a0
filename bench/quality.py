"""Dev-split Recall@K of each runtime against eager PyTorch (the quality rule for speed changes).

    python bench/quality.py [--limit N]

Embeds the Flickr8k dev split (1,000 images, 5,000 captions) with each tower runtime, then
computes the standard Recall@1/5/10 both ways (training.recall) on the vectors the service
really searches (hubness-corrected when the model has a query bank). A speed change may not
lower any dev Recall@K by more than 0.5 point. The int8 image graph is calibrated on the first
64 *train* images (never dev).
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch

from common import FLICKR, MODEL, header, save_json, table


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--limit", type=int, default=0, help="first N dev images (0 = all 1,000)")
    p.add_argument("--calibration", type=int, default=64)
    p.add_argument("--cache-dir", default=None, help="ONNX cache (default: a temp dir)")
    args = p.parse_args()
    header("dev Recall@K per runtime")

    from encoder import Encoder, load_checkpoint
    from encoder.preprocessing import decode_image
    from encoder.runtime_onnx import OnnxUnavailable
    from training.data import load_split_from_folder
    from training.recall import retrieval_metrics

    cache = args.cache_dir or tempfile.mkdtemp(prefix="onnx-")
    loaded = load_checkpoint(args.checkpoint)
    enc = Encoder(loaded, image_runtime="onnx", text_runtime="onnx", onnx_cache_dir=cache)
    dev = load_split_from_folder(str(FLICKR), "dev")
    if args.limit:
        dev = dev.subset(args.limit)
    train = load_split_from_folder(str(FLICKR), "train")
    calib = torch.stack([enc.preprocess(decode_image(train.read(n)))
                         for n in train.images[: args.calibration]]).numpy()
    t = time.perf_counter()
    image_runtimes = ["torch", "onnx", "onnx-int8"]
    try:
        enc.onnx.quantize_image(calib)
        print(f"int8 image graph calibrated on {len(calib)} train images in "
              f"{time.perf_counter() - t:.0f} s")
    except OnnxUnavailable as exc:  # refused by its own check: the service would run fp32
        print(f"int8 image graph refused on this CPU: {exc}")
        image_runtimes.remove("onnx-int8")

    pixels = torch.stack([enc.preprocess(decode_image(dev.read(n))) for n in dev.images])
    texts, owner = dev.flat_captions()
    img, txt, secs = {}, {}, {}
    for rt in ("torch", "onnx", "onnx-int8"):
        t = time.perf_counter()
        chunks = []
        for i in range(0, len(pixels), 32) if rt in image_runtimes else ():
            x = pixels[i:i + 32]
            if rt == "torch":
                with torch.inference_mode():
                    chunks.append(enc.model.encode_images(x).float().numpy())
            else:
                chunks.append(enc.onnx.encode_pixels(x.numpy(), int8=rt == "onnx-int8"))
        if chunks:
            img[rt] = np.concatenate(chunks)
            secs[f"image {rt}"] = time.perf_counter() - t
        t = time.perf_counter()
        chunks = []
        for i in range(0, len(texts), 128):
            batch = texts[i:i + 128]
            if rt == "torch":
                with torch.inference_mode():
                    chunks.append(enc.model.encode_texts(batch).float().numpy())
            else:
                chunks.append(enc.onnx.encode_texts(batch, int8=rt == "onnx-int8"))
        txt[rt] = np.concatenate(chunks)
        secs[f"text {rt}"] = time.perf_counter() - t

    to_index, to_query = enc.scoring.image_vectors, enc.scoring.query_vectors
    combos = [("torch", "torch"), ("onnx", "onnx"), ("onnx", "onnx-int8"),
              ("onnx-int8", "onnx"), ("onnx-int8", "onnx-int8")]
    rows, ref = [], None
    for ir, tr in [c for c in combos if c[0] in img]:
        m = retrieval_metrics(torch.from_numpy(to_index(img[ir])),
                              torch.from_numpy(to_query(txt[tr])), owner)
        flat = {f"t2i {k}": v for k, v in m["text_to_image"].items() if k.startswith("R@")}
        flat.update({f"i2t {k}": v for k, v in m["image_to_text"].items() if k.startswith("R@")})
        if ref is None:
            ref = flat
        worst = min(flat[k] - ref[k] for k in flat)
        cos_i = float((img[ir] * img["torch"]).sum(1).min())
        cos_t = float((txt[tr] * txt["torch"]).sum(1).min())
        rows.append({"image": ir, "text": tr, **flat, "worst drop (pt)": round(-worst, 2),
                     "min cos img": round(cos_i, 5), "min cos txt": round(cos_t, 5),
                     "ok (<=0.5 pt)": "yes" if -worst <= 0.5 else "NO"})
    print(f"{len(dev)} dev images, {len(texts)} captions, model {loaded.model_id}\n")
    print(table(rows))
    print("\nembedding seconds (whole split, batch 32 images / 128 captions):")
    print(table([{"what": k, "s": round(v, 1)} for k, v in secs.items()]))
    save_json("quality", {"rows": rows, "seconds": secs, "model_id": loaded.model_id})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
