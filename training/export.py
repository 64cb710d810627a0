"""`python -m training export --checkpoint IN --out OUT [--int8-backbone]` (also `python -m
training.export`): re-save a checkpoint for shipping (fine-tuned image-tower weights as
per-channel int8), keeping its model card. The card's figures belong to the source weights and
move to `exported_from`: evaluate the exported file afterwards (`python -m training ship` does
both) so that the card describes the artifact that ships."""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone
from pathlib import Path

from core.settings import get_settings
from encoder.checkpoint import save_checkpoint
from encoder.loading import load_checkpoint
from encoder.model import DualEncoder
from training.data import add_data_args, load_splits
from training.features import text_features
from training.query_bank import build_query_bank
from training.train import describe_model, git_commit


def export_checkpoint(source: str | Path, out: str | Path, int8_backbone: bool = False,
                      bank_captions: list[str] | None = None, bank_size: int = 0, seed: int = 0,
                      card_extra: dict | None = None,
                      cache_dir: str | None = ".cache/features") -> str:
    """Write `source`'s weights to `out` (int8 image tower with `int8_backbone`); with
    `bank_size`, first rebuild the hubness bank from that many of `bank_captions` drawn with
    `seed`. Returns the exported model id."""
    loaded = load_checkpoint(source)
    model = loaded.model
    if bank_size:
        def embed_captions(ids: list[int]):
            chosen = [bank_captions[i] for i in ids]
            return model.embed_text_features(text_features(model.text_backbone, chosen, cache_dir))

        build_query_bank(model, len(bank_captions), bank_size, seed, embed_captions)
    # an open_clip model's card already describes its base weights and preprocessing
    described = describe_model(model) if isinstance(model, DualEncoder) else {}
    card = {**loaded.card, **described, **(card_extra or {})}
    card.pop("metrics", None)
    card.pop("evaluations", None)
    card.update(exported={"commit": git_commit(),
                          "date": datetime.now(timezone.utc).isoformat(timespec="seconds")})
    card["exported_from"] = {"model_id": loaded.model_id,
                             "metrics": loaded.card.get("metrics"),
                             "evaluations": loaded.card.get("evaluations"),
                             "storage": "int8 per-channel image tower" if int8_backbone else "fp16",
                             "query_bank": bank_size or None}
    return save_checkpoint(model, out, card, int8_backbone=int8_backbone)


def add_export_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--int8-backbone", action="store_true",
                   help="store the fine-tuned image-tower weights as per-channel int8")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training export", description=__doc__)
    p.add_argument("--checkpoint", default=get_settings().model_path, help="default: MODEL_PATH")
    p.add_argument("--out", required=True)
    add_export_args(p)
    p.add_argument("--query-bank", type=int, default=0,
                   help="(re)build the hubness-correction bank from N random train captions")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--card-extra", default="{}", help="JSON merged into the model card")
    p.add_argument("--cache-dir", default=".cache/features")
    add_data_args(p)
    args = p.parse_args(argv)
    captions = None
    if args.query_bank:
        (train,), _ = load_splits(["train"], args.data, args.from_store)
        captions, _ = train.flat_captions()
    model_id = export_checkpoint(args.checkpoint, args.out, args.int8_backbone, captions,
                                 args.query_bank, args.seed, json.loads(args.card_extra),
                                 args.cache_dir)
    print(json.dumps({"out": args.out, "model_id": model_id}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
