"""Shared helpers for the benchmarks: hardware line, interleaved timing, tables.

Every benchmark compares a candidate with a baseline measured in the same process, interleaved
(A, B, A, B, ...), and reports ratios: this machine is shared, so absolute times drift with
other people's load while ratios measured side by side stay meaningful.
"""
from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # the packages, deploy/ included
    sys.path.insert(0, str(ROOT))

from core.settings import get_settings  # noqa: E402

FLICKR = Path(get_settings().flickr8k_source)  # a Flickr8k folder (FLICKR8K_SOURCE)
MODEL = get_settings().model_path


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        mem = int(Path("/proc/meminfo").read_text().split()[1]) / 2**20
    except (OSError, ValueError, IndexError):
        mem = float("nan")
    import numpy
    parts = [f"{cpu}, {os.cpu_count()} cores, {mem:.0f} GiB RAM", f"Python {platform.python_version()}",
             f"numpy {numpy.__version__}"]
    for mod in ("torch", "onnxruntime", "faiss"):
        try:
            parts.append(f"{mod} {__import__(mod).__version__}")
        except ImportError:
            pass
    return "; ".join(parts)


def load_average() -> str:
    try:
        return " ".join(Path("/proc/loadavg").read_text().split()[:3])
    except OSError:
        return "?"


def header(title: str) -> None:
    print(f"# {title}")
    print(f"hardware: {hardware()}")
    print(f"command: python {' '.join(sys.argv)}")
    print(f"load average at start: {load_average()}")
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=ROOT).stdout.strip()
        print(f"commit: {commit}")
    except OSError:
        pass
    print()


def interleaved(fns: dict[str, Callable[[], object]], rounds: int, warmup: int = 1
                ) -> dict[str, list[float]]:
    """Seconds per call of each fn, run in turn round after round (A B C A B C ...)."""
    for _ in range(warmup):
        for fn in fns.values():
            fn()
    out = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            out[k].append(time.perf_counter() - t)
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    if not xs:
        return float("nan")
    i = min(len(xs) - 1, max(0, int(round(q / 100 * (len(xs) - 1)))))
    return xs[i]


def median(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def table(rows: list[dict], cols: list[str] | None = None) -> str:
    """A GitHub-markdown table."""
    if not rows:
        return "(no rows)"
    cols = cols or list(rows[0])

    def fmt(v):
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 100 else f"{v:,.0f}"
        return str(v)

    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(lines)


def save_json(name: str, data) -> None:
    out = ROOT / ".cache" / "bench"  # raw timings of the last run (git-ignored)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.json").write_text(json.dumps(data, indent=2, default=str) + "\n")
