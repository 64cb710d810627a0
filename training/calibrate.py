"""`python -m training.calibrate --checkpoint PATH [--split dev] [--data FOLDER]`: fit the 0-100
match scale (encoder/match_scale.py) on a Flickr8k split's true caption->image pairs and write
it into the checkpoint's model card as `match_scale` (the model id does not change: the card is
not part of it). The split is loaded and encoded as `python -m training.evaluate` does."""
from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from core.logs import setup_logging
from core.settings import get_settings
from encoder.loading import load_checkpoint, update_card
from encoder.match_scale import CARD_FIELD, DEFAULT_KNOTS, MatchScale
from encoder.scoring import Scoring
from encoder.spec import OpenClipSpec, parse_model_spec
from training.data import add_data_args, load_splits
from training.train import embed_split, git_commit, resolve_device

log = logging.getLogger(__name__)


def fit_match_scale(scoring: Scoring, img, txt, owner: list[int], fitted_on: str,
                    n_knots: int = DEFAULT_KNOTS) -> MatchScale:
    """The scale of the true pairs (caption i, image owner[i]): their score as an index ranks
    it (`scoring`) and their plain cosine."""
    img = np.asarray(img, np.float32)[np.asarray(owner)]
    txt = np.asarray(txt, np.float32)
    scores = (scoring.query_vectors(txt) * scoring.image_vectors(img)).sum(1)
    cosines = (txt * img).sum(1)
    return MatchScale.fit(scores, cosines, fitted_on, scoring.describe(), n_knots)


def calibrate(path: str, split, cache_dir: str | None = ".cache/features", device: str = "cpu",
              use_cache: bool = True, source: str = "", write: bool = True) -> MatchScale:
    """Encode `split` with the checkpoint's model, fit its match scale and (unless `write` is
    False) write it into the card. The hook the training flow calls after saving a model."""
    loaded = load_checkpoint(path)
    model = loaded.model.to(device)
    img, txt, owner = embed_split(model, split, cache_dir, device, use_cache=use_cache)
    # a local folder by its name only: the card ships, this machine's paths do not
    where = f" from {Path(source).name if Path(source).exists() else source}" if source else ""
    scale = fit_match_scale(Scoring.of(model), img, txt, owner,
                            f"Flickr8k {split.name} ({len(split)} images, {len(owner)} true "
                            f"caption->image pairs{where}), model {loaded.model_id}")
    if write:
        if isinstance(parse_model_spec(path), OpenClipSpec):
            raise ValueError(f"{path}: an open_clip model spec has no model card to write the "
                             "match scale into (fine-tune it into a checkpoint first)")
        update_card(path, **{CARD_FIELD: {
            **scale.to_card(),
            "fitted": datetime.now(timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit()}})
    return scale


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.calibrate", description=__doc__)
    add_data_args(p)
    p.add_argument("--checkpoint", default=get_settings().model_path, help="default: MODEL_PATH")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"],
                   help="Flickr8k split of --data whose true pairs the scale is fitted on")
    p.add_argument("--limit", type=int, help="first N images only (for a quick check)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--cache-dir", default=".cache/features")
    p.add_argument("--no-cache", action="store_true", help="run the full image tower on pixels")
    p.add_argument("--no-write-card", action="store_true", help="print the scale only")
    args = p.parse_args(argv)
    setup_logging()

    (split,), source = load_splits([args.split], args.data, args.from_store)
    if args.limit:
        split = split.subset(args.limit)
    write = not args.no_write_card
    if write and isinstance(parse_model_spec(args.checkpoint), OpenClipSpec):
        p.error(f"{args.checkpoint} is an open_clip spec: it has no model card to write "
                "(use --no-write-card to see its scale)")
    scale = calibrate(args.checkpoint, split, args.cache_dir, resolve_device(args.device),
                      use_cache=not args.no_cache, source=source, write=write)
    if write:
        log.info("match scale written into the card of %s", args.checkpoint)
    print(json.dumps(scale.to_card(), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
