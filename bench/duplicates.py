"""Near duplicates: precision and recall of the duplicate decision (the embedding alone: cosine
above a threshold; two stages: candidates above a lower cosine confirmed on the photos' pixels,
indexer.duplicate_check), and the cost of a full duplicate pass.

    python bench/duplicates.py [--n 120] [--threshold 0.90] [--cost-sizes 25000,50000,100000]
        [--cache emb.npz] [--checks orb:384:15:500,...] [--candidates 0.60,0.70]

Labelled set: `--n` Flickr8k dev photos (FLICKR8K_SOURCE, a fixed sample), each with its edits
(JPEG re-encodes at several qualities, resizes, crops, small rotations, exposure and colour
changes, a screenshot-style frame) as duplicates of it; as hard negatives, pairs of different
photos the same photographer shot moments apart (Flickr8k file names start with the Flickr
photo id: ids at most 20 apart, from the whole set), and every pair of different photos of the
sample. All embedded with the model MODEL_PATH names (the shipped checkpoint by default),
compared as `python -m indexer duplicates` compares them (the embeddings' cosine).

Reported: per threshold, recall on the edits (each edit against its original, per kind of
edit) and precision over all pairs (edit pairs + pairs of different photos), the hard pairs
above it; then the real pass (indexer.duplicates on a FAISS version of every image) at the
chosen threshold: groups, groups mixing different photos, photos found. Cost: the pass over
synthetic clustered vectors of the model's index dimension, published as a rebuild would
publish them (flat or IVF by index_policy), at each `--cost-sizes` size: seconds per pass and
per 100k vectors, and the growth rate between sizes.

Two stages (unless --no-pixel-check): per candidate threshold and pixel check
(method:size:min_inliers:keypoints), recall on the edits (per kind for the shipped defaults),
precision over the same pairs, the consecutive shots confirmed, milliseconds per photo described
and per pair matched; the real pass with the shipped defaults (the set's images as the store);
the pixel checks' cost per 100k photos at the candidate rate measured here. `--cache` keeps the
embeddings between runs (they take minutes; the pixel checks are recomputed).
"""
from __future__ import annotations

import argparse
import io
import random
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import FLICKR, MODEL, header  # noqa: E402

THRESHOLDS = (0.70, 0.72, 0.74, 0.75, 0.76, 0.77, 0.78, 0.80, 0.82, 0.85, 0.88, 0.90, 0.93, 0.95)
HARD_ID_GAP = 20  # Flickr photo ids this close: one photographer's consecutive uploads


def _jpeg(img, quality):
    buf = io.BytesIO()
    img.save(buf, "JPEG", quality=quality)
    buf.seek(0)
    from PIL import Image

    return Image.open(buf).convert("RGB")


def _crop(img, keep):
    w, h = img.size
    dw, dh = int(w * (1 - keep) / 2), int(h * (1 - keep) / 2)
    return img.crop((dw, dh, w - dw, h - dh))


def _rotate(img, degrees):
    # rotated about the centre, then cropped to the part without corners, as an editor does
    w, h = img.size
    rotated = img.rotate(degrees, resample=3, expand=False)
    return _crop(rotated, 1 - 2 * abs(np.sin(np.radians(degrees))))


def _screenshot(img):
    from PIL import Image, ImageDraw

    w, h = img.size
    pad, bar = w // 12, h // 8
    canvas = Image.new("RGB", (w + 2 * pad, h + 2 * pad + bar), (242, 242, 242))
    ImageDraw.Draw(canvas).rectangle((0, 0, canvas.width, bar), fill=(40, 44, 52))
    canvas.paste(img, (pad, bar + pad))
    return _jpeg(canvas.resize((canvas.width * 3 // 4, canvas.height * 3 // 4)), 85)


def edits() -> dict:
    from PIL import ImageEnhance

    return {
        "jpeg q90": lambda im: _jpeg(im, 90),
        "jpeg q60": lambda im: _jpeg(im, 60),
        "jpeg q30": lambda im: _jpeg(im, 30),
        "jpeg q10": lambda im: _jpeg(im, 10),
        "resize 1/2": lambda im: im.resize((im.width // 2, im.height // 2)),
        "resize 1/4": lambda im: im.resize((im.width // 4, im.height // 4)),
        "crop 90%": lambda im: _crop(im, 0.90),
        "crop 75%": lambda im: _crop(im, 0.75),
        "rotate 3°": lambda im: _rotate(im, 3),
        "rotate -6°": lambda im: _rotate(im, -6),
        "brighter +40%": lambda im: ImageEnhance.Brightness(im).enhance(1.4),
        "darker -35%": lambda im: ImageEnhance.Brightness(im).enhance(0.65),
        "contrast +50%": lambda im: ImageEnhance.Contrast(im).enhance(1.5),
        "saturation -60%": lambda im: ImageEnhance.Color(im).enhance(0.4),
        "warm colour cast": lambda im: _cast(im, (1.12, 1.0, 0.85)),
        "screenshot frame": _screenshot,
    }


def _cast(img, gains):
    arr = np.asarray(img, np.float32) * np.asarray(gains, np.float32)
    from PIL import Image

    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def labelled_set(n: int, seed: int = 0):
    """(names, photo of each image, kind of each image, images): the sample's originals and
    edits, then the hard pairs' photos."""
    from PIL import Image

    images_dir = FLICKR / "Images"
    dev = sorted((FLICKR / "Flickr_8k.devImages.txt").read_text().split())
    sample = random.Random(seed).sample(dev, n)
    every = sorted(p.name for p in images_dir.glob("*.jpg"))
    by_id = sorted((int(name.split("_")[0]), name) for name in every)
    hard = [(a, b) for (ia, a), (ib, b) in zip(by_id, by_id[1:]) if 0 < ib - ia <= HARD_ID_GAP]
    names, photo, kind, imgs = [], [], [], []
    kinds = edits()
    for name in sample:
        img = Image.open(images_dir / name).convert("RGB")
        for k, fn in {"original": lambda im: im, **kinds}.items():
            names.append(f"{name}#{k}")
            photo.append(name)
            kind.append(k)
            imgs.append(fn(img))
    for a, b in hard:
        for name in (a, b):
            if name not in sample and f"{name}#original" not in names:
                names.append(f"{name}#original")
                photo.append(name)
                kind.append("original")
                imgs.append(Image.open(images_dir / name).convert("RGB"))
    return names, photo, kind, imgs, hard


def embed(imgs, batch: int = 32) -> np.ndarray:
    from encoder import Encoder

    enc = Encoder.from_checkpoint(MODEL)
    out = []
    for s in range(0, len(imgs), batch):
        out.append(enc.encode_images(imgs[s:s + batch]))
        print(f"  embedded {min(len(imgs), s + batch)}/{len(imgs)}", file=sys.stderr)
    return np.concatenate(out).astype(np.float32)


def pair_scores(names, photo, kind, emb, hard):
    """positives: (kind, cosine) of each edit against its original; negatives: cosines of
    every pair of different photos' originals; hard: cosines of the consecutive shots."""
    row = {n: i for i, n in enumerate(names)}
    pos = [(kind[i], float(emb[i] @ emb[row[f"{photo[i]}#original"]]))
           for i in range(len(names)) if kind[i] != "original"]
    orig = [i for i in range(len(names)) if kind[i] == "original"]
    sims = emb[orig] @ emb[orig].T
    upper = np.triu_indices(len(orig), 1)
    neg = sims[upper]
    hard_s = np.asarray([float(emb[row[f"{a}#original"]] @ emb[row[f"{b}#original"]])
                         for a, b in hard])
    # every edit of one photo against every image of another (the pairs a pass compares)
    same = np.asarray(photo)[:, None] == np.asarray(photo)[None, :]
    all_cross = (emb @ emb.T)[np.triu(~same, 1)]
    return pos, neg, hard_s, all_cross


def sweep(pos, neg, hard_s, all_cross):
    print("| threshold | recall on edits | precision (edit pairs vs every pair of different "
          "images) | false pairs per million | consecutive shots above |")
    print("|---|---|---|---|---|")
    pos_s = np.asarray([s for _, s in pos])
    rows = []
    for t in THRESHOLDS:
        tp = int((pos_s > t).sum())
        fp = int((all_cross > t).sum())
        recall = tp / len(pos_s)
        precision = tp / (tp + fp) if tp + fp else 1.0
        rows.append((t, recall, precision))
        print(f"| {t:.2f} | {recall:.3f} ({tp}/{len(pos_s)}) | {precision:.4f} ({fp} false of "
              f"{len(all_cross)}) | {fp / len(all_cross) * 1e6:.1f} | "
              f"{int((hard_s > t).sum())}/{len(hard_s)} |")
    return rows


def per_kind(pos, threshold):
    kinds = {}
    for k, s in pos:
        kinds.setdefault(k, []).append(s)
    print(f"\nrecall per edit at {threshold:.2f} (median cosine to the original):")
    print("| edit | recall | median cosine | lowest |")
    print("|---|---|---|---|")
    for k, s in kinds.items():
        s = np.asarray(s)
        print(f"| {k} | {(s > threshold).mean():.3f} | {np.median(s):.3f} | {s.min():.3f} |")


def real_pass(names, photo, emb, threshold):
    from indexer.duplicates import find_duplicates
    from indexer.faiss_index import FaissIndex

    with tempfile.TemporaryDirectory() as tmp:
        index = FaissIndex(tmp)
        index.rebuild("bench", names, emb, ["e"] * len(names))
        report = find_duplicates(index, "bench", threshold)
    _summarise_pass(report, names, photo, f"embedding only, at {threshold:.2f}")


def cost(sizes, dim, threshold, seed=0):
    import faiss

    from indexer.duplicates import find_duplicates
    from indexer.faiss_index import FaissIndex

    print(f"\ncost of a full pass (synthetic clustered vectors, dim {dim}, threshold "
          f"{threshold:.2f}, FAISS threads {faiss.omp_get_max_threads()}):")
    print("| vectors | index | pass s | s per 100k vectors | groups |")
    print("|---|---|---|---|---|")
    rng = np.random.default_rng(seed)
    previous = None
    for n in sizes:
        centres = rng.normal(size=(max(1, n // 50), dim)).astype(np.float32)
        v = centres[rng.integers(0, len(centres), n)] + \
            rng.normal(scale=0.6, size=(n, dim)).astype(np.float32)
        v /= np.linalg.norm(v, axis=1, keepdims=True)
        keys = [f"p/{i:08d}.jpg" for i in range(n)]
        with tempfile.TemporaryDirectory() as tmp:
            index = FaissIndex(tmp)
            index.rebuild("bench", keys, v, ["e"] * n)
            kind = index.view("bench").manifest["index_params"]
            t0 = time.perf_counter()
            report = find_duplicates(index, "bench", threshold)
            seconds = time.perf_counter() - t0
        label = kind.get("kind", "?") + (f" nlist {kind['nlist']} nprobe {kind['nprobe']}"
                                         if kind.get("kind") == "ivf" else "")
        print(f"| {n} | {label} | {seconds:.1f} | {seconds / n * 1e5:.1f} | "
              f"{len(report.groups)} |")
        if previous is not None:
            growth = np.log(seconds / previous[1]) / np.log(n / previous[0])
            print(f"|  | growth {previous[0]} -> {n}: time ~ n^{growth:.2f} | | | |")
        previous = (n, seconds)


CANDIDATE_THRESHOLDS = (0.60, 0.65, 0.70, 0.75)


def check_label(check) -> str:
    return (f"{check.method} {check.features} kp, {check.size}px, >= {check.min_inliers} "
            "inliers")


def pixel_checks(spec: str) -> dict:
    """"orb:384:15:1000,sift:384:15:500" -> {label: PixelCheck}
    (method:size:min_inliers:keypoints)."""
    from indexer.duplicate_check import PixelCheck

    out = {}
    for item in spec.split(","):
        method, size, inliers, features = item.split(":")
        check = PixelCheck(method, int(size), int(features), min_inliers=int(inliers))
        out[check_label(check)] = check
    return out


def describe_all(check, imgs) -> tuple[list, float]:
    t0 = time.perf_counter()
    feats = [check.describe(im) for im in imgs]
    return feats, (time.perf_counter() - t0) / len(imgs)


def decode_seconds(n: int = 100) -> float:
    """Seconds to read and decode one Flickr8k JPEG as the pass does (photo_reader)."""
    from encoder.preprocessing import decode_image

    files = sorted((FLICKR / "Images").glob("*.jpg"))[:n]
    t0 = time.perf_counter()
    for f in files:
        decode_image(f.read_bytes(), min_side=384)
    return (time.perf_counter() - t0) / len(files)


def two_stage(names, photo, kind, emb, hard, imgs, checks, candidates, strict):
    """The candidate pairs at each candidate threshold confirmed by each pixel check: recall on
    the edits, precision over every pair of different images, consecutive shots confirmed."""
    row = {n: i for i, n in enumerate(names)}
    edit_pairs = [(i, row[f"{photo[i]}#original"]) for i in range(len(names))
                  if kind[i] != "original"]
    pos_s = np.asarray([emb[i] @ emb[j] for i, j in edit_pairs])
    same = np.asarray(photo)[:, None] == np.asarray(photo)[None, :]
    sims = emb @ emb.T
    cross = np.argwhere(np.triu(~same, 1) & (sims > min(candidates)))
    cross_s = sims[cross[:, 0], cross[:, 1]]
    n_cross = int(np.triu(~same, 1).sum())
    hard_rows = [(row[f"{a}#original"], row[f"{b}#original"]) for a, b in hard]
    hard_pairs = {tuple(sorted(p)) for p in hard_rows}
    print("\ntwo stages: candidates above the candidate threshold, confirmed on pixels "
          f"(pairs with an unreadable photo would be decided at {strict:.2f}):")
    print("| candidates above | pixel check | recall on edits | precision (edit pairs vs every "
          "pair of different images) | consecutive shots confirmed | ms per checked pair |")
    print("|---|---|---|---|---|---|")
    # candidates a library of different photos would check: pairs of different images above
    # the threshold, less the consecutive shots (chosen for being alike)
    rate = {c: (int((cross_s > c).sum()) - sum(1 for i, j in hard_rows if sims[i, j] > c))
            / n_cross for c in candidates}
    results = {}
    described: dict = {}  # (method, size, keypoints) -> (features, seconds per photo, inliers)
    for label, check in checks.items():
        kind_of_features = (check.method, check.size, check.features)
        if kind_of_features not in described:
            described[kind_of_features] = (*describe_all(check, imgs), {}, [0.0, 0])
        feats, describe_s, inliers, match_time = described[kind_of_features]

        def confirmed(i, j):
            key = (min(i, j), max(i, j))
            if key not in inliers:
                t0 = time.perf_counter()
                inliers[key] = check.inliers(feats[i], feats[j])
                match_time[0] += time.perf_counter() - t0
                match_time[1] += 1
            return inliers[key] >= check.min_inliers

        pos_ok = np.asarray([confirmed(i, j) if s > min(candidates) else False
                             for (i, j), s in zip(edit_pairs, pos_s)])
        cross_ok = np.asarray([confirmed(int(i), int(j)) for i, j in cross], bool)
        hard_all = sum(confirmed(i, j) for i, j in hard_rows)
        match_s = match_time[0] / max(1, match_time[1])
        for c in candidates:
            tp = int((pos_ok & (pos_s > c)).sum())
            fp = int((cross_ok & (cross_s > c)).sum())
            checked = int((pos_s > c).sum() + (cross_s > c).sum())
            hard_c = sum(1 for (i, j), ok, s in zip(cross, cross_ok, cross_s)
                         if ok and s > c and (int(i), int(j)) in hard_pairs)
            hard_above = sum(1 for i, j in hard_rows if sims[i, j] > c)
            recall, precision = tp / len(pos_s), tp / (tp + fp) if tp + fp else 1.0
            results[(c, label)] = dict(recall=recall, precision=precision, fp=fp,
                                       checked=checked, describe_s=describe_s,
                                       match_s=match_s, pos_ok=pos_ok & (pos_s > c),
                                       rate=rate[c])
            print(f"| {c:.2f} | {label} | {recall:.3f} ({tp}/{len(pos_s)}) | {precision:.4f} "
                  f"({fp} false of {n_cross}) | {hard_c}/{hard_above} above it "
                  f"({hard_all}/{len(hard_rows)} at any cosine) | {match_s * 1e3:.2f} |")
        print(f"|  | {label}: features {describe_s * 1e3:.1f} ms per photo | | | | |")
    return results, edit_pairs


def per_kind_two_stage(kind, edit_pairs, result, label):
    kinds: dict[str, list[bool]] = {}
    for (i, _), ok in zip(edit_pairs, result["pos_ok"]):
        kinds.setdefault(kind[i], []).append(bool(ok))
    print(f"\nrecall per edit, {label}:")
    print("| edit | recall |")
    print("|---|---|")
    for k, oks in kinds.items():
        print(f"| {k} | {np.mean(oks):.3f} |")


def real_two_stage_pass(names, photo, emb, imgs, check, candidate, strict):
    """indexer.duplicates with the pixel check, the labelled set's images as the store."""
    from indexer.duplicates import find_duplicates
    from indexer.faiss_index import FaissIndex

    image_of = dict(zip(names, imgs))
    with tempfile.TemporaryDirectory() as tmp:
        index = FaissIndex(tmp)
        index.rebuild("bench", names, emb, ["e"] * len(names))
        report = find_duplicates(index, "bench", strict, pixel_check=check,
                                 candidate_threshold=candidate,
                                 read_photo=lambda key, size: image_of[key])
    _summarise_pass(report, names, photo, f"candidates above {candidate:.2f}, pixel check "
                    f"{check_label(check)}")
    c = report.check
    print(f"  {c.candidates} candidate pairs, {c.checked} checked, {c.confirmed} confirmed, "
          f"{c.photos_read} photos read, {report.seconds:.1f} s in all")
    return report


def _summarise_pass(report, names, photo, how):
    owner = dict(zip(names, photo))
    mixed = [g for g in report.groups if len({owner[k] for k in g.keys}) > 1]
    group_of = {k: n for n, g in enumerate(report.groups) for k in g.keys}
    edits_found = sum(1 for k in names if not k.endswith("#original") and k in group_of and
                      group_of.get(f"{owner[k]}#original") == group_of[k])
    edits_all = sum(1 for k in names if not k.endswith("#original"))
    print(f"\nthe pass (indexer.duplicates, FAISS), {how}, over {len(names)} images: "
          f"{len(report.groups)} groups, {edits_found}/{edits_all} edits in their original's "
          f"group ({edits_found / edits_all:.3f}), {len(mixed)} groups mixing different photos"
          + (f" (e.g. {sorted({k.split('#')[0] for k in mixed[0].keys})[:4]})" if mixed else ""))


def check_cost(results, label, candidates, decode_s, n=100_000):
    """The pixel checks of a full pass over n different photos: the candidate pairs (at the
    rate measured here between different photos) each matched, each photo in them read and
    described once."""
    print(f"\npixel checks of a full pass over {n} photos, {label} (candidate pairs at the rate "
          "of pairs of different images here, consecutive shots left out; one core; besides "
          "the embedding pass, below):")
    print("| candidates above | candidate pairs per million | candidate pairs | photos read | "
          "read + features s | matching s | total s |")
    print("|---|---|---|---|---|---|---|")
    for c in candidates:
        r = results[(c, label)]
        pairs = r["rate"] * n * (n - 1) / 2
        photos = min(n, 2 * pairs)
        read_s = photos * (decode_s + r["describe_s"])
        match_s = pairs * r["match_s"]
        print(f"| {c:.2f} | {r['rate'] * 1e6:.1f} | {pairs:,.0f} | {photos:,.0f} | "
              f"{read_s:,.0f} | {match_s:,.0f} | {read_s + match_s:,.0f} |")
    print(f"(a photo: decode {decode_s * 1e3:.1f} ms + features "
          f"{results[(candidates[0], label)]['describe_s'] * 1e3:.1f} ms; a pair: "
          f"{results[(candidates[0], label)]['match_s'] * 1e3:.2f} ms. Candidate pairs grow with "
          "the square of the library, photos read at most with it.)")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=120, help="dev photos in the labelled set")
    p.add_argument("--threshold", type=float, default=None,
                   help="the threshold reported in detail (default: indexer.duplicates')")
    p.add_argument("--cost-sizes", default="25000,50000,100000")
    p.add_argument("--cache", help="an .npz of the labelled set's embeddings (made when absent)")
    p.add_argument("--skip-cost", action="store_true")
    p.add_argument("--checks", default="orb:384:10:500,orb:384:15:500,orb:384:25:500,"
                                       "orb:384:15:1000,sift:384:15:500",
                   help="pixel checks compared, method:size:min_inliers:keypoints, "
                        "comma-separated")
    p.add_argument("--candidates", default=",".join(f"{c:.2f}" for c in CANDIDATE_THRESHOLDS),
                   help="candidate thresholds of the two-stage decision")
    p.add_argument("--no-pixel-check", action="store_true", help="embedding-only rows alone")
    args = p.parse_args()
    from indexer.duplicates import (DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_PIXEL_CHECK,
                                    DEFAULT_THRESHOLD)

    threshold = args.threshold or DEFAULT_THRESHOLD
    header("Near duplicates")
    names, photo, kind, imgs, hard = labelled_set(args.n)
    cache = Path(args.cache) if args.cache else None
    if cache is not None and cache.is_file():
        emb = np.load(cache)["emb"]
    else:
        t0 = time.perf_counter()
        emb = embed(imgs)
        print(f"embedded {len(imgs)} images in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        if cache is not None:
            np.savez(cache, emb=emb)
    emb /= np.linalg.norm(emb, axis=1, keepdims=True)
    print(f"labelled set: {args.n} dev photos x {len(edits())} edits, {len(hard)} pairs of "
          f"consecutive shots (Flickr ids <= {HARD_ID_GAP} apart), {len(names)} images\n")
    pos, neg, hard_s, all_cross = pair_scores(names, photo, kind, emb, hard)
    sweep(pos, neg, hard_s, all_cross)
    print(f"\nconsecutive shots: median cosine {np.median(hard_s):.3f}, highest "
          f"{hard_s.max():.3f}; different photos: highest {neg.max():.3f}")
    per_kind(pos, threshold)
    real_pass(names, photo, emb, threshold)
    if not args.no_pixel_check:
        candidates = [float(c) for c in args.candidates.split(",")]
        checks = pixel_checks(args.checks)
        default_label = next((k for k, c in checks.items() if c == DEFAULT_PIXEL_CHECK), None)
        if default_label is None:  # the shipped check is always among the rows
            default_label = check_label(DEFAULT_PIXEL_CHECK)
            checks[default_label] = DEFAULT_PIXEL_CHECK
        if DEFAULT_CANDIDATE_THRESHOLD not in candidates:
            candidates.append(DEFAULT_CANDIDATE_THRESHOLD)
        results, edit_pairs = two_stage(names, photo, kind, emb, hard, imgs, checks,
                                        sorted(candidates), threshold)
        chosen = results[(DEFAULT_CANDIDATE_THRESHOLD, default_label)]
        per_kind_two_stage(kind, edit_pairs, chosen,
                           f"candidates above {DEFAULT_CANDIDATE_THRESHOLD:.2f}, {default_label}")
        real_two_stage_pass(names, photo, emb, imgs, DEFAULT_PIXEL_CHECK,
                            DEFAULT_CANDIDATE_THRESHOLD, threshold)
        check_cost(results, default_label, sorted(candidates), decode_seconds())
    if not args.skip_cost:
        from encoder.loading import read_scoring

        # the range search of the pass: at the candidate threshold when the pixel check runs
        searched_at = threshold if args.no_pixel_check else DEFAULT_CANDIDATE_THRESHOLD
        cost([int(s) for s in args.cost_sizes.split(",")], read_scoring(MODEL).index_dim,
             searched_at)


if __name__ == "__main__":
    main()
