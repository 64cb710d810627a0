"""`python -m encoder bundle [MODEL_PATH] [--out DIR] [--cache-dir DIR] [--if-needed]`: write the
serving bundle of a checkpoint or open_clip spec (encoder/bundle.py); MODEL_PATH defaults to the
setting's. `--if-needed` keeps a bundle that still matches the model (a deployment's start)."""
from __future__ import annotations

import argparse
import logging
import sys


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m encoder", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    b = sub.add_parser("bundle", help="write the serving bundle (ONNX towers, tokenizer, "
                                      "preprocessing, scoring) of a model")
    b.add_argument("model_path", nargs="?", help="a checkpoint file or open_clip spec "
                                                 "(default: MODEL_PATH)")
    b.add_argument("--out", help="the bundle folder (default: beside the checkpoint; open_clip "
                                 "specs: under the ONNX cache folder)")
    b.add_argument("--cache-dir", help="the ONNX cache folder (default: ONNX_CACHE_DIR)")
    b.add_argument("--if-needed", action="store_true",
                   help="only when there is no bundle of this model yet, or it is stale")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from core.settings import get_settings
    from encoder.bundle import BundleMissing, StaleBundle, read_bundle, write_bundle

    settings = get_settings()
    model_path = args.model_path or settings.model_path
    cache_dir = args.cache_dir or settings.onnx_cache_dir
    try:
        if args.if_needed:
            try:
                print(read_bundle(model_path, cache_dir, directory=args.out).dir)
                return 0
            except (BundleMissing, StaleBundle) as exc:
                logging.info("%s", exc)
        folder = write_bundle(model_path, args.out, cache_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
