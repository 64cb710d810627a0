"""Model choices: query and image cost of the shipped model and of open_clip architectures.

    python bench/models.py [--models ViT-B-32,MobileCLIP-S2,ViT-B-16] [--images 8] [--rounds 5]
                           [--compare NAME=CHECKPOINT ...]

For each model, eager PyTorch and ONNX Runtime (the default runtime; an architecture that does
not export falls back to eager with a warning, reported in the table): text-query latency (one
caption per call, tokenising included, p50) and image-tower throughput (a batch of real dev
images, preprocessed by each model's own transform beforehand: the tower only). open_clip models
run with RANDOM (seeded) weights of the architecture: the cost does not depend on the weights,
and none are downloaded. An architecture with train-time branches (MobileCLIP) is measured
twice: as built, and reparameterized (the branches folded, as Apple advises for inference).
All variants run interleaved round after round in one process. Ratios are to the shipped model
on the same runtime, in CPU seconds of this process (medians): on a shared machine wall times
also count the waits for a core, CPU time does not.
"""
from __future__ import annotations

import argparse
import itertools
import logging
import tempfile
import time

import torch

from common import FLICKR, MODEL, header, median, save_json, table

QUERIES = ["two dogs playing in the snow", "a man rides a bicycle down a city street",
           "a little girl in a pink dress", "people sitting on a bench next to the water",
           "a black dog jumps over a log", "a surfer riding a big wave"]
RUNTIMES = ("torch", "onnx")


def dev_images(n: int) -> list:
    from encoder.preprocessing import decode_image
    from training.data import load_split_from_folder

    dev = load_split_from_folder(str(FLICKR), "dev")
    return [decode_image(dev.read(x)) for x in dev.images[:n]]


def size(model) -> tuple[float, float]:
    """(parameters in millions, fp32 weights in MB) of the whole model, frozen parts included."""
    n = sum(p.numel() for p in model.parameters())
    return n / 1e6, n * 4 / 2**20


def timed(fns: dict, rounds: int, warmup: int = 1) -> tuple[dict, dict]:
    """Wall and CPU seconds (this process, all threads) per call, interleaved round by round
    as common.interleaved."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    wall, cpu = {k: [] for k in fns}, {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t, c = time.perf_counter(), time.process_time()
            fn()
            wall[k].append(time.perf_counter() - t)
            cpu[k].append(time.process_time() - c)
    return wall, cpu


def reparameterized(loaded):
    """MobileCLIP-style towers (train-time branches that fold into one conv for inference, as
    Apple's instructions do before inference or export), or None for other models."""
    from encoder import LoadedModel
    from encoder.open_clip_model import OpenClipEncoder

    clip = getattr(loaded.model, "clip", None)
    if clip is None or not any(hasattr(m, "reparameterize") for m in clip.modules()):
        return None
    from timm.utils import reparameterize_model

    m = loaded.model
    fused = OpenClipEncoder(reparameterize_model(clip), m.tokenizer, m.config,
                            m.image_spec).eval()
    return LoadedModel(fused, loaded.card, f"{loaded.model_id}-reparameterized", loaded.path)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL, help="the shipped model (MODEL_PATH)")
    p.add_argument("--models", default="ViT-B-32,MobileCLIP-S2,ViT-B-16",
                   help="open_clip architectures, comma-separated")
    p.add_argument("--images", type=int, default=8, help="images per image-tower call")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--text-rounds", type=int, default=30)
    p.add_argument("--compare", action="append", default=[], metavar="NAME=CHECKPOINT",
                   help="another checkpoint measured beside the shipped one (e.g. the model "
                        "shipped before); repeatable")
    p.add_argument("--onnx-cache-dir", default=None,
                   help="keep exported graphs here (default: a new temporary folder)")
    args = p.parse_args()
    header("model choices: text-query and image cost, eager vs ONNX Runtime")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")

    from encoder import Encoder, load_checkpoint

    cache = args.onnx_cache_dir or tempfile.mkdtemp(prefix="onnx-models-")
    images = dev_images(args.images)
    specs = {"shipped": args.checkpoint}
    specs.update(item.split("=", 1) for item in args.compare)
    specs.update({a: f"open_clip:{a}" for a in args.models.split(",") if a})
    models = {name: load_checkpoint(spec) for name, spec in specs.items()}
    for name in list(models):
        fused = reparameterized(models[name])
        if fused is not None:
            models[f"{name} reparameterized"] = fused
            specs[f"{name} reparameterized"] = f"{specs[name]} + timm reparameterize_model"
    encoders, pixels, sizes, fallback = {}, {}, {}, {}
    for name, loaded in models.items():
        spec = specs[name]
        sizes[name] = size(loaded.model)
        for rt in RUNTIMES:
            enc = Encoder(loaded, image_runtime=rt, text_runtime=rt, onnx_cache_dir=cache)
            enc.warmup()  # exports and checks against eager; falls back with a warning
            encoders[name, rt] = enc
        onnx = encoders[name, "onnx"]
        fallback[name] = [t for t in ("image", "text") if getattr(onnx, f"{t}_runtime") != "onnx"]
        pixels[name] = torch.stack([onnx.preprocess(im) for im in images])
        print(f"{name}: {spec}, input {onnx.model.image_spec.input_size} px, "
              f"{sizes[name][0]:.1f} M parameters"
              + (f"; ONNX fell back to eager for: {fallback[name]}" if fallback[name] else ""))
    print(f"\ntorch threads {torch.get_num_threads()}; {args.images} real dev images per image "
          f"call, {args.rounds} interleaved rounds; {args.text_rounds} one-caption queries per "
          f"variant, interleaved\n")

    with torch.inference_mode():
        img, img_cpu = timed({k: (lambda e=e, x=pixels[k[0]]: e.encode_pixels(x))
                              for k, e in encoders.items()}, args.rounds)
        queries = {k: itertools.cycle(QUERIES) for k in encoders}
        txt, txt_cpu = timed({k: (lambda e=e, q=queries[k]: e.encode_texts([next(q)]))
                              for k, e in encoders.items()}, args.text_rounds, warmup=3)

    rows = []
    for (name, rt) in encoders:
        ran = "eager (fell back)" if rt == "onnx" and fallback[name] else rt
        rows.append({
            "model": name, "runtime": ran, "params M": round(sizes[name][0], 1),
            "fp32 MB": round(sizes[name][1]),
            "text query p50 ms": 1000 * median(txt[name, rt]),
            "x shipped (text, CPU time)": round(
                median(txt_cpu[name, rt]) / median(txt_cpu["shipped", rt]), 2),
            "images/s (best round)": args.images / min(img[name, rt]),
            "images/s (median)": args.images / median(img[name, rt]),
            "x shipped (image, CPU time)": round(
                median(img_cpu[name, rt]) / median(img_cpu["shipped", rt]), 2),
        })
    print(table(rows))
    print("\nx shipped: CPU seconds per query / per image (medians) relative to the shipped model "
          "on the same runtime (2.0 = twice the work). Other people's work shares these 2 cores: "
          "wall times wait for a core, CPU time does not (ratios on it are the steadier ones).")
    save_json("models", {"image_s": {f"{k[0]}|{k[1]}": v for k, v in img.items()},
                         "image_cpu_s": {f"{k[0]}|{k[1]}": v for k, v in img_cpu.items()},
                         "text_s": {f"{k[0]}|{k[1]}": v for k, v in txt.items()},
                         "text_cpu_s": {f"{k[0]}|{k[1]}": v for k, v in txt_cpu.items()},
                         "images": args.images, "fallback": fallback, "sizes": sizes})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
