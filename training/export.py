"""`python -m training.export --checkpoint IN --out OUT [--int8-backbone]`: re-save a checkpoint for
shipping (fine-tuned image-tower weights as per-channel int8), keeping its model card. Evaluate
the exported file afterwards: the card's metrics must describe the artifact that ships."""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

import torch

from core.settings import get_settings
from encoder.checkpoint import save_checkpoint
from encoder.loading import load_checkpoint
from training.cli import add_data_args, load_splits
from training.features import text_features
from training.train import describe_model, git_commit


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.export", description=__doc__)
    p.add_argument("--checkpoint", default=get_settings().model_path, help="default: MODEL_PATH")
    p.add_argument("--out", required=True)
    p.add_argument("--int8-backbone", action="store_true")
    p.add_argument("--query-bank", type=int, default=0,
                   help="(re)build the hubness-correction bank from N random train captions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--card-extra", default="{}", help="JSON merged into the model card")
    p.add_argument("--cache-dir", default=".cache/features")
    add_data_args(p)
    args = p.parse_args(argv)
    loaded = load_checkpoint(args.checkpoint)
    if args.query_bank:
        (train,), _ = load_splits(args, ["train"])
        texts, _ = train.flat_captions()
        pick = torch.randperm(len(texts), generator=torch.Generator().manual_seed(args.seed))
        chosen = [texts[i] for i in pick[: args.query_bank].tolist()]
        with torch.no_grad():
            feats = text_features(loaded.model.text_backbone, chosen, args.cache_dir)
            loaded.model.set_query_bank(loaded.model.embed_text_features(feats))
    card = {**loaded.card, **describe_model(loaded.model), **json.loads(args.card_extra)}
    # figures belong to the source weights: re-run the evaluation on the exported file
    card.pop("metrics", None)
    card.pop("evaluations", None)
    card.update(exported={"commit": git_commit(),
                          "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    card["exported_from"] = {"model_id": loaded.model_id,
                             "metrics": loaded.card.get("metrics"),
                             "evaluations": loaded.card.get("evaluations"),
                             "storage": "int8 per-channel image tower" if args.int8_backbone else "fp16",
                             "query_bank": args.query_bank or None}
    model_id = save_checkpoint(loaded.model, args.out, card, int8_backbone=args.int8_backbone)
    print(json.dumps({"out": args.out, "model_id": model_id}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
