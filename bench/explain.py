"""Is the explanation map more than decoration, and what does GET /explain cost?

    python bench/explain.py [--checkpoint models/flickr8k-dual-encoder.pt] [--rounds 40]

On coco-ood-dev (130 MS-COCO photos, 5 captions each), with the COCO instance boxes of those
photos (bench/data/coco_ood_dev_boxes.json, taken from the two public COCO samples the set came
from; `--extract-boxes FILE...` rewrites it from their instances_train2017.json files):

- for each caption that names a COCO category the photo has boxes of (caption words matched to
  the category's name, its plural and a few synonyms: SYNONYMS), the share of the map's mass
  inside that category's boxes (scaled to the resized photo). The map is what /explain draws:
  `encoder.scoring.cell_map` (each cell's contribution to the photo's score with the query,
  those against it at 0), upsampled bicubically to the photo (search_api.explain.heat); its
  mass is the map less its minimum (the overlay's colour scale), summed per pixel.
  Baselines on the same photo and boxes: a uniform map (the boxes' area share) and a centre
  bias (a Gaussian at the centre, sigma a quarter of each side). Means, and the share of cases
  where the map puts more mass in the boxes than each baseline. Also the pointing game (is the
  map's highest pixel inside the boxes?) against the photo's centre point and a random point
  (the boxes' area share). A caption describes more than the object it names, so the same is
  measured with the category's name alone as the query (`word` columns).
- latency through the HTTP routes in process, interleaved over the 130 photos indexed with
  FAISS and served from the model's serving bundle (the default configuration): GET /explain
  (PNG, 512 px, cache off: each call computes the map) and the same answered from the cache,
  against POST /search_images_by_text; p50, p99 and the ratio of the p50s.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, ROOT, header, interleaved, median, pct, save_json, table  # noqa: E402

COCO = ROOT.parent / "shared" / "datasets" / "coco-ood-dev"
BOXES = Path(__file__).resolve().parent / "data" / "coco_ood_dev_boxes.json"
CENTRE_SIGMA = 0.25  # of each side
# words a caption uses for a category besides its name and plural
SYNONYMS = {
    "person": ["man", "men", "woman", "women", "people", "boy", "boys", "girl", "girls", "child",
               "children", "kid", "kids", "guy", "guys", "lady", "ladies", "player", "players",
               "skier", "skiers", "surfer", "surfers", "skateboarder", "rider", "persons"],
    "bicycle": ["bike", "bikes"], "motorcycle": ["motorbike", "motorbikes"],
    "airplane": ["plane", "planes", "jet", "jets", "aircraft", "airliner"],
    "couch": ["sofa", "sofas"], "tv": ["television", "televisions"],
    "dining table": ["table", "tables"], "cell phone": ["phone", "phones", "cellphone"],
    "sports ball": ["ball", "balls"], "potted plant": ["plant", "plants"],
    "donut": ["doughnut", "doughnuts"], "laptop": ["computer"], "car": ["cars"],
}


def extract_boxes(files: list[str], out: Path = BOXES) -> dict:
    """The instance boxes of coco-ood-dev's photos from COCO instances_*.json files."""
    ids = {int(re.search(r"coco_(\d+)", n).group(1)): n
           for n in (COCO / "images.txt").read_text().split()}
    images, categories = {}, {}
    for f in files:
        d = json.loads(Path(f).read_text())
        categories.update({c["id"]: c["name"] for c in d["categories"]})
        for im in d["images"]:
            if im["id"] in ids and ids[im["id"]] not in images:
                images[ids[im["id"]]] = {"coco_id": im["id"], "width": im["width"],
                                         "height": im["height"], "boxes": [], "_id": im["id"]}
        by_id = {v["_id"]: v for v in images.values()}
        for a in d["annotations"]:
            im = by_id.get(a["image_id"])
            if im is not None and not im.get("_done"):
                im["boxes"].append([categories[a["category_id"]],
                                    *[round(float(x), 1) for x in a["bbox"]]])
        for im in by_id.values():
            im["_done"] = True
    for im in images.values():
        im.pop("_id"), im.pop("_done", None)
    data = {"source": "COCO 2017 train instances (CC BY 4.0), from Obmutescence/COCO-MINI and "
                      "lizhogn/tiny_coco_dataset; boxes [category, x, y, w, h] in the original "
                      "photo's pixels",
            "images": dict(sorted(images.items()))}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, separators=(",", ":")) + "\n")
    return data


def category_words() -> dict[str, str]:
    """word -> category (names of one or two words, their plurals, the synonyms)."""
    from_boxes = {b[0] for im in json.loads(BOXES.read_text())["images"].values()
                  for b in im["boxes"]}
    words = {}
    for cat in from_boxes:
        for w in [cat, cat + "s", cat + "es", *SYNONYMS.get(cat, [])]:
            words[w] = cat
    return words


def named_categories(caption: str, words: dict[str, str]) -> set[str]:
    text = " " + " ".join(re.findall(r"[a-z]+", caption.lower())) + " "
    return {cat for w, cat in words.items() if f" {w} " in text}


def box_mask(boxes: list, category: str, orig: tuple[int, int], size: tuple[int, int]):
    (ow, oh), (w, h) = orig, size
    mask = np.zeros((h, w), bool)
    sx, sy = w / ow, h / oh
    for cat, x, y, bw, bh in boxes:
        if cat == category:
            x0, y0 = int(np.floor(x * sx)), int(np.floor(y * sy))
            x1, y1 = int(np.ceil((x + bw) * sx)), int(np.ceil((y + bh) * sy))
            mask[max(0, y0):min(h, y1), max(0, x0):min(w, x1)] = True
    return mask


def centre_map(w: int, h: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    return np.exp(-(((xs + .5 - w / 2) / (CENTRE_SIGMA * w)) ** 2 +
                    ((ys + .5 - h / 2) / (CENTRE_SIGMA * h)) ** 2) / 2)


def mass_inside(values: np.ndarray, mask: np.ndarray) -> float:
    m = values - values.min()
    total = float(m.sum())
    return float(m[mask].sum()) / total if total > 0 else float(mask.mean())


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--extract-boxes", nargs="+", metavar="INSTANCES_JSON")
    args = p.parse_args()
    if args.extract_boxes:
        data = extract_boxes(args.extract_boxes)
        n = sum(len(im["boxes"]) for im in data["images"].values())
        print(f"{len(data['images'])} photos, {n} boxes -> {BOXES}")
        return 0
    header("Explanations: the map's mass inside the named object's boxes; /explain cost")
    from fastapi.testclient import TestClient
    from PIL import Image

    from core.settings import Settings
    from encoder.bundle import read_bundle, write_bundle
    from encoder.scoring import cell_map
    from encoder.serving import ServingEncoder
    from indexer.faiss_index import FaissIndex
    from indexer.repository import IndexRepository
    from objectstore import LocalStore
    from search_api.explain import heat
    from search_api.main import build_service, create_app

    tmp = Path(tempfile.mkdtemp(prefix="explain-"))
    folder = write_bundle(args.checkpoint, out=tmp / "bundle", cache_dir=tmp / "onnx")
    enc = ServingEncoder(read_bundle(args.checkpoint, directory=folder))
    boxes = json.loads(BOXES.read_text())["images"]
    names = (COCO / "images.txt").read_text().split()
    captions: dict[str, list[str]] = {}
    for line in (COCO / "captions.token.txt").read_text().splitlines():
        name, text = line.split("\t", 1)
        captions.setdefault(name.split("#")[0], []).append(text)
    words = category_words()

    # --- is the map where the named object is -----------------------------------------------
    rows, per_category = [], {}
    cells_graph = enc.session("image.cells")
    embeddings = {}
    for name in names:
        image = Image.open(COCO / "Images" / name).convert("RGB")
        pixels = enc.preprocess(image)
        cells = cells_graph.run(None, {"pixels": pixels[None]})[0][0]
        embeddings[name] = enc.encode_pixels(pixels[None])[0]
        info = boxes[name]
        w, h = image.size
        centre = centre_map(w, h)
        pairs = [(c, cat) for c in captions[name] for cat in named_categories(c, words)
                 if any(b[0] == cat for b in info["boxes"])]
        if not pairs:
            continue
        queries = enc.encode_texts([c for c, _ in pairs])
        word_queries = dict(zip(sorted({cat for _, cat in pairs}),
                                enc.encode_texts(sorted({cat for _, cat in pairs}))))
        for (caption, cat), q in zip(pairs, queries):
            mask = box_mask(info["boxes"], cat, (info["width"], info["height"]), (w, h))
            if not mask.any() or mask.all():
                continue
            shown = heat(cell_map(cells, q), (w, h), (0, 0, 1, 1))
            ours = mass_inside(shown, mask)
            peak = np.unravel_index(np.argmax(shown), shown.shape)
            word = heat(cell_map(cells, word_queries[cat]), (w, h), (0, 0, 1, 1))
            row = {"photo": name, "category": cat, "ours": ours, "uniform": float(mask.mean()),
                   "centre": mass_inside(centre, mask), "peak_in": bool(mask[peak]),
                   "centre_in": bool(mask[h // 2, w // 2]), "word": mass_inside(word, mask),
                   "word_peak_in": bool(mask[np.unravel_index(np.argmax(word), word.shape)])}
            rows.append(row)
            per_category.setdefault(cat, []).append(row)
    def summarise(label, group):
        return {"cases": label,
                "map mass in boxes": np.mean([r["ours"] for r in group]),
                "uniform": np.mean([r["uniform"] for r in group]),
                "centre bias": np.mean([r["centre"] for r in group]),
                "map > uniform": np.mean([r["ours"] > r["uniform"] for r in group]),
                "map > centre": np.mean([r["ours"] > r["centre"] for r in group]),
                "word: mass": np.mean([r["word"] for r in group]),
                "word > uniform": np.mean([r["word"] > r["uniform"] for r in group]),
                "word > centre": np.mean([r["word"] > r["centre"] for r in group]),
                "peak in boxes": np.mean([r["peak_in"] for r in group]),
                "word: peak in": np.mean([r["word_peak_in"] for r in group]),
                "centre point in boxes": np.mean([r["centre_in"] for r in group])}

    summary = []
    for label, group in [("all", rows), *sorted(
            ((f"{cat} ({len(g)})", g) for cat, g in per_category.items() if len(g) >= 15),
            key=lambda kv: -len(kv[1]))]:
        summary.append(summarise(
            label if label != "all" else f"all ({len(group)} captions, "
                                         f"{len({r['photo'] for r in group})} photos)", group))
    small = [r for r in rows if r["uniform"] < 0.25]
    summary.append(summarise(f"boxes < 25 % of the photo ({len(small)})", small))
    off = [r for r in rows if not r["centre_in"]]
    summary.append(summarise(f"boxes off the centre ({len(off)})", off))
    print(table(summary))
    print()

    # --- what /explain costs against a search ------------------------------------------------
    store = LocalStore(tmp / "store", "b")
    prefix = Settings.model_fields["images_prefix"].default
    keys = [f"{prefix}coco/{n}" for n in names]
    for key, name in zip(keys, names):
        store.put(key, (COCO / "Images" / name).read_bytes(), "image/jpeg")
    index = FaissIndex(IndexRepository(tmp / "index"))
    emb = np.stack([embeddings[n] for n in names])
    index.rebuild(enc.model_id, keys, enc.scoring.image_vectors(emb), ["e"] * len(keys))
    latency = {}
    for cache_items, label in [(0, "uncached"), (64, "cached")]:
        settings = Settings(index_dir=str(tmp / "index"), reload_interval_s=0,
                            explain_cache_items=cache_items, _env_file=None)
        service = build_service(settings, encoder=enc, index=index, store=store)
        with TestClient(create_app(settings, service)) as client:
            texts = [captions[n][0] for n in names]
            state = {"i": 0}

            def explain():
                i = state["i"] % len(names) if label == "uncached" else 0
                state["i"] += 1
                r = client.get("/explain", params={"key": keys[i], "q": texts[i]})
                assert r.status_code == 200, r.text

            def search():
                r = client.post("/search_images_by_text",
                                json={"text": texts[state["i"] % len(names)], "top_k": 10})
                assert r.status_code == 200, r.text

            times = interleaved({f"/explain ({label})": explain, "search": search},
                                args.rounds, warmup=3)
            latency.update({k if k != "search" else f"search (beside {label})": v
                            for k, v in times.items()})
        service.close()
    lat = [{"route": k, "p50 ms": median(v) * 1e3, "p99 ms": pct(v, 99) * 1e3}
           for k, v in latency.items()]
    print(table(lat))
    for label in ("uncached", "cached"):
        ratio = median(latency[f"/explain ({label})"]) / median(latency[f"search (beside {label})"])
        print(f"/explain ({label}) p50 / search p50: {ratio:.2f}")
    save_json("explain", {"summary": summary, "rows": rows, "latency": lat,
                          "args": vars(args)})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
