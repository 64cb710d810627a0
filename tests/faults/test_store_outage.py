"""The object store away while the index's data moves: a real S3 server (SeaweedFS) this test
starts, SIGKILLs while an ingest uploads or a shard embeds (`kill_points`' pause points make the
moment exact) and starts again on the same port and data. An outage shorter than the retries
is ridden out; a longer one fails the step with an error naming the store, leaves every object
in the bucket whole, publishes nothing, and the next run completes. A server failing part of
its requests (a proxy in front of it answers 503 or resets the connection) costs no step a
restart. After each: `python -m indexer verify` passes and a search for a known photo finds
it."""
from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from deploy import local_s3
from deploy.ports import free_port
from indexer.repository import IndexRepository
from indexer.shards import StalePlan
from tests.faults.conftest import IndexRun, photo_key
from tests.faults.kill_points import pause_at
from tests.indexer.helpers import PREFIX

pytestmark = pytest.mark.s3

KEY, SECRET = "outage-access", "outage-secret-123"


class S3Server:
    """One SeaweedFS on a port and data folder of its own, stopped and started again on both."""

    def __init__(self, root: Path):
        self.dir, self.port, self.proc = root, free_port(), None

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        self.proc = local_s3.start(self.dir, self.port, KEY, SECRET)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def s3(tmp_path):
    server = S3Server(tmp_path / "s3")
    server.start()
    yield server
    server.kill()  # its data is the test's own: no graceful stop (seconds) needed


def s3_run(tmp_path: Path, model: Path, endpoint: str) -> IndexRun:
    return IndexRun(tmp_path, model, store_backend="s3", minio_endpoint=endpoint,
                    minio_access_key=KEY, minio_secret_key=SECRET, minio_bucket="photos")


def wait_for(log: Path, text: str, proc: subprocess.Popen, timeout: float = 60.0) -> None:
    """Until the process has written `text` (it is retrying now); fails if it ends first."""
    deadline = time.monotonic() + timeout
    while text not in log.read_text():
        assert proc.poll() is None, f"ended ({proc.returncode}) before {text!r}:\n" \
                                    f"{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"no {text!r} in {timeout} s"
        time.sleep(0.05)


def restart_once_retrying(server: S3Server):
    """`pause_at`'s `then`: the server back as soon as the step has failed once and is waiting
    to retry (an outage shorter than its retries)."""
    def then(proc, log):
        wait_for(log, "; retry 1/", proc)
        server.start()
    return then


def assert_failed_naming_the_store(rc: int, out: str, server: S3Server) -> None:
    """The step used up its retries and failed with the store's own error, the last line."""
    assert rc == 1, out[-3000:]
    assert "retry 3/3" in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert last.startswith("objectstore.base.StoreUnavailable: S3 server at "
                           f"{server.endpoint} not reachable"), out[-3000:]


def bucket_images(run: IndexRun) -> dict[str, bytes]:
    return {o.key: run.store.get(o.key) for o in run.store.list(PREFIX)}


@pytest.mark.parametrize("outage", ["shorter", "longer"])
def test_s3_killed_while_an_ingest_uploads(tmp_path, tiny_flickr, small_checkpoint, encoder, s3,
                                           outage):
    folder, info = tiny_flickr
    source = {PREFIX + n: (folder / "Images" / n).read_bytes() for n in info["names"]}
    run = s3_run(tmp_path / "run", small_checkpoint, s3.endpoint)
    upload = run._step("upload", folder, tmp_path / "upload.json")

    # 3 text files and 2 photos uploaded, then the server is SIGKILLed; later puts meet it dead
    rc, out = pause_at(upload, run.env, "s3_put", tmp_path / "put", run.dir, s3.kill,
                       then=restart_once_retrying(s3) if outage == "shorter" else None, after=5)
    if outage == "shorter":
        assert rc == 0, out[-3000:]
        assert "; retry 1/" in out
        report = json.loads((tmp_path / "upload.json").read_text())
        assert report["images_in_store"] == len(source)
    else:
        assert_failed_naming_the_store(rc, out, s3)
        s3.start()
        partial = bucket_images(run)
        assert 2 <= len(partial) < len(source)
        assert all(data == source[key] for key, data in partial.items()), "a half-written object"

        again = subprocess.run(upload, env=run.env, cwd=run.dir, capture_output=True, text=True,
                               timeout=120)
        assert again.returncode == 0, again.stderr[-3000:]
        report = json.loads((tmp_path / "upload.json").read_text())
        assert (report["uploaded"], report["unchanged"]) == \
            (len(source) - len(partial), len(partial))
    assert bucket_images(run) == source

    assert run.run_all()["count"] == len(source)
    assert run.verify_cli()["ok"]
    known = sorted(source)[7]
    assert run.top_hit(encoder, known) == known


@pytest.mark.parametrize("outage", ["shorter", "longer"])
def test_s3_killed_while_a_shard_embeds(tmp_path, small_checkpoint, encoder, s3, outage):
    run = s3_run(tmp_path / "run", small_checkpoint, s3.endpoint)
    run.put(range(12))
    plan = run.plan()
    assert len(plan) == 3
    reports = {i: run.shard(plan, i) for i in (0, 2)}
    plan_file, _ = run._files(plan)
    shard = run._step("shard", plan_file, 1, tmp_path / "shard-1.json")

    # the shard's first photo fetched, then the server is SIGKILLed; the others meet it dead
    rc, out = pause_at(shard, run.env, "s3_get", tmp_path / "get", run.dir, s3.kill,
                       then=restart_once_retrying(s3) if outage == "shorter" else None)
    if outage == "shorter":
        assert rc == 0, out[-3000:]
        assert "; retry 1/" in out
        reports[1] = json.loads((tmp_path / "shard-1.json").read_text())
    else:
        assert_failed_naming_the_store(rc, out, s3)
        s3.start()
        with pytest.raises(StalePlan, match=r"shard\(s\) \[1\]"):  # never published short
            run.publish(plan, list(reports.values()))
        assert IndexRepository(run.index_dir).current_version() is None
        reports[1] = run.shard_process(plan, 1)  # the shard task's retry
    assert reports[1]["embedded"] == 4

    out = run.publish(plan, [reports[i] for i in range(3)])
    assert (out["action"], out["count"]) == ("rebuilt", 12)
    run.prune()
    assert run.leftovers() == []
    assert run.verify_cli()["ok"]
    assert run.top_hit(encoder, photo_key(5)) == photo_key(5)


@pytest.mark.parametrize("outage", ["shorter", "longer"])
def test_s3_killed_while_the_update_command_embeds(tmp_path, small_checkpoint, encoder, s3,
                                                   outage):
    """`python -m indexer update`, as a person runs it: the same retries as the DAG's steps,
    and past them one line naming the store, no traceback."""
    run = s3_run(tmp_path / "run", small_checkpoint, s3.endpoint)
    run.put(range(8))
    before = run.run_all()["version"]
    run.put(range(8, 12))
    update = [sys.executable, "-m", "indexer", "--quiet", "update"]

    rc, out = pause_at(update, run.env, "s3_get", tmp_path / "get", run.dir, s3.kill,
                       then=restart_once_retrying(s3) if outage == "shorter" else None)
    if outage == "shorter":
        assert rc == 0, out[-3000:]
        assert "; retry 1/" in out
    else:
        assert rc == 1 and "Traceback" not in out, out[-3000:]
        assert "retry 3/3" in out, out[-3000:]
        assert out.strip().splitlines()[-1].startswith(
            f"error: S3 server at {s3.endpoint} not reachable"), out[-3000:]
        s3.start()
        assert IndexRepository(run.index_dir).current_version() == before  # nothing published
        again = subprocess.run(update, env=run.env, cwd=run.dir, capture_output=True, text=True,
                               timeout=300)
        assert again.returncode == 0, again.stderr[-3000:]
    assert IndexRepository(run.index_dir).load().count == 12
    assert run.verify_cli()["ok"]
    assert run.top_hit(encoder, photo_key(10)) == photo_key(10)


class FlakyProxy:
    """HTTP in front of the S3 server, one request per connection: every `every_503`th request
    is answered 503, every `every_reset`th has its connection reset once the request arrived
    (nothing forwarded); the others are forwarded. A thread of its own runs its event loop."""

    def __init__(self, upstream_port: int, every_503: int = 4, every_reset: int = 7):
        self.upstream, self.port = upstream_port, free_port()
        self.every_503, self.every_reset = every_503, every_reset
        self.requests, self.faults = 0, Counter()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.port}"

    def __enter__(self) -> "FlakyProxy":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(
            asyncio.start_server(self._serve, "127.0.0.1", self.port), self.loop).result(10)
        return self

    def __exit__(self, *exc) -> None:
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)

    async def _serve(self, reader, writer) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
            headers = [h for h in head[1:] if h and not h.lower().startswith("connection:")]
            length = next((int(h.split(":", 1)[1]) for h in headers
                           if h.lower().startswith("content-length:")), 0)
            body = await reader.readexactly(length)
            self.requests += 1
            if self.requests % self.every_reset == 0:
                self.faults["reset"] += 1
                writer.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                writer.transport.abort()  # an RST
                return
            if self.requests % self.every_503 == 0:
                self.faults["503"] += 1
                writer.write(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\n"
                             b"Connection: close\r\n\r\n")
            else:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream)
                up_writer.write("\r\n".join([head[0], *headers, "Connection: close", "", ""])
                                .encode("latin-1") + body)
                while chunk := await up_reader.read(1 << 16):
                    writer.write(chunk)
                up_writer.close()
            await writer.drain()
            writer.close()
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.transport.abort()


def test_an_s3_server_failing_part_of_its_requests_during_an_index_run(
        tmp_path, small_checkpoint, encoder, s3, caplog):
    direct = s3_run(tmp_path / "direct", small_checkpoint, s3.endpoint)
    direct.put(range(12))
    with FlakyProxy(s3.port) as proxy, caplog.at_level("WARNING", logger="indexer.jobs"):
        run = s3_run(tmp_path / "run", small_checkpoint, proxy.endpoint)
        plan = run.plan()
        reports = [run.shard(plan, i) for i in range(len(plan))]
        out = run.publish(plan, reports)
    assert proxy.faults["reset"] >= 3 and proxy.faults["503"] >= 5, (proxy.requests, proxy.faults)
    # each failed request was asked again on its own: no step had to start over
    assert not [r.getMessage() for r in caplog.records if "retry" in r.getMessage()]
    assert (out["action"], out["count"]) == ("rebuilt", 12)
    assert all(r["embedded"] == 4 and not r["failed"] for r in reports)

    # the same index as a run against the server itself
    direct.run_all()
    a, b = IndexRepository(run.index_dir).load(), IndexRepository(direct.index_dir).load()
    assert a.keys == b.keys and a.etags == b.etags
    np.testing.assert_allclose(a.stored_vectors(a.keys), b.stored_vectors(b.keys), atol=1e-5)
    assert direct.verify_cli()["ok"]
    # the run's own index checked against the bucket (the proxy gone: the server itself)
    checked = s3_run(tmp_path / "run", small_checkpoint, s3.endpoint)
    assert checked.verify_cli()["ok"]
    assert checked.top_hit(encoder, photo_key(9)) == photo_key(9)
