"""`python -m indexer {ingest,add,rebuild,update,status,verify,prune,duplicates}` — one command,
one stage each.

`add PATH` puts a folder of your own photos into the store (any depth, every format of
`encoder.image_formats`) and updates the index; `status` names the files the decoders refused;
`verify` checks that the published version holds exactly the store's images; `duplicates`
finds groups of near-duplicate photos in it and writes the report the API serves.
"""
from __future__ import annotations

import argparse
import json
import sys
from functools import partial

from core.logs import setup_logging
from core.settings import get_settings


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m indexer", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ing = sub.add_parser("ingest", help="copy Flickr8k (folder, zip path or URL) into the store")
    ing.add_argument("--source", help="folder / Flickr8k_Dataset.zip path or URL "
                                      "(default: FLICKR8K_SOURCE)")
    ing.add_argument("--text-source", help="Flickr8k_text.zip path or URL (zip sources)")
    ing.add_argument("--split", default="all", choices=["all", "train", "dev", "test"])
    ing.add_argument("--limit", type=int, help="ingest at most N images (smoke runs)")
    add = sub.add_parser("add", help="put every photo under a folder into the store (keyed by "
                                     "its relative path under IMAGES_PREFIX), then update "
                                     "the index")
    add.add_argument("path", help="a folder of photos (searched at any depth)")
    add.add_argument("--prefix", help="a folder under IMAGES_PREFIX to put them in (default: "
                                      "IMAGES_PREFIX itself)")
    add.add_argument("--no-update", action="store_true", help="only upload; do not embed")
    for name, text in (("rebuild", "embed every image and publish a fresh index version"),
                       ("update", "embed only new/changed images; drop removed ones"),
                       ("add", None)):
        sp = add if name == "add" else sub.add_parser(name, help=text)
        sp.add_argument("--batch-size", type=int, default=None)
        sp.add_argument("--retry-refused", action="store_true",
                        help="try the files the decoders refused before again")
    sub.add_parser("status", help="model id, version, count, objects not indexed, files "
                                  "refused by the decoders")
    pr = sub.add_parser("prune", help="delete old index versions")
    pr.add_argument("--keep", type=int, help="versions to keep (default: INDEX_KEEP_VERSIONS)")
    ver = sub.add_parser("verify", help="check that the published version holds exactly the "
                                        "store's images, current etags, current model; exit 1 "
                                        "when not")
    ver.add_argument("--json", action="store_true", help="the full report as JSON")
    ver.add_argument("--show", type=int, default=10, help="keys listed per kind of problem")
    ver.add_argument("--since", type=_point_in_time, metavar="TIME",
                     help="as a run that listed the store at TIME (epoch seconds or ISO 8601, "
                          "UTC unless it says): uploads and changes dated after it are "
                          "reported as changed during the run, not as missing or stale")
    dup = sub.add_parser("duplicates", help="groups of near-duplicate photos in the published "
                                            "version; the report is written beside the index "
                                            "(GET /duplicates serves it)")
    dup.add_argument("--threshold", type=float, default=None,
                     help="cosine of two photos' embeddings above which they are duplicates "
                          "by the embedding alone: without the pixel check, and for a pair "
                          "with a photo that cannot be read (default: indexer.duplicates."
                          "DEFAULT_THRESHOLD)")
    dup.add_argument("--candidate-threshold", type=float, default=None,
                     help="cosine above which a pair is checked on the photos' pixels "
                          "(default: indexer.duplicates.DEFAULT_CANDIDATE_THRESHOLD)")
    dup.add_argument("--no-pixel-check", action="store_true",
                     help="decide by the embedding alone (reads no photo)")
    dup.add_argument("--json", action="store_true", help="print the whole report as JSON")
    dup.add_argument("--show", type=int, default=10, help="groups listed (largest first)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    args = p.parse_args(argv)
    setup_logging()

    from flickr8k.sources import open_resolved
    from indexer import jobs
    from indexer.ingest import add_folder, ingest
    from indexer.listing import RefusalTable
    from indexer.vector_index import open_index
    from objectstore import StoreError, open_store

    s = get_settings()
    index = None
    try:
        index = open_index(s)  # INDEX_BACKEND: the same commands on FAISS files and on Milvus
        if args.cmd == "prune":
            print(json.dumps(jobs.prune_versions(args.keep, s)))
            return 0
        if args.cmd == "duplicates":
            return _duplicates(s, index, args)
        # an object store or Milvus outage is waited out as the DAGs' steps wait it out
        retried = partial(jobs.with_retries, retry_on=jobs.TRANSIENT_ERRORS)
        store = retried(open_store, s)
        if args.cmd == "ingest":  # the source resolved and checked as the DAG's first task does
            src = open_resolved(jobs.fetch_archives(args.source, args.text_source, settings=s))
            report = retried(ingest, src, store, s.images_prefix, s.text_prefix,
                             split=args.split, limit=args.limit, progress=not args.quiet)
            print(json.dumps(report.__dict__))
        elif args.cmd == "status":
            print(json.dumps(_status(s, store, index), indent=2))
        elif args.cmd == "verify":
            return _verify(s, store, index, args)
        else:
            from encoder.serving import image_encoder
            from indexer import pipeline

            out = {}
            if args.cmd == "add":
                added = retried(add_folder, args.path, store, s.images_prefix, args.prefix,
                                progress=not args.quiet)
                out["added"] = {**added.__dict__, "total": added.total}
                if args.no_update:
                    print(json.dumps(out, indent=2))
                    return 0
            refusals = RefusalTable.in_dir(s.index_dir)
            if args.retry_refused:
                refusals.clear()
            fn = pipeline.rebuild if args.cmd == "rebuild" else pipeline.update
            # the serving bundle's image tower (no torch) unless IMAGE_RUNTIME=torch / a GPU
            report = retried(fn, store, image_encoder(s), index, s.images_prefix,
                             batch_size=args.batch_size or s.embed_batch_size,
                             progress=not args.quiet, refusals=refusals)
            out = {**out, "index": report.to_dict()} if out else report.to_dict()
            print(json.dumps(out, indent=2))
    except (StoreError, FileNotFoundError, ValueError, RuntimeError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        if index is not None:
            index.close()  # a milvus-lite server pymilvus started for a .db file stops with it
    return 0


def _status(s, store, index) -> dict:
    from encoder import read_card
    from indexer.listing import RefusalTable
    from indexer.pipeline import status

    try:
        model_id = read_card(s.model_path)["model_id"]
    except (FileNotFoundError, ValueError):
        model_id = None
    return status(store, index, s.images_prefix, model_id, RefusalTable.in_dir(s.index_dir))


def _verify(s, store, index, args) -> int:
    """0 when the invariant holds, 1 when not (the report says how)."""
    from encoder import read_card
    from indexer.listing import RefusalTable
    from indexer.verify import verify

    try:
        model_id = read_card(s.model_path)["model_id"]
    except (FileNotFoundError, ValueError):
        model_id = None  # no model: any published version is another model's
    result = verify(store, index, s.images_prefix, model_id, shown=max(0, args.show),
                    refused=RefusalTable.in_dir(s.index_dir).etags(), since=args.since)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.ok else 1


def _duplicates(s, index, args) -> int:
    """Find the groups, write the report beside the index, print a summary (or the report)."""
    from encoder.loading import read_card, read_scoring
    from indexer.duplicate_check import photo_reader
    from indexer.duplicates import DEFAULT_CANDIDATE_THRESHOLD, DEFAULT_THRESHOLD, \
        find_duplicates, report_path, verdicts_path, write_report
    from objectstore import open_store

    model_id = read_card(s.model_path)["model_id"]
    # the embedding's components only: a stored hubness-correction column is not the photo
    columns = read_scoring(s.model_path).dim
    threshold = DEFAULT_THRESHOLD if args.threshold is None else args.threshold
    candidate = DEFAULT_CANDIDATE_THRESHOLD if args.candidate_threshold is None \
        else args.candidate_threshold
    read_photo = None if args.no_pixel_check else photo_reader(open_store(s),
                                                               s.limits.max_image_pixels)
    report = find_duplicates(index, model_id, threshold, columns=columns,
                             progress=not args.quiet, read_photo=read_photo,
                             candidate_threshold=min(candidate, threshold),
                             verdicts_path=verdicts_path(s.index_dir))
    write_report(report, report_path(s.index_dir))
    if args.json:
        print(json.dumps(report.to_dict(), indent=2, ensure_ascii=False))
        return 0
    if report.check is None:
        how = f"cosine above {report.threshold}"
    else:
        c = report.check
        how = (f"cosine above {report.candidate_threshold}, confirmed on pixels: {c.confirmed} "
               f"of {c.checked} pairs checked"
               + (f" ({c.reused} verdicts kept from the last pass)" if c.reused else "")
               + (f", {c.without_pixels} pairs with an unreadable photo decided at cosine "
                  f"{report.threshold}" if c.without_pixels else ""))
    print(f"version {report.version}: {len(report.groups)} groups of near duplicates "
          f"({report.duplicated_photos} of {report.photos} photos; {how}) in "
          f"{report.seconds:.1f} s; report: {report_path(s.index_dir)}")
    for group in report.groups[:max(0, args.show)]:
        print(f"  {len(group.keys)} photos (cosine >= {group.similarity}): "
              + ", ".join(group.keys[:5]) + (" ..." if len(group.keys) > 5 else ""))
    return 0


def _point_in_time(text: str) -> float:
    """Epoch seconds, or an ISO 8601 time (UTC unless it names a zone) -> epoch seconds."""
    from datetime import datetime, timezone

    try:
        return float(text)
    except ValueError:
        pass
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"not epoch seconds or an ISO 8601 time: {text!r}") from None
    return (when if when.tzinfo else when.replace(tzinfo=timezone.utc)).timestamp()
