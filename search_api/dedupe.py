"""Near duplicates collapsed in search results (`dedupe=true` on the search routes): the
best-ranked photo of each group stays, with how many photos of the ranking were collapsed into
it and the first of their keys (RequestLimits.MAX_COLLAPSED_KEYS).

Where the groups come from, per request:

- "report": the duplicates report (indexer.duplicates, INDEX_DIR/duplicates.json) describes the
  served version and counts as many photos as it holds: a key -> group lookup, nothing read
  from the index.
- "report+page": a report of the served version that no longer covers every photo (Milvus
  updates the published collection in place): its groups, and the ranked photos' own stored
  vectors for the rest.
- "page": no report of the served version: the ranked photos' stored vectors, compared with one
  another at the duplicates pass's threshold (indexer.duplicates.DEFAULT_THRESHOLD).
- "none": no report, and a backend whose views cannot hand vectors back: nothing collapsed.

Collapsing walks the ranking best first: a photo joins the best-ranked kept photo of its report
group, or else the first kept photo it is a near duplicate of; otherwise it is kept. A longer
ranking never changes how its first photos collapse, so pages of a deeper search agree with
those of a shorter one.

The duplicates report is parsed once per version of its file (`load_report`, also what
`GET /duplicates` serves)."""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from cachetools import LRUCache

from indexer.duplicates import DEFAULT_THRESHOLD, DuplicateReport, read_report

# candidates compared per block of the vector comparison (a block x candidates matrix)
BLOCK = 256

MODES = ("report", "report+page", "page", "none")


@dataclass
class _Parsed:
    report: DuplicateReport
    group_of: dict[str, int] = field(default_factory=dict)


_reports: LRUCache = LRUCache(maxsize=4)  # (path, mtime, size) -> parsed: read once per write
_reports_lock = threading.Lock()


def _parse(path: Path) -> _Parsed | None:
    try:
        stat = path.stat()
    except FileNotFoundError:
        return None
    key = (str(path), stat.st_mtime_ns, stat.st_size)
    with _reports_lock:
        hit = _reports.get(key)
    if hit is None:
        report = read_report(path)
        if report is None:
            return None
        hit = _Parsed(report, {k: n for n, g in enumerate(report.groups) for k in g.keys})
        with _reports_lock:
            _reports[key] = hit
    return hit


def load_report(path: str | Path) -> DuplicateReport | None:
    """The report at `path`, parsed once per version of the file (None: none written).
    ValueError when damaged, OSError when unreadable."""
    parsed = _parse(Path(path))
    return None if parsed is None else parsed.report


@dataclass(frozen=True)
class Groups:
    """Where one request's groups come from (see the module doc)."""
    mode: str
    threshold: float
    group_of: dict[str, int] | None = None  # report: key -> group number
    vectors: bool = False  # compare the ranked photos' stored vectors


def groups_for(path: str | Path | None, view, model_id: str, has_vectors: bool) -> Groups:
    """The groups a request against `view` collapses by: the report at `path` when it describes
    that version (and model), else the photos' own vectors when the view can hand them back."""
    parsed = None
    if path is not None:
        try:
            parsed = _parse(Path(path))
        except (OSError, ValueError):  # unreadable or damaged: as if none were written
            parsed = None
    if parsed is not None and (parsed.report.version != view.version
                               or parsed.report.model_id != model_id):
        parsed = None
    if parsed is None:
        return Groups("page" if has_vectors else "none", DEFAULT_THRESHOLD, None, has_vectors)
    report = parsed.report
    if report.photos == view.count or not has_vectors:
        return Groups("report", report.threshold, parsed.group_of, False)
    return Groups("report+page", report.threshold, parsed.group_of, True)


@dataclass(frozen=True)
class Collapsed:
    kept: list[int]  # positions in the ranking of the photos kept, best first
    into: dict[int, list[int]]  # kept position -> positions collapsed into it, best first


def collapse(keys: list[str], groups: Groups, vectors: np.ndarray | None = None) -> Collapsed:
    """The ranking `keys` (best first) with near duplicates collapsed into the best-ranked photo
    they go with. vectors: the photos' embeddings [len(keys), dim] (unit length), compared
    when groups.vectors; None: the report alone."""
    n = len(keys)
    kept: list[int] = []
    into: dict[int, list[int]] = {}
    is_kept = np.zeros(n, bool)
    group_of = groups.group_of or {}
    owner: dict[int, int] = {}  # report group -> the kept position its photos join
    use_vectors = groups.vectors and vectors is not None and len(vectors) == n
    if use_vectors:
        vectors = np.ascontiguousarray(vectors, np.float32)
    for start in range(0, n, BLOCK):
        end = min(n, start + BLOCK)
        near = vectors[start:end] @ vectors[:end].T > groups.threshold if use_vectors else None
        for i in range(start, end):
            group = group_of.get(keys[i])
            target = owner.get(group) if group is not None else None
            if target is None and near is not None:
                earlier = np.flatnonzero(near[i - start, :i] & is_kept[:i])
                target = int(earlier[0]) if len(earlier) else None
            if target is None:
                kept.append(i)
                into[i] = []
                is_kept[i] = True
                target = i
            else:
                into[target].append(i)
            if group is not None:
                owner.setdefault(group, target)
    return Collapsed(kept, into)
