"""The FAISS publisher, a shard and the API on a full disk and on a read-only INDEX_DIR (a real
tmpfs mounted for the test; skipped where this user cannot mount). A publish or a shard fails
with the system's own error naming the cause, the old version is still served, nothing
half-written is left, and once the disk has room again (or is writable) the retried step
completes; `python -m indexer verify` passes and a search for a known photo finds it. The API
(a real `python -m search_api` process: compose mounts the index volume read-only into it)
starts, serves and swaps in new versions from a full or read-only index directory, and an
upload that cannot be spooled to its full temporary disk is a 503, not a 500."""
from __future__ import annotations

import errno
import os
import subprocess
import time

import httpx

import pytest

from indexer.repository import IndexRepository
from tests.conftest import make_image
from tests.faults.conftest import photo_key
from tests.faults.test_api_replicas import _start_replica, _wait_healthy
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


def _fill(path, settle_s: float = 0.3, within_s: float = 10.0) -> None:
    """Write zeros to `path` until the file system is full, and until it stays full for
    `settle_s`: space freed just after (an upload's spooled file, unnamed, closed by the API
    once its answer went out) is taken too, or a later upload would fit in it."""
    chunk = b"\0" * (1 << 16)
    deadline = time.monotonic() + within_s
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                while True:
                    f.write(chunk)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC
            time.sleep(settle_s)
            free = os.statvfs(path)
            if free.f_bavail * free.f_frsize < len(chunk):
                return
            assert time.monotonic() < deadline, "the file system does not stay full"


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


def _read_only(index_run, read_only: bool) -> None:
    _mount("-o", "remount," + ("ro" if read_only else "rw"), str(index_run.index_dir))


@pytest.mark.parametrize("fault", ["full", "read-only"])
def test_a_shard_on_a_full_or_read_only_disk_fails_clearly_and_its_retry_completes(
        index_on_tmpfs, encoder, fault):
    index_run = index_on_tmpfs
    index_run.put(range(8))
    index_run.run_all()
    old = _served(index_run)
    index_run.put(range(8, 12))
    plan = index_run.plan()  # the draft exists: the shard is what meets the fault
    filler = index_run.index_dir / "filler"
    if fault == "full":
        _fill(filler)
    else:
        _read_only(index_run, True)
    try:
        with pytest.raises(OSError) as exc:
            index_run.shard(plan, 0)
        assert exc.value.errno == (errno.ENOSPC if fault == "full" else errno.EROFS), exc.value
        assert _served(index_run) == old
    finally:
        if fault == "full":
            filler.unlink()
        else:
            _read_only(index_run, False)
    draft = index_run.index_dir / "versions" / f".draft-{plan[0]['draft']}"
    assert not [p.name for p in draft.iterdir() if not p.name.endswith((".json", ".npy"))], \
        "a half-written part was left in the draft"
    reports = [index_run.shard(plan, i) for i in range(len(plan))]
    _completes(index_run, encoder, plan, reports)


def _noisy_jpeg(pixels: int) -> bytes:
    """A JPEG of noise: over 1 MB (what Starlette keeps in memory of an upload) at 1,100 pixels."""
    import io

    import numpy as np
    from PIL import Image

    noise = np.random.default_rng(0).integers(0, 256, (pixels, pixels, 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noise).save(buf, "JPEG", quality=95)
    return buf.getvalue()


def test_the_api_serves_and_reloads_from_a_full_or_read_only_index_dir(index_on_tmpfs, encoder):
    index_run = index_on_tmpfs
    index_run.put(range(8))
    first = index_run.run_all()["version"]
    # INDEX_DIR and the API's temporary files on one disk
    env = {**index_run.env, "RELOAD_INTERVAL_S": "0", "API_KEY": "",
           "TMPDIR": str(index_run.index_dir)}
    proc, port = _start_replica(env, index_run.dir)
    base = f"http://127.0.0.1:{port}"
    big = _noisy_jpeg(1100)
    assert len(big) > 1 << 20

    def search(key: str | None = None, image: bytes | None = None) -> httpx.Response:
        """The best match for the stored photo `key` (by its own bytes), or for `image`."""
        return httpx.post(f"{base}/search_images_by_image", timeout=60, data={"top_k": "1"},
                          files={"image": ("q.jpg", image or index_run.store.get(key),
                                           "image/jpeg")})

    def found(key: str) -> tuple[str, str]:
        r = search(key)
        assert r.status_code == 200, r.text
        return r.json()["index_version"], r.json()["results"][0]["key"]

    filler = index_run.index_dir / "filler"
    try:
        _wait_healthy(proc, port)
        assert search(image=big).status_code == 200  # spooled to TMPDIR while it has room
        _fill(filler)
        health = httpx.get(f"{base}/health", timeout=30).json()
        assert health["status"] == "ok" and health["index_version"] == first
        assert found(photo_key(3)) == (first, photo_key(3))
        r = search(image=big)  # spooled to the full TMPDIR
        assert r.status_code == 507 and "space" in r.json()["detail"], r.text
        assert str(index_run.index_dir) not in r.text

        # a new version published by the writer (who may write), then read-only for the API
        filler.unlink()
        index_run.put(range(8, 12))
        second = index_run.run_all()["version"]
        _fill(filler)
        _read_only(index_run, True)
        try:
            r = httpx.post(f"{base}/admin/reload", timeout=60)
            assert r.status_code == 200 and r.json()["version"] == second, r.text
            assert found(photo_key(9)) == (second, photo_key(9))
            assert httpx.get(f"{base}/health", timeout=30).json()["status"] == "ok"
        finally:
            _read_only(index_run, False)
    finally:
        proc.kill()
        proc.wait(10)
