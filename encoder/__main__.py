"""`python -m encoder bundle [MODEL_PATH] [--out DIR] [--cache-dir DIR]`: write the serving
bundle of a checkpoint or open_clip spec (encoder/bundle.py); MODEL_PATH defaults to the
setting's."""
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
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from core.settings import get_settings
    from encoder.bundle import write_bundle

    settings = get_settings()
    model_path = args.model_path or settings.model_path
    try:
        folder = write_bundle(model_path, args.out, args.cache_dir or settings.onnx_cache_dir)
    except (FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
