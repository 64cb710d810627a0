"""Stopping points inside the index code, for the fault tests: a `sitecustomize` (written next
to a test, put first on the PYTHONPATH of the process under test) that, when FAULT_POINT names
one, wraps the function there so that the process writes FAULT_MARKER and then waits; the test
waits for the marker and SIGKILLs the process. The product code has no fault switch.

    part_write      a shard writing its part: half the part's bytes are on disk (the temp file)
    merge           the publish reading the draft's second part
    version_write   the publish writing the new version's folder (index file written, no
                    manifest yet)
    before_current  the new version complete on disk, CURRENT not yet moved
    after_current   CURRENT moved to the new version, the draft not yet removed
    milvus_loaded   Milvus: the new collection loaded, the alias not yet switched
    after_alias     Milvus: the alias switched to the new collection, the step not finished
    milvus_written  Milvus: a shard's first batch of rows written (inserted or upserted), the
                    rest not

Pause points (FAULT_RELEASE names a file): the process writes FAULT_MARKER, then waits until
that file exists and carries on, so that the test can take a server away in between:

    s3_put          S3Store.put: FAULT_AFTER puts (default 1) done; every later one waits
    s3_get          S3Store.get: FAULT_AFTER gets (default 1) done; every later one waits
    milvus_write    Milvus: FAULT_AFTER row writes (inserts or upserts; default 1, two rows
                    each) done; every later one waits
    milvus_publish_load  Milvus: the publish about to load the new collection (the alias not
                    yet switched); it waits before the load
    embed_shard     indexer.jobs.embed_shard about to embed its shard (hooked when the module
                    is first imported: any process of an Airflow deployment may carry the
                    hook, only the task processes import it); every call waits
"""
from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

SITECUSTOMIZE = r'''
import os


def _stop_here():
    with open(os.environ["FAULT_MARKER"], "w") as f:
        f.write(str(os.getpid()))
    import time
    time.sleep(600)  # the test SIGKILLs this process now


def _paused_after(cls, *names):
    """cls.<names>, counted together: the first FAULT_AFTER calls go through, the marker is
    written once they have returned, and every later call (by when it began, in any thread)
    waits for the release."""
    import threading
    after, release = int(os.environ.get("FAULT_AFTER", "1")), os.environ["FAULT_RELEASE"]
    lock, started, done = threading.Lock(), [0], [0]
    for name in names:
        _pause_calls(cls, name, after, release, lock, started, done)


def _pause_calls(cls, name, after, release, lock, started, done):
    import time
    real = getattr(cls, name)

    def call(self, *args, **kwargs):
        with lock:
            started[0] += 1
            paused = started[0] > after
        while paused and not os.path.exists(release):
            time.sleep(0.02)
        try:
            return real(self, *args, **kwargs)
        finally:
            with lock:
                done[0] += 1
                if done[0] == after and not paused:
                    with open(os.environ["FAULT_MARKER"], "w") as f:
                        f.write(str(os.getpid()))

    setattr(cls, name, call)


def _pause():
    import time
    with open(os.environ["FAULT_MARKER"], "w") as f:
        f.write(str(os.getpid()))
    while not os.path.exists(os.environ["FAULT_RELEASE"]):
        time.sleep(0.02)


def _when_imported(module_name, patch):
    """patch(module) once `module_name` is first imported in this process (or its forks)."""
    import importlib.abc
    import importlib.util
    import sys

    class _Hook(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name != module_name:
                return None
            sys.meta_path.remove(self)
            spec = importlib.util.find_spec(name)
            load = spec.loader.exec_module

            def exec_module(module):
                load(module)
                patch(module)

            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Hook())


def _install(point):
    if point == "embed_shard":
        def patch(jobs):
            real = jobs.embed_shard

            def embed_shard(*args, **kwargs):
                _pause()
                return real(*args, **kwargs)

            jobs.embed_shard = embed_shard

        _when_imported("indexer.jobs", patch)
    elif point == "milvus_write":
        import indexer.milvus_index
        from pymilvus import MilvusClient
        indexer.milvus_index.WRITE_BATCH = 2  # a shard's rows in several writes
        _paused_after(MilvusClient, "insert", "upsert")
    elif point == "milvus_publish_load":
        import threading
        from indexer.milvus_index import MilvusIndex
        from pymilvus import MilvusClient
        real_publish, real_load = MilvusIndex.publish, MilvusClient.load_collection
        publishing = threading.local()

        def publish(self, *args, **kwargs):
            publishing.on = True
            try:
                return real_publish(self, *args, **kwargs)
            finally:
                publishing.on = False

        def load_collection(self, *args, **kwargs):
            if getattr(publishing, "on", False):  # not the loads of counts before it
                _pause()
            return real_load(self, *args, **kwargs)

        MilvusIndex.publish, MilvusClient.load_collection = publish, load_collection
    elif point in ("s3_put", "s3_get"):
        from objectstore.s3 import S3Store
        _paused_after(S3Store, point[3:])
    elif point == "part_write":
        import io
        import numpy
        real = numpy.savez

        def savez(file, *args, **kwargs):
            if ".part-" not in str(getattr(file, "name", "")):
                return real(file, *args, **kwargs)
            buf = io.BytesIO()
            real(buf, *args, **kwargs)
            data = buf.getvalue()
            file.write(data[: len(data) // 2])
            file.flush()
            _stop_here()

        numpy.savez = savez
    elif point == "merge":
        import numpy
        real = numpy.load
        seen = []

        def load(file, *args, **kwargs):
            if os.path.basename(str(file)).startswith("part-"):
                seen.append(file)
                if len(seen) == 2:
                    _stop_here()
            return real(file, *args, **kwargs)

        numpy.load = load
    elif point == "version_write":
        import faiss
        real = faiss.write_index

        def write_index(index, path, *args):
            real(index, path, *args)
            _stop_here()

        faiss.write_index = write_index
    elif point in ("before_current", "after_current"):
        from indexer.repository import IndexRepository
        real = IndexRepository._point_current

        def point_current(self, version):
            if point == "before_current":
                _stop_here()
            real(self, version)
            _stop_here()

        IndexRepository._point_current = point_current
    elif point == "milvus_written":
        import indexer.milvus_index
        from pymilvus import MilvusClient
        indexer.milvus_index.WRITE_BATCH = 2  # a shard's rows in several writes
        for name in ("insert", "upsert"):
            real = getattr(MilvusClient, name)

            def write_then_stop(self, *args, _real=real, **kwargs):
                out = _real(self, *args, **kwargs)
                _stop_here()
                return out

            setattr(MilvusClient, name, write_then_stop)
    elif point in ("milvus_loaded", "after_alias"):
        from pymilvus import MilvusClient
        name = "load_collection" if point == "milvus_loaded" else "alter_alias"
        real = getattr(MilvusClient, name)

        def call_then_stop(self, *args, **kwargs):
            out = real(self, *args, **kwargs)
            _stop_here()
            return out

        setattr(MilvusClient, name, call_then_stop)
    else:
        raise SystemExit(f"unknown FAULT_POINT {point}")


if os.environ.get("FAULT_POINT"):
    _install(os.environ["FAULT_POINT"])
'''


def hook_dir(tmp_path: Path) -> Path:
    """A folder holding the sitecustomize above (first on the PYTHONPATH of a killed step)."""
    hooks = tmp_path / "fault-hooks"
    hooks.mkdir(exist_ok=True)
    (hooks / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return hooks


def kill_at(cmd: list[str], env: dict, point: str, marker: Path, cwd: Path,
            timeout: float = 180.0, while_stopped=None) -> None:
    """Run `cmd` until it reaches `point`, call `while_stopped()` (if given) there, then SIGKILL
    it. Fails when the process ends or times out before reaching the point."""
    marker.unlink(missing_ok=True)
    log = marker.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**env, "FAULT_POINT": point,
                                          "FAULT_MARKER": str(marker)},
                                cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"{point}: the step ended ({proc.returncode}) before "
                                     f"reaching it:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{point}: not reached in {timeout} s")
            time.sleep(0.05)
        if while_stopped is not None:
            while_stopped()
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    assert proc.returncode == -signal.SIGKILL, (proc.returncode, log.read_text()[-3000:])


def pause_at(cmd: list[str], env: dict, point: str, marker: Path, cwd: Path, while_paused,
             then=None, after: int = 1, timeout: float = 180.0) -> tuple[int, str]:
    """Run `cmd` until it pauses at `point` (a pause point, above), call `while_paused()`, let
    it carry on, call `then(proc, log_path)` (if given), and wait for it to end: (exit status,
    its output). Fails when it ends before the point or outlasts `timeout`."""
    marker.unlink(missing_ok=True)
    release = marker.with_suffix(".release")
    release.unlink(missing_ok=True)
    log = marker.with_suffix(".log")
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**env, "FAULT_POINT": point, "FAULT_AFTER": str(after),
                                          "FAULT_MARKER": str(marker),
                                          "FAULT_RELEASE": str(release)},
                                cwd=cwd, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + timeout
    try:
        while not marker.exists():
            if proc.poll() is not None:
                raise AssertionError(f"{point}: the process ended ({proc.returncode}) before "
                                     f"reaching it:\n{log.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                raise AssertionError(f"{point}: not reached in {timeout} s")
            time.sleep(0.05)
        while_paused()
        release.touch()
        if then is not None:
            then(proc, log)
        proc.wait(max(1.0, deadline - time.monotonic()))
    finally:
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
    return proc.returncode, log.read_text()
