"""One logging setup for every command line of the project."""
from __future__ import annotations

import logging

FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


def setup_logging(level: int = logging.INFO) -> None:
    logging.basicConfig(level=level, format=FORMAT)
    logging.getLogger("faiss.loader").setLevel(logging.WARNING)  # CPU-feature probing noise


def process_age_s() -> float | None:
    """Seconds since this process started (Linux /proc, to the clock tick), None elsewhere:
    lets a command report its own start-up cost."""
    import os
    import time

    try:
        with open("/proc/self/stat") as f:
            # fields after the command name (which may hold spaces); starttime is field 22
            started_ticks = int(f.read().rpartition(")")[2].split()[19])
        return time.clock_gettime(time.CLOCK_BOOTTIME) - started_ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, AttributeError):
        return None
