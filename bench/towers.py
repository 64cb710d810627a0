"""Image and text tower speed per runtime, against eager PyTorch fp32 measured in the same run.

    python bench/towers.py [--batch 32] [--rounds 5] [--compile] [--image-int8]

Image tower: images/s of a batched forward on pre-decoded tensors (real Flickr8k images), for
eager PyTorch fp32 (the baseline, torch's default threads), eager with channels-last, eager in a
child process started with glibc malloc settings that keep large buffers mapped, optional
torch.compile, ONNX Runtime fp32 and (with --image-int8, calibrated on 64 train images) int8.
Text tower: latency of one query (p50/p95) and of 16 queries in one batch (micro-batching).
Variants run interleaved, round after round; ratios are per round, then the median.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import torch

from common import FLICKR, MODEL, header, interleaved, median, pct, save_json, table

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(1 << 30),
              "MALLOC_TOP_PAD_": str(1 << 28)}

QUERIES = ["two dogs playing in the snow", "a man rides a bicycle down a city street",
           "a little girl in a pink dress", "people sitting on a bench next to the water",
           "a black dog jumps over a log", "a surfer riding a big wave",
           "children playing soccer on a field", "a woman climbing a rock wall"]


def load_pixels(enc, n: int) -> torch.Tensor:
    from encoder.preprocessing import decode_image
    from training.data import load_split_from_folder

    dev = load_split_from_folder(str(FLICKR), "dev")
    return torch.stack([enc.preprocess(decode_image(dev.read(x))) for x in dev.images[:n]])


def one_thread(fn, *a):
    """torch's 2 OpenMP threads spin-wait; on a core shared with other work one can be faster."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with torch.inference_mode():
            return fn(*a)
    finally:
        torch.set_num_threads(n)


def child(args) -> int:
    """Eager forward in a process with other malloc settings: one forward per 'go' line."""
    from encoder import load_checkpoint

    model = load_checkpoint(args.checkpoint).model.eval()
    torch.manual_seed(0)
    from encoder import Encoder

    x = load_pixels(Encoder(load_checkpoint(args.checkpoint)), args.batch)
    for line in sys.stdin:
        if line.strip() != "go":
            break
        t = time.perf_counter()
        with torch.inference_mode():
            model.encode_images(x)
        print(time.perf_counter() - t, flush=True)
    return 0


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--text-rounds", type=int, default=60)
    p.add_argument("--compile", action="store_true", help="add torch.compile (slow to compile)")
    p.add_argument("--image-int8", action="store_true", help="add the int8 image graph")
    p.add_argument("--no-malloc-child", action="store_true")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    header("image and text towers: runtimes vs eager PyTorch fp32")

    from encoder import Encoder, load_checkpoint
    from encoder.preprocessing import decode_image
    from training.data import load_split_from_folder

    cache = tempfile.mkdtemp(prefix="onnx-")
    loaded = load_checkpoint(args.checkpoint)
    enc = Encoder(loaded, image_runtime="onnx", text_runtime="onnx", onnx_cache_dir=cache)
    model = enc.model
    x = load_pixels(enc, args.batch)
    xn = x.numpy()
    print(f"torch threads {torch.get_num_threads()}, batch {args.batch} real dev images, "
          f"{args.rounds} interleaved rounds\n")

    fns = {}
    with torch.inference_mode():
        fns["eager fp32 (baseline)"] = lambda: model.encode_images(x)
        fns["eager fp32, 1 thread"] = lambda: one_thread(model.encode_images, x)
        x_cl = x.contiguous(memory_format=torch.channels_last)
        model_cl = None

        def eager_cl():
            nonlocal model_cl
            if model_cl is None:
                import copy
                model_cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
            with torch.inference_mode():
                return model_cl.encode_images(x_cl)
        fns["eager fp32 channels-last"] = eager_cl
    if args.compile:
        t = time.perf_counter()
        compiled = torch.compile(model.encode_images)
        with torch.inference_mode():
            compiled(x)
        print(f"torch.compile: first call (compile) {time.perf_counter() - t:.0f} s")

        def comp():
            with torch.inference_mode():
                return compiled(x)
        fns["torch.compile fp32"] = comp
    proc = None
    if not args.no_malloc_child:
        proc = subprocess.Popen([sys.executable, __file__, "--child", "--checkpoint",
                                 args.checkpoint, "--batch", str(args.batch)],
                                stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                env={**os.environ, **MALLOC_ENV})
        child_times: list[float] = []

        def malloc_child():
            proc.stdin.write("go\n")
            proc.stdin.flush()
            child_times.append(float(proc.stdout.readline()))
        fns["eager fp32, malloc env (child)"] = malloc_child
    enc.onnx.session("image")
    fns["ONNX Runtime fp32"] = lambda: enc.onnx.encode_pixels(xn)
    if args.image_int8:
        train = load_split_from_folder(str(FLICKR), "train")
        calib = torch.stack([enc.preprocess(decode_image(train.read(n)))
                             for n in train.images[:64]]).numpy()
        enc.onnx.quantize_image(calib)
        fns["ONNX Runtime int8 (static)"] = lambda: enc.onnx.encode_pixels(xn, int8=True)

    with torch.inference_mode():
        times = interleaved(fns, args.rounds)
    if proc is not None:
        times["eager fp32, malloc env (child)"] = child_times[-args.rounds:]
        proc.stdin.write("stop\n")
        proc.stdin.flush()
        proc.wait(timeout=30)
    base = times["eager fp32 (baseline)"]
    rows = []
    for k, ts in times.items():
        ratios = [b / t for b, t in zip(base, ts)]
        rows.append({"image tower": k, "img/s (median)": args.batch / median(ts),
                     "x eager fp32 (median of per-round ratios)": round(median(ratios), 2),
                     "min..max ratio": f"{min(ratios):.2f}..{max(ratios):.2f}"})
    print(table(rows))
    with torch.inference_mode():
        ref = model.encode_images(x).numpy()
    cos = {"ONNX Runtime fp32": float((enc.onnx.encode_pixels(xn) * ref).sum(1).min())}
    if args.image_int8:
        cos["ONNX Runtime int8 (static)"] = float(
            (enc.onnx.encode_pixels(xn, int8=True) * ref).sum(1).min())
    print("\nmin cosine to eager fp32:", {k: round(v, 5) for k, v in cos.items()})

    # --- text tower --------------------------------------------------------------------------
    i = iter(range(10**9))

    def q():
        return [QUERIES[next(i) % len(QUERIES)]]
    enc.onnx.session("text", int8=True)
    one = {
        "eager fp32 (baseline)": lambda: model.encode_texts(q()),
        "eager fp32, 1 thread": lambda: one_thread(model.encode_texts, q()),
        "ONNX Runtime fp32": lambda: enc.onnx.encode_texts(q()),
        "ONNX Runtime int8 (dynamic)": lambda: enc.onnx.encode_texts(q(), int8=True),
    }
    with torch.inference_mode():
        t1 = interleaved(one, args.text_rounds, warmup=3)
        batch16 = [QUERIES[j % len(QUERIES)] for j in range(16)]
        t16 = interleaved({
            "eager fp32 (baseline)": lambda: model.encode_texts(batch16),
            "eager fp32, 1 thread": lambda: one_thread(model.encode_texts, batch16),
            "ONNX Runtime fp32": lambda: enc.onnx.encode_texts(batch16),
            "ONNX Runtime int8 (dynamic)": lambda: enc.onnx.encode_texts(batch16, int8=True),
        }, max(5, args.text_rounds // 6), warmup=1)
    b1 = t1["eager fp32 (baseline)"]
    rows = []
    for k in one:
        rows.append({"text tower": k, "1 query p50 ms": 1000 * median(t1[k]),
                     "p95 ms": 1000 * pct(t1[k], 95),
                     "x eager (median of ratios)": round(median([b / t for b, t in zip(b1, t1[k])]), 2),
                     "16 queries in 1 batch ms": 1000 * median(t16[k]),
                     "ms/query batched": 1000 * median(t16[k]) / 16,
                     "batching gain (16 x 1-query / 16-batch)": round(16 * median(t1[k]) / median(t16[k]), 2)})
    print()
    print(table(rows))
    save_json("towers", {"image": times, "text_1": t1, "text_16": t16, "cosine": cos,
                         "batch": args.batch})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
