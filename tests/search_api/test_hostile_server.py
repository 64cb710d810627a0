"""One hostile client must not stall or bloat the service for everyone: a real server started as
the README starts it (`python -m search_api --port P`, one for the module), attacked over raw
sockets (huge or slow request heads, bodies that stop, CPU-heavy JSON, odd Unicode), while a
normal query must keep answering fast and nothing a client sends may give a 5xx."""
from __future__ import annotations

import contextlib
import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
import types
import urllib.request
from pathlib import Path

import pytest

from deploy.ports import free_port
from tests.search_api.helpers import build_service

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 2.0  # CLIENT_TIMEOUT_S of the server under test
FAST_S = 1.0  # a normal query during an attack: generous, not a benchmark
MAX_JSON = 256 * 1024


@pytest.fixture(scope="module")
def server(tiny_flickr, tmp_path_factory, encoder, small_checkpoint):
    tmp = tmp_path_factory.mktemp("hostile")
    build_service(tmp, tiny_flickr[0], encoder)  # a published index in tmp/index
    port = free_port()
    env = {**os.environ, "MODEL_PATH": str(small_checkpoint), "INDEX_DIR": str(tmp / "index"),
           "LOCAL_STORE_DIR": str(tmp / "store"), "MINIO_BUCKET": "b", "RELOAD_INTERVAL_S": "0",
           "CLIENT_TIMEOUT_S": str(TIMEOUT_S), "MAX_JSON_BYTES": str(MAX_JSON),
           "API_KEY": "", "TMPDIR": str(tmp)}
    proc = subprocess.Popen([sys.executable, "-m", "search_api", "--port", str(port),
                             "--log-level", "warning"], cwd=tmp, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            urllib.request.urlopen(base + "/health", timeout=2).read()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail("server did not start:\n" + (proc.stdout.read() or "")[-3000:])
            time.sleep(0.2)
    yield ("127.0.0.1", port)
    proc.terminate()
    out, _ = proc.communicate(timeout=20)
    assert "Traceback" not in out, out[-5000:]  # no unhandled error in the server's log


# --- raw HTTP ---------------------------------------------------------------------------------
def connect(server, timeout: float = 10) -> socket.socket:
    s = socket.create_connection(server, timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


def read_response(s: socket.socket) -> tuple[int, dict, bytes]:
    """Status, headers and body of one response (Content-Length framed, or until close)."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            raise ConnectionError(f"closed before a response head: {buf[:200]!r}")
        buf += chunk
    head, body = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    n = int(headers.get("content-length", -1))
    while n >= 0 and len(body) < n or n < 0:
        chunk = s.recv(65536)
        if not chunk:
            break
        body += chunk
    return status, headers, body


def request(server, method: str, path: str, body: bytes = b"", headers: dict | None = None,
            timeout: float = 30) -> tuple[int, dict, bytes]:
    headers = {"Host": "x", "Content-Length": str(len(body)), **(headers or {})}
    head = f"{method} {path} HTTP/1.1\r\n" + "".join(f"{k}: {v}\r\n" for k, v in headers.items())
    with connect(server, timeout) as s:
        s.sendall(head.encode("latin-1") + b"\r\n" + body)
        return read_response(s)


def send_until_answered(s: socket.socket, pieces) -> None:
    """Send pieces until the server answers (or closes): a refusal mid-body is read, not lost
    to a reset caused by sending on."""
    for piece in pieces:
        if select.select([s], [], [], 0)[0]:
            return
        try:
            s.sendall(piece)
        except (BrokenPipeError, ConnectionResetError):
            return


def post_json(server, path: str, raw: bytes | str, **kw) -> tuple[int, dict, bytes]:
    if isinstance(raw, str):
        raw = raw.encode()
    return request(server, "POST", path, raw, {"Content-Type": "application/json"}, **kw)


def query_time(server) -> float:
    t = time.perf_counter()
    status, _, body = post_json(server, "/search_images_by_text",
                                json.dumps({"query": "a red circle", "top_k": 3}))
    assert status == 200 and json.loads(body)["results"], body[:300]
    return time.perf_counter() - t


def health_time(server) -> float:
    t = time.perf_counter()
    status, _, _ = request(server, "GET", "/health")
    assert status == 200
    return time.perf_counter() - t


@contextlib.contextmanager
def during(attack):
    """Runs `attack` in a thread while the block measures normal queries; after the block the
    yielded object holds what it returned (`result`) or raised (`error`)."""
    outcome = types.SimpleNamespace(result=None, error=None)

    def run():
        try:
            outcome.result = attack()
        except Exception as exc:  # noqa: BLE001 - reported to the test
            outcome.error = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    yield outcome
    thread.join(60)
    assert not thread.is_alive(), "attack still running"


# --- 1. request heads -------------------------------------------------------------------------
def _send_huge(server, prefix: bytes, total: int) -> tuple[int | None, float]:
    """Stream `prefix` then up to `total` bytes of 'a'; the status and when it came (None when
    the server closed without a response)."""
    t = time.perf_counter()
    chunk = b"a" * 65536
    with connect(server, timeout=30) as s:
        s.sendall(prefix)
        sent = 0
        try:
            while sent < total:
                s.sendall(chunk)
                sent += len(chunk)
        except (BrokenPipeError, ConnectionResetError):
            pass  # refused before the end: what we want
        try:
            status, _, _ = read_response(s)
        except (ConnectionError, OSError):
            return None, time.perf_counter() - t
        return status, time.perf_counter() - t


@pytest.mark.parametrize("what,prefix,expected", [
    ("header", b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: ", 431),
    ("url", b"GET /health?q=", 414),
    ("header-name", b"GET /health HTTP/1.1\r\nHost: x\r\nX-", 431),
])
def test_huge_request_head_refused_at_once(server, what, prefix, expected):
    with during(lambda: _send_huge(server, prefix, 100 * 1024 * 1024)) as attack:
        time.sleep(0.05)
        times = [health_time(server) for _ in range(5)] + [query_time(server)]
    assert attack.error is None, attack.error
    status, took = attack.result
    assert status == expected, (status, took)
    assert took < 5, f"refused after {took:.1f} s"
    assert max(times) < FAST_S, times


def test_too_many_headers_refused(server):
    headers = {f"X-H{i}": "v" for i in range(200)}
    status, _, body = request(server, "GET", "/health", headers=headers)
    assert status == 431 and b"headers" in body
    status, _, _ = request(server, "GET", "/health", headers={f"X-H{i}": "v" for i in range(50)})
    assert status == 200  # a normal number of headers is fine


def test_keep_alive_requests_still_work(server):
    """The head limits count per request: many requests on one connection are fine."""
    with connect(server) as s:
        for _ in range(50):
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"p" * 4000 + b"\r\n\r\n")
            status, _, _ = read_response(s)
            assert status == 200


# --- 2. slow clients ----------------------------------------------------------------------------
def test_slow_head_and_stalled_body_time_out(server):
    """A head that never ends, a body that stops, a connection that says nothing: each is
    closed after CLIENT_TIMEOUT_S (408 where a request started)."""
    socks = []
    t = time.perf_counter()
    try:
        slow_head = connect(server)
        slow_head.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: a")
        stalled = connect(server)
        stalled.sendall(b"POST /search_images_by_text HTTP/1.1\r\nHost: x\r\n"
                        b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{\"query\"")
        silent = connect(server)
        socks = [slow_head, stalled, silent]
        assert query_time(server) < FAST_S
        for s in socks:
            s.settimeout(TIMEOUT_S * 4)
        assert read_response(slow_head)[0] == 408
        status, headers, body = read_response(stalled)
        assert status == 408 and headers.get("connection") == "close", body
        assert silent.recv(10) == b""  # closed without a word
        took = time.perf_counter() - t
        assert took < TIMEOUT_S * 3, took
    finally:
        for s in socks:
            s.close()


def test_forty_slow_clients_do_not_slow_queries(server):
    base = sorted(query_time(server) for _ in range(7))[3]
    socks = []
    try:
        for i in range(40):
            s = connect(server)
            if i % 2:
                s.sendall(b"POST /search_images_by_text HTTP/1.1\r\nHost: x\r\n"
                          b"Content-Type: application/json\r\nContent-Length: 100000\r\n\r\n{")
            else:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")
            socks.append(s)
        times = sorted(query_time(server) for _ in range(7))
    finally:
        for s in socks:
            s.close()
    assert times[3] < max(3 * base, 0.2), (base, times)
    assert times[-1] < FAST_S, times


# --- 3. CPU-heavy JSON ------------------------------------------------------------------------
def _embeddings_body(n: int, dim: int = 64) -> bytes:
    vec = [0.123456789012345] * dim
    return json.dumps({"query": "red", "image_embeddings": [
        {"filename": f"f{i}.jpg", "embedding": vec} for i in range(n)]}).encode()


def test_big_json_body_refused_fast_and_queries_unaffected(server):
    raw = _embeddings_body(10_000)  # ~12 MB, far over MAX_JSON_BYTES
    assert len(raw) > 10 * 1024 * 1024
    def attack():
        t = time.perf_counter()
        with connect(server) as s:
            s.sendall(b"POST /search_images_by_text HTTP/1.1\r\nHost: x\r\nContent-Type: "
                      b"application/json\r\nContent-Length: %d\r\n\r\n" % len(raw))
            send_until_answered(s, (raw[i:i + 65536] for i in range(0, len(raw), 65536)))
            return read_response(s)[0], time.perf_counter() - t

    with during(attack) as attacking:
        times = [query_time(server) for _ in range(3)]
    assert attacking.error is None, attacking.error
    status, took = attacking.result
    assert status == 413 and took < FAST_S, (status, took)
    assert max(times) < FAST_S, times
    # chunked (no Content-Length): refused too, once past the limit
    head = (b"POST /search_images_by_text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
            b"\r\nTransfer-Encoding: chunked\r\n\r\n")
    with connect(server) as s:
        s.sendall(head)
        send_until_answered(s, (b"%x\r\n%s\r\n" % (len(p), p) for p in
                                (raw[i:i + 65536] for i in range(0, len(raw), 65536))))
        assert read_response(s)[0] == 413


def test_json_under_the_limit_still_works(server):
    """The original clients' `image_embeddings` mode: many vectors of the model's dimension."""
    raw = _embeddings_body(150)
    assert 100_000 < len(raw) < MAX_JSON
    status, _, body = post_json(server, "/search_images_by_text", raw)
    assert status == 200, body[:300]
    assert len(json.loads(body)["results"]) == 5


# --- 4. 4xx, never 5xx ------------------------------------------------------------------------
@pytest.mark.parametrize("path,raw", [
    ("/search_images_by_text", r'{"query": "dog \ud800"}'),
    ("/search_images_by_text", r'{"query": "dog", "top_k": "\ud800"}'),
    ("/search_images_by_text", r'{"query": "dog", "min_score": "\udfff"}'),
    ("/encode_text", r'{"text": "\udc80 cat"}'),
    ("/search_images_by_texts", r'{"queries": ["dog", "\ud800"]}'),
    ("/search_images_by_text", r'{"query": "dog", "image_embeddings": '
                               r'[{"filename": "a\ud800.jpg", "embedding": [0.1]}]}'),
    ("/search_images_by_key", r'{"keys": ["flickr8k/images/\ud800.jpg"]}'),
    ("/search_images_by_key", r'{"keys": ["a.jpg"], "negative_keys": ["\udfff"]}'),
    ("/search_images_by_text", r'{"query": "dog", "filters": {"folders": ["\ud800"]}}'),
    ("/search_images_by_text", r'{"terms": {"positive": [{"text": "dog \ud800"}]}}'),
])
def test_lone_surrogates_are_422(server, path, raw):
    if "embedding\"" in raw:  # the model's dimension
        raw = raw.replace("[0.1]", json.dumps([0.1] * 64))
    status, _, body = post_json(server, path, raw)
    assert status == 422, body[:300]
    json.loads(body)  # an encodable, valid JSON error


def test_chunked_upload_over_the_limit_is_413(server):
    boundary = "b0undary"
    head = (f"POST /search_images_by_text HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n"
            f"Content-Type: multipart/form-data; boundary={boundary}\r\n\r\n").encode()
    part = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"a.jpg\""
            f"\r\nContent-Type: image/jpeg\r\n\r\n").encode()
    with connect(server) as s:
        s.sendall(head + b"%x\r\n%s\r\n" % (len(part), part))
        piece = b"\xff" * 256 * 1024
        send_until_answered(s, [b"%x\r\n%s\r\n" % (len(piece), piece)] * 100)  # 25 MiB
        status, _, body = read_response(s)
    assert status == 413, body[:300]


def test_head_health_is_200_without_body(server):
    with connect(server) as s:
        s.sendall(b"HEAD /health HTTP/1.1\r\nHost: x\r\n\r\n")
        s.settimeout(2)
        status, headers, _ = read_response_head_only(s)
    assert status == 200
    assert int(headers.get("content-length", "0")) >= 0


def read_response_head_only(s: socket.socket) -> tuple[int, dict, bytes]:
    buf = b""
    while b"\r\n\r\n" not in buf:
        chunk = s.recv(65536)
        if not chunk:
            break
        buf += chunk
    head, rest = buf.split(b"\r\n\r\n", 1)
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, v in (ln.split(":", 1) for ln in lines[1:])}
    assert rest == b"", rest  # no body after a HEAD response
    s.settimeout(0.3)
    try:
        assert s.recv(100) == b""  # and nothing more comes (a keep-alive connection stays open)
    except TimeoutError:
        pass
    return int(lines[0].split()[1]), headers, rest


FUZZ = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: -5\r\n\r\n",
    b"GET / HTTP/9.9\r\n\r\n",
    b"POST /search_images_by_text HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    b"Content-Length: 6\r\n\r\n\xed\xa0\x80\"}\"",
    b"POST /search_images_by_text HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
    b"boundary=zz\r\nContent-Length: 20\r\n\r\n--zz\r\nnonsense\r\n\r\n",
    b"POST /search_images_by_text HTTP/1.1\r\nHost: x\r\nContent-Type: application/x-www-form"
    b"-urlencoded\r\nContent-Length: 12\r\n\r\ntext=%ED%A0%80",
    b"GET /health?\xff\xfe HTTP/1.1\r\nHost: x\r\n\r\n",
    # the newer GET routes: undecodable and lone-surrogate query strings and keys
    b"GET /explain?key=%ED%A0%80&q=dog%ED%B0%80 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /explain?key=a.jpg&q=\xff\xfe&format=json HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /duplicates?threshold=%ED%A0%80&limit=\xff HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /facets?limit=99999999999999999999999 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /images/%ED%A0%80/info HTTP/1.1\r\nHost: x\r\n\r\n",
    b"GET /images/..%2F..%2Fetc%2Fpasswd HTTP/1.1\r\nHost: x\r\n\r\n",
]


@pytest.mark.parametrize("raw", FUZZ)
def test_odd_requests_never_5xx(server, raw):
    with connect(server) as s:
        s.sendall(raw)
        try:
            status, _, body = read_response(s)
        except ConnectionError:
            return  # closed: fine, not a 5xx
    assert status < 500, (status, body[:300])


# --- in process: a full temp dir while a multipart body is spooled ------------------------------
def test_full_temp_dir_during_multipart_is_507(tiny_flickr, tmp_path, encoder, monkeypatch):
    import errno

    import starlette.formparsers as fp
    from fastapi.testclient import TestClient

    class Full:
        def __init__(self, *a, **kw):
            pass

        def write(self, data):
            raise OSError(errno.ENOSPC, "No space left on device")

        def close(self):
            pass

    svc = build_service(tmp_path, tiny_flickr[0], encoder)
    monkeypatch.setattr(fp, "SpooledTemporaryFile", Full)
    with TestClient(svc.app, raise_server_exceptions=False) as c:
        r = c.post("/search_images_by_text", data={"text": "red"},
                   files={"image": ("a.jpg", b"x" * 10_000, "image/jpeg")})
        assert r.status_code == 507, r.text
        for route in ("/search_images_by_image", "/encode_image"):  # FastAPI's own uploads
            r = c.post(route, files={"image": ("a.jpg", b"x" * 10_000, "image/jpeg")})
            assert r.status_code == 507 and "space" in r.json()["detail"], (route, r.text)
