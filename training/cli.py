"""`python -m training`: train the dual encoder on Flickr8k (or fine-tune an open_clip model),
export it for shipping and evaluate it; one command for the whole recipe, each step alone too.

  python -m training [train] [options]      train on Flickr8k train, evaluate on dev every
                                            --eval-every epochs, write a checkpoint (default
                                            runs/dual-encoder-<UTC time>.pt) and its card
  python -m training ship --out FILE [train options] [--int8-backbone]
                                            train keeping the best epoch, export to FILE,
                                            evaluate FILE on dev and every --eval-set, write
                                            its card and plots: a checkpoint ready to serve
  python -m training export [options]       one step alone (= python -m training.export)
  python -m training evaluate [options]     one step alone (= python -m training.evaluate)
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
from datetime import datetime, timezone
from pathlib import Path

from core.logs import setup_logging
from core.settings import REPO_ROOT, get_settings
from training.data import add_data_args, load_set_from_folder, load_splits
from training.query_styles import QUERY_STYLES, parse_styles
from training.train import LOSSES, TrainConfig

log = logging.getLogger(__name__)
# new checkpoints go here (git-ignored), never over the shipped MODEL_PATH unless --out says so
RUNS_DIR = REPO_ROOT / "runs"
COMMANDS = ("train", "ship", "export", "evaluate", "calibrate")


def add_train_args(p: argparse.ArgumentParser) -> None:
    add_data_args(p)
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
    p.add_argument("--unfreeze-text-layers", type=int, default=0,
                   help="fine-tune this many top layers of the text tower (over cached lower "
                        "layers; the image tower is locked, see --image-side); with --resume "
                        "it applies to the resumed model")
    p.add_argument("--image-side", default="locked", choices=["locked", "head"],
                   help="with --unfreeze-text-layers: the image head stays as it is, or trains")
    p.add_argument("--caption-variants", type=int, default=0,
                   help="with --unfreeze-text-layers: augmented copies of each caption cached "
                        "beside it (meaning kept: articles, adjectives, synonyms, case, typos)")
    p.add_argument("--typed-variants", type=typed_styles, default=(), metavar="STYLE[,STYLE]",
                   help="with --unfreeze-text-layers: a copy of each caption per query style as "
                        f"people type them ({', '.join(QUERY_STYLES[1:])}), drawn as the "
                        "augmented copies are")
    p.add_argument("--augment-p", type=float, default=0.5,
                   help="probability that a step uses one of a caption's copies (augmented or "
                        "typed) instead of the caption")
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


def typed_styles(value: str) -> tuple[str, ...]:
    """--typed-variants: query styles, comma-separated, each a copy ("caption" is the caption)."""
    try:
        return parse_styles(value, QUERY_STYLES[1:])
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def check_train_args(p: argparse.ArgumentParser, args) -> None:
    """Options that only the text-tower training reads are refused without it (never ignored)."""
    if not args.unfreeze_text_layers and (args.caption_variants or args.typed_variants
                                          or args.image_side != "locked"):
        p.error("--caption-variants, --typed-variants and --image-side apply to "
                "--unfreeze-text-layers N")
    if args.unfreeze_text_layers and args.model:
        p.error("--unfreeze-text-layers trains our dual encoder's text tower; with --model use "
                "--train-part")


def new_run_path() -> Path:
    return RUNS_DIR / f"dual-encoder-{datetime.now(timezone.utc):%Y%m%dT%H%M%SZ}.pt"


def make_trainer(args, out: Path):
    """The trainer the options ask for, over the splits they name; also returns where the data
    came from (for the card)."""
    from training.train import DualEncoderTrainer, build_model

    (train, dev), data_desc = load_splits(["train", "dev"], args.data, args.from_store)
    if args.train_limit:
        train = train.subset(args.train_limit)
    if args.dev_limit:
        dev = dev.subset(args.dev_limit)
    cfg = TrainConfig(epochs=args.epochs, batch_size=args.batch_size, lr=args.lr,
                      tail_lr=args.tail_lr, weight_decay=args.weight_decay, seed=args.seed,
                      device=args.device, amp=not args.no_amp, cache=not args.no_cache,
                      cache_dir=args.cache_dir, workers=args.workers, eval_every=args.eval_every,
                      position_dropout=args.position_dropout, query_bank=args.query_bank,
                      loss=args.loss, negatives_queue=args.negatives_queue,
                      keep_best=args.keep_best, image_side=args.image_side,
                      caption_variants=args.caption_variants,
                      typed_variants=args.typed_variants, augment_p=args.augment_p,
                      log_path=str(out.with_suffix(".log.jsonl")))
    eval_sets = [load_set_from_folder(f) for f in args.eval_set]
    if args.model:  # a pretrained open_clip model, end to end
        from encoder.loading import load_checkpoint
        from training.open_clip_train import OpenClipTrainer

        return OpenClipTrainer(load_checkpoint(args.model), train, dev, cfg, eval_sets,
                               args.train_part, args.last_blocks), data_desc
    from encoder.model import ModelConfig

    config = ModelConfig(image_backbone=args.image_backbone, text_backbone=args.text_backbone,
                         embed_dim=args.embed_dim, head=args.head, image_pool=args.image_pool,
                         image_tail_stages=args.unfreeze_image_stages,
                         text_tail_layers=args.unfreeze_text_layers,
                         image_weights=args.image_weights, text_weights=args.text_weights)
    model = build_model(config, args.resume)
    if args.unfreeze_text_layers:
        model.config.text_tail_layers = args.unfreeze_text_layers
        from training.text_tower import TextTowerTrainer

        return TextTowerTrainer(model, train, dev, cfg, eval_sets), data_desc
    return DualEncoderTrainer(model, train, dev, cfg, eval_sets), data_desc


def train(args, out: Path):
    """Train as the options say and write the checkpoint to `out`; returns (model id, trainer)."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.with_suffix(".log.jsonl").unlink(missing_ok=True)
    trainer, data_desc = make_trainer(args, out)
    return trainer.fit_and_save(out, data_desc), trainer


def train_command(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="python -m training [train]", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(p)
    p.add_argument("--out", help="checkpoint to write (default: runs/dual-encoder-<UTC time>.pt)")
    args = p.parse_args(argv)
    check_train_args(p, args)
    setup_logging()
    out = Path(args.out or new_run_path())
    model_id, trainer = train(args, out)
    selected = trainer.selected
    result = {"checkpoint": str(out), "model_id": model_id, "epoch": selected.get("epoch"),
              "dev": selected.get("dev"), **({"sets": selected["sets"]} if "sets" in selected
                                             else {})}
    if not args.no_plots and trainer.history:
        from training.plots import plot_examples, plot_history
        from training.train import embed_split

        plot_history(trainer.history, out.with_suffix(".curve.png"))
        if not args.model:
            model, cfg = trainer.model.to(trainer.device), trainer.cfg
            img, _, _ = embed_split(model, trainer.dev_split, cfg.cache_dir, trainer.device,
                                    cfg.cache, cfg.workers)
            plot_examples(model, trainer.dev_split, out.with_suffix(".examples.png"), img)
    log.info("checkpoint written to %s (serve it with MODEL_PATH=%s)", out, out)
    print(json.dumps(result, indent=2))
    return 0


def ship_command(argv: list[str]) -> int:
    from encoder.bundle import write_bundle
    from training.calibrate import calibrate
    from training.evaluate import evaluate_sets, record_evaluations
    from training.export import add_export_args, export_checkpoint

    p = argparse.ArgumentParser(
        prog="python -m training ship",
        description="Train (keeping the best epoch: --keep-best is implied), export the selected "
                    "weights to --out, evaluate that file on dev and every --eval-set, write "
                    "its model card (and plots) and calibrate its 0-100 match score on dev: the "
                    "steps `train`, `export`, `evaluate`, `calibrate` in one command.")
    add_train_args(p)
    p.add_argument("--out", required=True, help="the checkpoint to ship, e.g. "
                                                "models/flickr8k-dual-encoder.pt")
    p.add_argument("--train-out", help="the trained checkpoint before export (default: "
                                       "runs/dual-encoder-<UTC time>.pt)")
    p.add_argument("--query-styles", action="store_true",
                   help="also evaluate text->image per query style (see training.evaluate)")
    add_export_args(p)
    args = p.parse_args(argv)
    check_train_args(p, args)
    if args.model and args.int8_backbone:
        p.error("--int8-backbone stores our dual encoder's image tower; an open_clip "
                "fine-tune keeps only the weights that trained, in fp16")
    args.keep_best = True
    setup_logging()
    trained, out = Path(args.train_out or new_run_path()), Path(args.out)
    trained_id, trainer = train(args, trained)
    model_id = export_checkpoint(trained, out, args.int8_backbone)
    sets = [trainer.dev_split, *trainer.eval_sets]
    results = evaluate_sets(str(out), sets, trainer.cfg.cache_dir, trainer.device,
                            use_cache=trainer.cfg.cache, plots=not args.no_plots,
                            query_styles=QUERY_STYLES if args.query_styles else ())
    record_evaluations(str(out), results)
    # what a score means to a person (the match the API and the page show), fitted on dev
    calibrate(str(out), trainer.dev_split, trainer.cfg.cache_dir, trainer.device,
              use_cache=trainer.cfg.cache, source=args.data or "")
    # what the search service serves it from without torch
    log.info("serving bundle written to %s", write_bundle(out))
    log.info("shippable checkpoint written to %s (serve it with MODEL_PATH=%s)", out, out)
    print(json.dumps({"checkpoint": str(out), "model_id": model_id,
                      "trained": {"checkpoint": str(trained), "model_id": trained_id,
                                  "epoch": trainer.selected.get("epoch")},
                      "evaluations": results}, indent=2))
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    command = argv.pop(0) if argv and argv[0] in COMMANDS else "train"
    if command == "export":
        from training.export import main as export_main

        return export_main(argv)
    if command == "evaluate":
        from training.evaluate import main as evaluate_main

        return evaluate_main(argv)
    if command == "calibrate":
        from training.calibrate import main as calibrate_main

        return calibrate_main(argv)
    return ship_command(argv) if command == "ship" else train_command(argv)
