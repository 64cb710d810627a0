"""Run a started server in the foreground until Ctrl-C, SIGTERM or SIGHUP, then stop it.

`kill`, a supervisor or a CI runner stops a helper with SIGTERM, which by default ends Python
at once without running `finally` blocks: the server it started (in its own session, or one that
ignores SIGTERM for half a minute, as Milvus does) would then keep running, re-parented to init
and holding its ports. Here those signals raise SystemExit instead, so the helper's own stop
(bounded: SIGTERM, then SIGKILL) runs before it exits.
"""
from __future__ import annotations

import signal
from contextlib import contextmanager
from typing import Callable, Iterator

STOP_SIGNALS = (signal.SIGTERM, signal.SIGHUP)


def _exit_on_signal(signum, frame):
    raise SystemExit(128 + signum)


@contextmanager
def stopped_on_exit(stop: Callable[[], None]) -> Iterator[None]:
    """Inside: SIGTERM/SIGHUP raise SystemExit; on leaving (normally, Ctrl-C, those signals or
    an error) `stop()` runs once, with those signals ignored so a second one cannot cut it
    short."""
    before = {s: signal.signal(s, _exit_on_signal) for s in STOP_SIGNALS}
    try:
        yield
    except KeyboardInterrupt:
        pass
    finally:
        for s in STOP_SIGNALS:
            signal.signal(s, signal.SIG_IGN)
        try:
            stop()
        finally:
            for s, handler in before.items():
                signal.signal(s, handler)
