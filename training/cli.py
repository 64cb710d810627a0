"""`python -m training`: train the dual encoder on Flickr8k train, evaluate on dev, save a checkpoint."""
from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone
from pathlib import Path

from core.logs import setup_logging
from core.settings import REPO_ROOT, get_settings
from encoder.model import ModelConfig
from training.train import LOSSES, TrainConfig

log = logging.getLogger(__name__)
# new checkpoints go here (git-ignored), never over the shipped MODEL_PATH unless --out says so
RUNS_DIR = REPO_ROOT / "runs"


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", help="Flickr8k folder (or Flickr8k_Dataset.zip); default FLICKR8K_SOURCE")
    p.add_argument("--from-store", action="store_true",
                   help="stream images and captions from the configured object store (MinIO)")


def load_splits(args, names: list[str]):
    from training.data import load_split_from_folder, load_split_from_store

    s = get_settings()
    if args.from_store:
        from objectstore import open_store

        store = open_store(s)
        return [load_split_from_store(store, n, s.images_prefix, s.text_prefix) for n in names], \
            store.describe()
    root = args.data or s.flickr8k_source
    return [load_split_from_folder(root, n) for n in names], str(root)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    add_data_args(p)
    p.add_argument("--out", help="checkpoint to write (default: runs/dual-encoder-<UTC time>.pt)")
    p.add_argument("--batch_size", "--batch-size", type=int, default=256)
    p.add_argument("--epochs", type=int, default=20)
    p.add_argument("--lr", type=float, default=1e-3, help="heads' learning rate")
    p.add_argument("--tail-lr", type=float, default=1e-4, help="fine-tuned image stages' lr")
    p.add_argument("--weight-decay", type=float, default=0.05)
    p.add_argument("--embed-dim", type=int, default=get_settings().embedding_dim,
                   help="default: EMBEDDING_DIM")
    p.add_argument("--model", metavar="SPEC",
                   help="fine-tune a pretrained open_clip model instead: open_clip:<arch>:<weights>")
    p.add_argument("--train-part", default="projections",
                   choices=["projections", "last-blocks", "all"],
                   help="with --model: what trains (bf16 autocast on CUDA)")
    p.add_argument("--last-blocks", type=int, default=1,
                   help="with --train-part last-blocks: blocks of each tower that train")
    p.add_argument("--image-backbone", default="efficientnet_lite0")
    p.add_argument("--text-backbone", default="all-MiniLM-L6-v2")
    p.add_argument("--image-weights", help="local weights file for the image backbone")
    p.add_argument("--text-weights", help="local model folder for the text backbone")
    p.add_argument("--head", default="linear", choices=["linear", "mlp"])
    p.add_argument("--image-pool", default="avg", choices=["avg", "attention"])
    p.add_argument("--unfreeze-image-stages", type=int, default=0,
                   help="fine-tune this many top stages of the image tower")
    p.add_argument("--position-dropout", type=float, default=0.0)
    p.add_argument("--query-bank", type=int, default=1000,
                   help="training captions kept for hubness correction at search time (0: off)")
    p.add_argument("--loss", default="one-caption", choices=LOSSES,
                   help="one drawn caption per image and step, or all of them as positives")
    p.add_argument("--negatives-queue", type=int, default=0,
                   help="keep this many recent image/text embeddings as extra negatives")
    p.add_argument("--eval-set", action="append", default=[], metavar="FOLDER",
                   help="a Flickr8k-style folder evaluated beside dev (repeatable), e.g. "
                        "coco-ood-dev")
    p.add_argument("--keep-best", action="store_true",
                   help="end with the epoch whose text->image recall, averaged over dev and "
                        "the eval sets, is best (evaluated every --eval-every epochs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--no-amp", action="store_true", help="no bf16 autocast on CUDA")
    p.add_argument("--no-cache", action="store_true",
                   help="decode+augment images every epoch (GPU path) instead of cached features")
    p.add_argument("--cache-dir", default=".cache/features")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--resume", help="start from this checkpoint's weights (its config wins)")
    p.add_argument("--train-limit", type=int, help="use only the first N train images")
    p.add_argument("--dev-limit", type=int, help="evaluate on the first N dev images")
    p.add_argument("--eval-every", type=int, default=1)
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    setup_logging()

    from training.data import load_set_from_folder
    from training.train import build_model, train_and_save

    (train, dev), desc = load_splits(args, ["train", "dev"])
    if args.train_limit:
        train = train.subset(args.train_limit)
    if args.dev_limit:
        dev = dev.subset(args.dev_limit)
    out = Path(args.out or RUNS_DIR / f"dual-encoder-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.pt")
    out.parent.mkdir(parents=True, exist_ok=True)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      tail_lr=args.tail_lr, weight_decay=args.weight_decay, seed=args.seed,
                      device=args.device, amp=not args.no_amp, cache=not args.no_cache,
                      cache_dir=args.cache_dir, workers=args.workers, eval_every=args.eval_every,
                      position_dropout=args.position_dropout, query_bank=args.query_bank,
                      loss=args.loss, negatives_queue=args.negatives_queue,
                      keep_best=args.keep_best,
                      log_path=str(out.with_suffix(".log.jsonl")))
    out.with_suffix(".log.jsonl").unlink(missing_ok=True)
    eval_sets = [load_set_from_folder(f) for f in args.eval_set]
    if args.model:  # a pretrained open_clip model, end to end
        from encoder import load_checkpoint
        from training.open_clip_train import fine_tune_and_save

        loaded = load_checkpoint(args.model)
        model = loaded.model
        model_id, trainer = fine_tune_and_save(loaded, train, dev, cfg, str(out), desc,
                                               eval_sets, args.train_part, args.last_blocks)
    else:
        config = ModelConfig(image_backbone=args.image_backbone,
                             text_backbone=args.text_backbone, embed_dim=args.embed_dim,
                             head=args.head, image_pool=args.image_pool,
                             image_tail_stages=args.unfreeze_image_stages,
                             image_weights=args.image_weights, text_weights=args.text_weights)
        model = build_model(config, args.resume)
        model_id, trainer = train_and_save(model, train, dev, cfg, str(out), desc, eval_sets)
    selected = trainer.selected
    result = {"checkpoint": str(out), "model_id": model_id, "epoch": selected.get("epoch"),
              "dev": selected.get("dev"), **({"sets": selected["sets"]} if "sets" in selected
                                             else {})}
    if not args.no_plots and trainer.history:
        from training.plots import plot_examples, plot_history
        from training.train import embed_split

        plot_history(trainer.history, out.with_suffix(".curve.png"))
        if not args.model:
            img, _, _ = embed_split(model.to(trainer.device), dev, cfg.cache_dir,
                                    trainer.device, cfg.cache, cfg.workers)
            plot_examples(model, dev, out.with_suffix(".examples.png"), img)
    log.info("checkpoint written to %s (serve it with MODEL_PATH=%s)", out, out)
    print(json.dumps(result, indent=2))
    return 0
