"""`python -m training evaluate --checkpoint PATH [--split dev] [--set FOLDER ...]` (also
`python -m training.evaluate`): Recall@1/5/10 both directions and median rank (the standard
Flickr8k protocol) on a Flickr8k split and on any Flickr8k-style folder, each reported under its
own name and written into the checkpoint's model card by default (`metrics` = dev,
`evaluations` = every set evaluated). `--query-styles` adds text->image figures for queries as
people type them (training.query_styles), derived from each set's captions."""
from __future__ import annotations

import argparse
import json
import logging
from datetime import datetime, timezone

import numpy as np
import torch

from core.logs import setup_logging
from core.settings import get_settings
from encoder.loading import load_checkpoint, read_card, update_card
from encoder.scoring import Scoring
from encoder.spec import OpenClipSpec, parse_model_spec
from training.data import Flickr8kSplit, add_data_args, load_set_from_folder, load_splits
from training.query_styles import DRAWN_STYLES, QUERY_STYLES, parse_styles, styled_queries
from training.recall import retrieval_metrics
from training.train import corrected_metrics, embed_split, git_commit, resolve_device

log = logging.getLogger(__name__)


@torch.no_grad()
def query_style_metrics(model, split: Flickr8kSplit, img: torch.Tensor,
                        styles: tuple[str, ...] = QUERY_STYLES, seeds: int = 1) -> dict:
    """Text->image figures per query style, under the scoring the service uses, over the
    split's images embedded once (`img`). A drawn style (DRAWN_STYLES) with `seeds` > 1: the
    mean over that many draws of its queries (one draw moves R@1 by a few queries), each
    draw's R@1 in `R@1_per_seed`."""
    model.eval()
    texts, owner = split.flat_captions()
    scoring = Scoring.of(model)
    images = scoring.image_vectors(img) if scoring.corrected else img

    def figures(queries: list[str]) -> dict:
        # the text tower itself, not the feature cache: a fine-tuned tower changes its output
        emb = torch.cat([model.encode_texts(queries[i:i + 256]).float().cpu()
                         for i in range(0, len(queries), 256)])
        if scoring.corrected:
            emb = scoring.query_vectors(emb)
        t2i = retrieval_metrics(images, emb, owner)["text_to_image"]
        return {k: t2i[k] for k in ("R@1", "R@5", "R@10", "median_rank")}

    out = {}
    for style in styles:
        draws = [figures(styled_queries(texts, style, seed))
                 for seed in range(seeds if style in DRAWN_STYLES else 1)]
        out[style] = {k: float(np.mean([d[k] for d in draws])) for k in draws[0]}
        if len(draws) > 1:
            out[style]["R@1_per_seed"] = [d["R@1"] for d in draws]
    return out


def evaluate_checkpoint(path: str, split, cache_dir: str | None = ".cache/features",
                        device: str = "cpu", use_cache: bool = True, plots: bool = False,
                        query_styles: tuple[str, ...] = (), style_seeds: int = 1) -> dict:
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
    result = {"model_id": loaded.model_id, "split": split.name, "images": len(split),
              "captions": len(owner), **corrected_metrics(model, img, txt, owner)}
    if query_styles:
        result["query_styles"] = query_style_metrics(model, split, img, query_styles,
                                                     style_seeds)
    return result


def evaluate_sets(path: str, sets: list[Flickr8kSplit], cache_dir: str | None = ".cache/features",
                  device: str = "cpu", use_cache: bool = True, plots: bool = False,
                  query_styles: tuple[str, ...] = (), style_seeds: int = 1) -> dict:
    """Each set's figures under its name, stamped with the date and commit; `plots` draws the
    first set's examples (dev when it is evaluated) and the card's training curve;
    `query_styles` adds each set's text->image figures in those query styles, the drawn ones
    averaged over `style_seeds` draws."""
    results = {}
    for n, split in enumerate(sets):
        result = evaluate_checkpoint(path, split, cache_dir, device, use_cache=use_cache,
                                     plots=plots and n == 0, query_styles=query_styles,
                                     style_seeds=style_seeds)
        result["evaluated"] = datetime.now(timezone.utc).isoformat(timespec="seconds")
        result["commit"] = git_commit()
        results[split.name] = result
    return results


def record_evaluations(path: str, results: dict) -> None:
    """Write the figures into the checkpoint's card: `evaluations` (keeping other sets' figures)
    and, for dev, `metrics`."""
    card = read_card(path)
    fields = {"evaluations": {**card.get("evaluations", {}), **results}}
    if "dev" in results:
        fields["metrics"] = results["dev"]
    update_card(path, **fields)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m training evaluate", description=__doc__)
    add_data_args(p)
    p.add_argument("--checkpoint", default=get_settings().model_path, help="default: MODEL_PATH")
    p.add_argument("--split", default="dev", choices=["train", "dev", "test", "none"],
                   help="Flickr8k split of --data to evaluate (none: only the --set folders)")
    p.add_argument("--set", action="append", default=[], metavar="FOLDER",
                   help="a Flickr8k-style folder (a *.token.txt + images.txt), e.g. "
                        "coco-ood-dev; repeatable")
    p.add_argument("--limit", type=int, help="first N images only (not the standard protocol)")
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "mps", "cpu"])
    p.add_argument("--cache-dir", default=".cache/features")
    p.add_argument("--no-cache", action="store_true", help="run the full image tower on pixels")
    p.add_argument("--no-write-card", action="store_true")
    p.add_argument("--plots", action="store_true",
                   help="write <checkpoint>.examples.png of the first set evaluated (and "
                        ".curve.png from the card's history)")
    p.add_argument("--query-styles", nargs="?", const=",".join(QUERY_STYLES), default=None,
                   metavar="STYLE[,STYLE]",
                   help="also text->image per query style derived from each set's captions "
                        f"(all, or those named: {', '.join(QUERY_STYLES)})")
    p.add_argument("--style-seeds", type=int, default=1, metavar="N",
                   help="with --query-styles: the drawn styles (keywords, question, typos) "
                        "averaged over N draws of their queries")
    args = p.parse_args(argv)
    try:
        styles = parse_styles(args.query_styles) if args.query_styles is not None else ()
    except ValueError as exc:
        p.error(f"--query-styles: {exc}")
    if args.style_seeds < 1:
        p.error("--style-seeds must be at least 1")
    setup_logging()

    sets = [load_set_from_folder(f) for f in args.set]
    if args.split != "none":
        (split,), _ = load_splits([args.split], args.data, args.from_store)
        sets.insert(0, split)
    if not sets:
        p.error("nothing to evaluate: --split none and no --set")
    if args.limit:
        sets = [s.subset(args.limit) for s in sets]
    device = resolve_device(args.device)
    results = evaluate_sets(args.checkpoint, sets, args.cache_dir, device,
                            use_cache=not args.no_cache, plots=args.plots,
                            query_styles=styles, style_seeds=args.style_seeds)
    if isinstance(parse_model_spec(args.checkpoint), OpenClipSpec):  # zero-shot: a spec has no card file to write
        log.info("%s is an open_clip spec: results printed, no model card written",
                 args.checkpoint)
    elif not args.no_write_card and not args.limit:
        record_evaluations(args.checkpoint, results)
    print(json.dumps(results[sets[0].name] if len(sets) == 1 else results, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
