"""`python -m training.evaluate --checkpoint PATH [--split dev]`: Recall@1/5/10 both directions and
median rank, the standard Flickr8k protocol; written into the checkpoint's model card by default."""
from __future__ import annotations

import argparse
import json
from datetime import datetime, timezone

from core.logs import setup_logging
from core.settings import get_settings
from encoder.checkpoint import load_checkpoint, update_card
from training.cli import add_data_args, load_splits
from training.train import corrected_metrics, embed_split, git_commit, resolve_device


def evaluate_checkpoint(path: str, split, cache_dir: str | None = ".cache/features",
                        device: str = "cpu", use_cache: bool = True, plots: bool = False) -> dict:
    loaded = load_checkpoint(path)
    model = loaded.model.to(device)
    img, txt, owner = embed_split(model, split, cache_dir, device, use_cache=use_cache)
    if plots:
        from pathlib import Path

        from training.plots import plot_examples, plot_history

        out = Path(path)
        plot_examples(model, split, out.with_suffix(".examples.png"), img)
        history = loaded.card.get("training_history") or loaded.card.get("training", {}).get("history")
        if history:
            plot_history(history, out.with_suffix(".curve.png"))
    return {"model_id": loaded.model_id, "split": split.name, "images": len(split),
            "captions": len(owner), **corrected_metrics(model, img, txt, owner)}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training.evaluate", description=__doc__)
    add_data_args(p)
    p.add_argument("--checkpoint", default=get_settings().model_path, help="default: MODEL_PATH")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test"])
    p.add_argument("--limit", type=int, help="first N images only (not the standard protocol)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--cache-dir", default=".cache/features")
    p.add_argument("--no-cache", action="store_true", help="run the full image tower on pixels")
    p.add_argument("--no-write-card", action="store_true")
    p.add_argument("--plots", action="store_true",
                   help="write <checkpoint>.examples.png (and .curve.png from the card's history)")
    args = p.parse_args(argv)
    setup_logging()

    (split,), _ = load_splits(args, [args.split])
    if args.limit:
        split = split.subset(args.limit)
    result = evaluate_checkpoint(args.checkpoint, split, args.cache_dir,
                                 resolve_device(args.device), use_cache=not args.no_cache,
                                 plots=args.plots)
    result["evaluated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
    result["commit"] = git_commit()
    if not args.no_write_card and not args.limit:
        update_card(args.checkpoint, metrics=result)
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
