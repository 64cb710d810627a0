"""The FAISS publisher on a full disk and on a read-only INDEX_DIR (a real tmpfs mounted for
the test; skipped where this user cannot mount): the publish fails with the system's own
error naming the cause, the old version is still served, nothing half-written is left to be
served, and once the disk has room again (or is writable) the retried publish completes;
`python -m indexer verify` passes and a search for a known photo finds it."""
from __future__ import annotations

import errno
import subprocess

import pytest

from indexer.repository import IndexRepository
from tests.faults.conftest import photo_key
from tests.faults.test_faiss_faults import _served


def _mount(*args: str) -> None:
    r = subprocess.run(["mount", *args], capture_output=True, text=True)
    if r.returncode:
        raise OSError(r.stderr.strip())


@pytest.fixture
def index_on_tmpfs(index_run):
    index_run.index_dir.mkdir(parents=True)
    try:
        _mount("-t", "tmpfs", "-o", "size=8m", "tmpfs", str(index_run.index_dir))
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield index_run
    finally:
        subprocess.run(["umount", "-l", str(index_run.index_dir)], check=False)


def _fill(path) -> None:
    """Write zeros to `path` until the file system is full."""
    chunk = b"\0" * (1 << 16)
    with open(path, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC


def _update_ready_to_publish(index_run):
    index_run.put(range(8))
    index_run.run_all()
    old = _served(index_run)
    index_run.put(range(8, 12))
    plan = index_run.plan()
    return old, plan, [index_run.shard(plan, i) for i in range(len(plan))]


def _completes(index_run, encoder, plan, reports) -> None:
    out = index_run.publish(plan, reports)
    assert (out["version"], out["count"]) == (plan[0]["draft"], 12)
    assert _served(index_run)[0] == plan[0]["draft"]
    index_run.prune()
    assert index_run.leftovers() == []
    assert index_run.verify_cli()["ok"]
    assert index_run.top_hit(encoder, photo_key(9)) == photo_key(9)


def test_publish_on_a_full_disk_fails_clearly_and_keeps_serving(index_on_tmpfs, encoder):
    index_run = index_on_tmpfs
    old, plan, reports = _update_ready_to_publish(index_run)
    filler = index_run.index_dir / "filler"
    _fill(filler)
    with pytest.raises(OSError) as exc:
        index_run.publish(plan, reports)
    assert exc.value.errno == errno.ENOSPC, exc.value
    assert _served(index_run) == old
    assert not [p for p in (index_run.index_dir / "versions").iterdir()
                if p.name.startswith(".tmp-")], "a half-written version folder was left"
    filler.unlink()
    _completes(index_run, encoder, plan, reports)


def test_publish_into_a_read_only_index_dir_fails_clearly_and_keeps_serving(
        index_on_tmpfs, encoder):
    index_run = index_on_tmpfs
    old, plan, reports = _update_ready_to_publish(index_run)
    _mount("-o", "remount,ro", str(index_run.index_dir))
    try:
        with pytest.raises(OSError) as exc:
            index_run.publish(plan, reports)
        assert exc.value.errno == errno.EROFS, exc.value
        assert _served(index_run) == old
    finally:
        _mount("-o", "remount,rw", str(index_run.index_dir))
    assert IndexRepository(index_run.index_dir).current_version() == old[0]
    _completes(index_run, encoder, plan, reports)
