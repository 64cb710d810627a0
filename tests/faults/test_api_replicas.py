"""An API replica SIGKILLed under load while another serves: two `python -m search_api` processes
on one published index, behind a round-robin TCP balancer (deploy/balancer.py, skipping an upstream
that refuses connections as a proxy's passive health check does), 16 clients
searching through it. A client that retries once sees no failed search, and the known photo is
still found."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path

import httpx
import pytest

from deploy.balancer import Balancer
from deploy.ports import free_port
from tests.search_api.helpers import build_service

CLIENTS = 16
QUERIES = ("a red circle", "a green square", "two dogs in the snow", "a blue shape")


def _start_replica(env: dict, cwd: Path) -> tuple[subprocess.Popen, int]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "search_api", "--port", str(port),
                             "--log-level", "warning"], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return proc, port


def _wait_healthy(proc: subprocess.Popen, port: int, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("replica did not start:\n" + (proc.stdout.read() or "")[-3000:])
            time.sleep(0.2)


def test_a_replica_killed_under_load_costs_a_retrying_client_no_search(tiny_flickr, tmp_path,
                                                                       encoder, small_checkpoint):
    root, meta = tiny_flickr
    build_service(tmp_path, root, encoder)  # one published index in tmp_path/index
    env = {**os.environ, "MODEL_PATH": str(small_checkpoint), "INDEX_DIR": str(tmp_path / "index"),
           "LOCAL_STORE_DIR": str(tmp_path / "store"), "MINIO_BUCKET": "b",
           "RELOAD_INTERVAL_S": "0", "API_KEY": "", "TMPDIR": str(tmp_path)}
    replicas = [_start_replica(env, tmp_path) for _ in range(2)]
    (doomed, doomed_port), (survivor, survivor_port) = replicas
    try:
        for proc, port in replicas:
            _wait_healthy(proc, port)
        with Balancer([doomed_port, survivor_port]) as lb:
            base = f"http://127.0.0.1:{lb.port}"
            answered: list[float] = []  # monotonic time of each answered search
            first_try_failed: list[str] = []
            failed: list[str] = []
            stop = threading.Event()

            def client(n: int) -> None:
                with httpx.Client(base_url=base, timeout=30) as c:
                    i = 0
                    while not stop.is_set():
                        body = {"query": QUERIES[(n + i) % len(QUERIES)], "top_k": 3}
                        i += 1
                        for attempt in (1, 2):
                            try:
                                r = c.post("/search_images_by_text", json=body)
                                ok, why = r.status_code == 200, f"{r.status_code} {r.text[:200]}"
                            except httpx.HTTPError as e:
                                ok, why = False, repr(e)
                            if ok:
                                answered.append(time.monotonic())
                                break
                            (first_try_failed if attempt == 1 else failed).append(why)

            threads = [threading.Thread(target=client, args=(n,)) for n in range(CLIENTS)]
            for t in threads:
                t.start()
            try:
                _until(lambda: len(answered) >= 100 and lb.connections[doomed_port] > 0)
                served_before = len(answered)
                doomed.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                doomed.wait(10)
                _until(lambda: sum(t > killed_at for t in answered) >= 100)
            finally:
                stop.set()
                for t in threads:
                    t.join(60)
            assert not failed, failed[:5]
            # the kill met searches in flight: the retry is what saved them
            assert first_try_failed, "no search was in flight on the killed replica"
            assert served_before >= 100 and sum(t > killed_at for t in answered) >= 100

            # the survivor serves the index whole: the known photo is found by its own bytes
            name = meta["names"][0]
            r = httpx.post(f"{base}/search_images_by_image", timeout=30,
                           files={"image": (name, (root / "Images" / name).read_bytes(),
                                           "image/jpeg")}, data={"top_k": "1"})
            assert r.status_code == 200, r.text
            assert r.json()["results"][0]["filename"] == name
    finally:
        for proc, _ in replicas:
            if proc.poll() is None:
                proc.terminate()
                proc.wait(20)
    out = survivor.stdout.read()
    assert "Traceback" not in out, out[-5000:]


def _until(check, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "not within the time"
        time.sleep(0.05)
