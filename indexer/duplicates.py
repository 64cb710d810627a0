"""Near-duplicate photos over a whole published version (`python -m indexer duplicates`): the
same shot re-encoded, resized, cropped, slightly rotated, brightened or framed as a screenshot.

Two stages. Candidates: every pair of photos whose embeddings' cosine is above the candidate
threshold (`VectorIndex.near_pairs`: FAISS's range search, Milvus's range search, or any
backend's searches). Confirmation (indexer.duplicate_check): each candidate pair is checked on
the photos' pixels, read from the object store once per pass; a pair with a photo that cannot
be read is decided by the embedding alone, at the stricter `threshold`. Without the pixel check
(`--no-pixel-check`, or no store given) the pairs above `threshold` are the duplicates, as the
search routes' `dedupe=true` decides between photos the report does not cover. The confirmed
pairs join one graph; its connected components are the groups, largest first. The report names
the version and model it describes, both thresholds, the check's parameters and what it
decided, and is written atomically beside the index (INDEX_DIR/
duplicates.json; the pixel verdicts, reused while both photos are unchanged, beside it in
duplicate-verdicts.sqlite): the API serves it (`GET /duplicates`) while that version is served. Nothing
is deleted: which copy to keep is the person's decision. (On Milvus an update writes into the
published collection, whose name stays: a report of it lags behind such updates until the next
pass, which the DAGs run after every publish.)

The defaults come from bench/duplicates.py (BENCHMARKS.md §13): edits of a Flickr8k photo
against different photos, consecutive shots of one photographer among them.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable

import numpy as np

from core.atomic import write_atomic
from indexer.duplicate_check import CheckSummary, PairVerdicts, PixelCheck, confirm_pairs

# cosine of two photos' embeddings above which they are duplicates by the embedding alone
# (BENCHMARKS.md §13)
DEFAULT_THRESHOLD = 0.85
# with the pixel check: cosine above which a pair is a candidate, and the check (§13)
DEFAULT_CANDIDATE_THRESHOLD = 0.70
DEFAULT_PIXEL_CHECK = PixelCheck()
REPORT_FORMAT = "flickr-search-duplicates/1"
REPORT_FILE = "duplicates.json"
VERDICTS_FILE = "duplicate-verdicts.sqlite"  # the pixel verdicts kept between passes


@dataclass
class DuplicateGroup:
    keys: list[str]  # sorted
    similarity: float  # the lowest cosine among the pairs that joined the group


@dataclass
class DuplicateReport:
    version: str
    model_id: str
    backend: str
    threshold: float  # the embedding-only decision (no pixel check, or an unreadable photo)
    photos: int  # photos the pass compared
    groups: list[DuplicateGroup]  # largest first, then by first key
    created: str = field(default_factory=lambda: datetime.now(timezone.utc).isoformat(
        timespec="seconds"))
    seconds: float = 0.0
    # the pixel check (None: embedding only): the cosine above which pairs were candidates,
    # the check's parameters (duplicate_check.PixelCheck) and what it decided
    candidate_threshold: float | None = None
    pixel_check: dict | None = None
    check: CheckSummary | None = None

    @property
    def duplicated_photos(self) -> int:
        return sum(len(g.keys) for g in self.groups)

    def to_dict(self) -> dict:
        return {"format": REPORT_FORMAT, **asdict(self)}

    @classmethod
    def from_dict(cls, raw) -> "DuplicateReport":
        """ValueError when it is not a report of this format."""
        if not isinstance(raw, dict) or raw.get("format") != REPORT_FORMAT:
            raise ValueError("not a duplicates report")
        try:
            groups = [DuplicateGroup([str(k) for k in g["keys"]], float(g["similarity"]))
                      for g in raw["groups"]]
            candidate = raw.get("candidate_threshold")  # absent from embedding-only reports
            pixel_check = raw.get("pixel_check")
            if pixel_check is not None and not isinstance(pixel_check, dict):
                raise ValueError
            check = raw.get("check")
            return cls(str(raw["version"]), str(raw["model_id"]), str(raw["backend"]),
                       float(raw["threshold"]), int(raw["photos"]), groups,
                       str(raw["created"]), float(raw.get("seconds", 0.0)),
                       None if candidate is None else float(candidate), pixel_check,
                       None if check is None else CheckSummary(**check))
        except (KeyError, TypeError, ValueError):
            raise ValueError("a damaged duplicates report") from None


def check_threshold(threshold: float) -> float:
    if not (isinstance(threshold, (int, float)) and math.isfinite(threshold)
            and 0.0 < threshold < 1.0):
        raise ValueError("the duplicate threshold is a cosine between 0 and 1 (exclusive)")
    return float(threshold)


def group_pairs(keys_a: list[str], keys_b: list[str], scores) -> list[DuplicateGroup]:
    """Pairs (a, b, cosine) -> their connected components, largest first."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components

    names = sorted(set(keys_a) | set(keys_b))
    if not names:
        return []
    number = {k: n for n, k in enumerate(names)}
    a = np.fromiter((number[k] for k in keys_a), np.int64, len(keys_a))
    b = np.fromiter((number[k] for k in keys_b), np.int64, len(keys_b))
    graph = coo_matrix((np.ones(len(a)), (a, b)), shape=(len(names), len(names)))
    _, label = connected_components(graph, directed=False)
    scores = np.asarray(scores, np.float64)
    lowest = np.full(label.max() + 1, np.inf)
    np.minimum.at(lowest, label[a], scores)
    members: dict[int, list[str]] = {}
    for name, group in zip(names, label):
        members.setdefault(int(group), []).append(name)
    groups = [DuplicateGroup(keys, round(float(lowest[g]), 4)) for g, keys in members.items()]
    return sorted(groups, key=lambda g: (-len(g.keys), g.keys[0]))


def find_duplicates(index, model_id: str, threshold: float = DEFAULT_THRESHOLD,
                    columns: int | None = None, progress: bool = False,
                    on_progress: Callable[[int], None] | None = None, *,
                    read_photo: Callable | None = None,
                    pixel_check: PixelCheck | None = DEFAULT_PIXEL_CHECK,
                    candidate_threshold: float = DEFAULT_CANDIDATE_THRESHOLD,
                    verdicts_path: str | Path | None = None) -> DuplicateReport:
    """The groups of near duplicates in the version `index` publishes for `model_id`.
    columns: how many leading components of a stored vector are the embedding (a model with a
    hubness correction stores one more; `Scoring.dim`), None: all. progress: progress bars.

    read_photo(key, size) -> PIL image (duplicate_check.photo_reader of the object store): with
    it and a `pixel_check`, pairs above `candidate_threshold` are confirmed on pixels (a pair
    with an unreadable photo: by the embedding above `threshold`); without either, the pairs
    above `threshold` are the duplicates. verdicts_path: the pixel verdicts kept between passes
    (duplicate_check.PairVerdicts; None: every candidate pair is checked)."""
    import time

    from tqdm import tqdm

    threshold = check_threshold(threshold)
    two_stage = read_photo is not None and pixel_check is not None
    search_at = threshold
    if two_stage:
        search_at = check_threshold(candidate_threshold)
        if search_at > threshold:
            raise ValueError("the candidate threshold is at most the embedding-only threshold")
    view = index.view(model_id)
    t0 = time.perf_counter()
    keys_a: list[str] = []
    keys_b: list[str] = []
    scores: list[np.ndarray] = []
    with tqdm(total=view.count, desc="duplicates", unit="photo", disable=not progress) as bar:
        def done(n: int) -> None:
            bar.update(n)
            if on_progress is not None:
                on_progress(n)

        for a, b, s in index.near_pairs(view, search_at, columns=columns, progress=done):
            keys_a += a
            keys_b += b
            scores.append(np.asarray(s, np.float32))
    all_scores = np.concatenate(scores) if scores else np.zeros(0, np.float32)
    summary = None
    if two_stage:
        verdicts = etags = None
        if verdicts_path is not None:
            verdicts = PairVerdicts(verdicts_path, pixel_check)
            etags = index.indexed(model_id).etags
        try:
            with tqdm(total=len(keys_a), desc="pixel check", unit="pair",
                      disable=not progress) as bar:
                keep, summary = confirm_pairs(keys_a, keys_b, all_scores, pixel_check,
                                              read_photo, threshold, progress=bar.update,
                                              verdicts=verdicts, etags=etags)
            if verdicts is not None:
                verdicts.finish()
        finally:
            if verdicts is not None:
                verdicts.close()
        keys_a = [k for k, y in zip(keys_a, keep) if y]
        keys_b = [k for k, y in zip(keys_b, keep) if y]
        all_scores = all_scores[keep]
    groups = group_pairs(keys_a, keys_b, all_scores)
    return DuplicateReport(view.version, view.model_id, index.backend, threshold, view.count,
                           groups, seconds=round(time.perf_counter() - t0, 3),
                           candidate_threshold=search_at if two_stage else None,
                           pixel_check=pixel_check.params() if two_stage else None,
                           check=summary)


def report_path(index_dir: str | Path) -> Path:
    return Path(index_dir) / REPORT_FILE


def verdicts_path(index_dir: str | Path) -> Path:
    return Path(index_dir) / VERDICTS_FILE


def write_report(report: DuplicateReport, path: str | Path) -> None:
    write_atomic(path, json.dumps(report.to_dict(), ensure_ascii=False) + "\n", durable=True)


def read_report(path: str | Path) -> DuplicateReport | None:
    """The report at `path` (None: none written); ValueError when it is damaged."""
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        return None
    try:
        return DuplicateReport.from_dict(json.loads(raw))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        raise ValueError("a damaged duplicates report (not JSON)") from None
