"""Index-time test-time augmentation: does averaging an image's vector over views help retrieval?

    python bench/tta.py [--checkpoint PATH ...] [--set FOLDER ...]

For each checkpoint and evaluation set (default: the Flickr8k dev split and, when given, any
Flickr8k-style folder such as coco-ood-dev), the image tower (eager, full tower on pixels) embeds
every image as the index would (plain) and its horizontal mirror; the variants are the plain
vector, and the normalised mean of plain + mirror ("flip"). Text queries are never augmented:
TTA costs indexing time only (2 x the image forward passes for "flip"). Recall@1/5/10 both ways
on the vectors the service searches (scoring's hubness correction when the model has one).
"""
from __future__ import annotations

import argparse

import torch
import torch.nn.functional as F

from common import FLICKR, MODEL, header, save_json, table


@torch.inference_mode()
def image_embeddings(model, split, transform, flip: bool, batch: int = 32) -> torch.Tensor:
    from encoder.preprocessing import decode_image

    out = []
    for i in range(0, len(split), batch):
        x = torch.stack([transform(decode_image(split.read(n)))
                         for n in split.images[i:i + batch]])
        out.append(model.encode_images(x.flip(-1) if flip else x).float())
    return torch.cat(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", action="append", default=[])
    p.add_argument("--set", action="append", default=[], help="Flickr8k-style folder")
    p.add_argument("--cache-dir", default=".cache/features", help="text feature cache")
    args = p.parse_args()
    header("index-time TTA (horizontal flip) per model and set")

    from encoder import load_checkpoint
    from encoder.preprocessing import eval_transform
    from encoder.scoring import Scoring
    from training.data import load_set_from_folder, load_split_from_folder
    from training.features import text_features
    from training.recall import retrieval_metrics

    sets = [load_split_from_folder(str(FLICKR), "dev"), *map(load_set_from_folder, args.set)]
    rows = []
    for path in args.checkpoint or [MODEL]:
        model = load_checkpoint(path).model.eval()
        scoring = Scoring.of(model)
        transform = eval_transform(model.image_spec)
        for split in sets:
            texts, owner = split.flat_captions()
            with torch.inference_mode():
                txt = model.embed_text_features(text_features(
                    model.text_backbone, texts, args.cache_dir, progress=False)).float()
            plain = image_embeddings(model, split, transform, flip=False)
            mirror = image_embeddings(model, split, transform, flip=True)
            for name, img in (("plain", plain), ("flip", F.normalize(plain + mirror, dim=-1))):
                m = retrieval_metrics(torch.from_numpy(scoring.image_vectors(img.numpy())),
                                      torch.from_numpy(scoring.query_vectors(txt.numpy())), owner)
                rows.append({"model": path.rsplit("/", 1)[-1], "set": split.name, "variant": name,
                             **{f"t2i {k}": m["text_to_image"][k] for k in ("R@1", "R@5", "R@10")},
                             **{f"i2t {k}": m["image_to_text"][k] for k in ("R@1", "R@5", "R@10")},
                             "image passes": 1 if name == "plain" else 2})
            print(table(rows[-2:]), flush=True)
    print()
    print(table(rows))
    save_json("tta", {"rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
