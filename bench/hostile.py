"""Hostile but within-limits clients against normal queries: a burst of worst-case image uploads
(memory, latency of the text queries served meanwhile) and a 100 MB request head (time to the
answer, /health latency meanwhile), on this tree and, with --baseline-tree, another checkout.

    python bench/hostile.py [--n 1000] [--baseline-tree DIR] [--env KEY=VALUE ...]

Builds an index of N Flickr8k images in a temp dir (as bench/query.py does), then for each tree
in turn (this one, then the baseline) starts the real service (`python -m search_api`, one
uvicorn worker; the baseline with cwd and PYTHONPATH DIR, same index and environment), measures
it alone on the machine and stops it before the next one starts:

1. decode burst: 16 concurrent clients each POST 2 uploads to /search_images_by_image, half a
   43-byte GIF declaring a 6300x6300 canvas, half a ~150 kB fully transparent 6300x6300 RGBA PNG
   (both under MAX_IMAGE_PIXELS and MAX_UPLOAD_BYTES), while one client sends text queries in a
   loop. Server RSS (VmRSS of /proc/<pid>/status) before, peak (sampled every 50 ms) and 10 s
   after; burst wall time; status codes; p50/max text-query latency during the burst against
   its p50 with no burst.
2. huge request head: a raw socket sends `GET /health` with a 100 MB header value (streamed in
   1 MiB pieces, stops at the first answer or close) while another client polls GET /health
   every 50 ms; time until the answer/close and its status line, max /health latency meanwhile.

--env KEY=VALUE (repeatable) is passed to this tree's server only (e.g. DECODE_MEMORY_MB=160).
API_KEY is left unset, so the upload routes need no key.
"""
from __future__ import annotations

import argparse
import atexit
import collections
import contextlib
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from common import FLICKR, MODEL, ROOT, header, median, save_json, table
from deploy.ports import free_port
from search_api.testing import huge_canvas_gif, rss_mb, transparent_png

QUERIES = ["two dogs playing in the snow", "a man rides a bicycle down a city street",
           "a little girl in a pink dress", "people sitting on a bench next to the water",
           "a black dog jumps over a log", "a surfer riding a big wave",
           "children playing soccer on a field", "a woman climbing a rock wall",
           "a brown dog runs through the grass", "a group of people stand in front of a building"]

SIDE = 6300
HEAD_BYTES = 100 * 1024 * 1024
HEAD_LIMIT_S = 60.0


# --- memory of the server (the hostile inputs: search_api.testing, as the tests make them) ---
@dataclass
class RssSeries:
    """(t, MB) samples of a process's VmRSS."""
    series: list[tuple[float, float]] = field(default_factory=list)

    @property
    def peak(self) -> float:
        vals = [v for _, v in self.series if v == v]
        return max(vals) if vals else float("nan")


@contextlib.contextmanager
def rss_sampled(pid: int, every: float = 0.05):
    """VmRSS of pid every `every` seconds in a thread while the block runs (one last sample
    after it)."""
    samples, stop, t0 = RssSeries(), threading.Event(), time.perf_counter()

    def sample():
        samples.series.append((round(time.perf_counter() - t0, 3), rss_mb(pid)))

    def run():
        while not stop.is_set():
            sample()
            stop.wait(every)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    try:
        yield samples
    finally:
        stop.set()
        thread.join()
        sample()


# --- servers ---------------------------------------------------------------------------------
class Server:
    def __init__(self, tree: Path, env: dict, log: Path):
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log_path = log
        self._log = open(log, "wb")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "search_api", "--port", str(self.port), "--log-level",
             "warning"], env={**env, "PYTHONPATH": str(tree)}, cwd=tree,
            stdout=self._log, stderr=subprocess.STDOUT)
        LIVE.append(self)

    def wait_ready(self, limit: float = 300) -> None:
        import httpx

        deadline = time.monotonic() + limit
        while True:
            try:
                if httpx.get(self.base + "/health", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                tail = self.log_path.read_text(errors="replace")[-2000:]
                raise SystemExit(f"the service at {self.base} did not start:\n{tail}")
            time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(20)
        self._log.close()
        if self in LIVE:
            LIVE.remove(self)


LIVE: list[Server] = []


def _kill_live(*_):
    for s in list(LIVE):
        try:
            s.stop()
        except Exception:  # noqa: BLE001 - best effort at exit
            s.proc.kill()


atexit.register(_kill_live)


def _on_signal(signum, _frame):
    _kill_live()
    raise SystemExit(128 + signum)


# --- 1. decode burst -------------------------------------------------------------------------
def text_loop(url: str, stop: threading.Event, lat: list[float], codes: collections.Counter,
              n: int | None = None) -> None:
    import httpx

    with httpx.Client(base_url=url, timeout=300) as c:
        i = 0
        while not stop.is_set() and (n is None or i < n):
            t = time.perf_counter()
            try:
                r = c.post("/search_images_by_text",
                           json={"query": QUERIES[i % len(QUERIES)], "top_k": 10})
                codes[r.status_code] += 1
            except httpx.HTTPError as exc:
                codes[type(exc).__name__] += 1
            lat.append(time.perf_counter() - t)
            i += 1


def decode_burst(srv: Server, images, warm_image: bytes, clients: int, per_client: int,
                 settle_s: float) -> dict:
    import httpx

    with httpx.Client(base_url=srv.base, timeout=300) as c:  # warm: text, a normal upload
        for q in QUERIES:
            c.post("/search_images_by_text", json={"query": q, "top_k": 10}).raise_for_status()
        for _ in range(2):
            c.post("/search_images_by_image", data={"top_k": "5"},
                   files={"image": ("w.jpg", warm_image, "image/jpeg")}).raise_for_status()
    idle_lat: list[float] = []
    idle_codes: collections.Counter = collections.Counter()
    text_loop(srv.base, threading.Event(), idle_lat, idle_codes, n=60)
    time.sleep(1)
    before = rss_mb(srv.proc.pid)

    statuses: collections.Counter = collections.Counter()
    up_lat: list[float] = []
    lock = threading.Lock()

    def client(i):
        with httpx.Client(base_url=srv.base, timeout=600) as c:
            for k in range(per_client):
                name, data, ct = images[(i + k) % len(images)]
                t = time.perf_counter()
                try:
                    r = c.post("/search_images_by_image", data={"top_k": "5"},
                               files={"image": (name, data, ct)})
                    code = r.status_code
                except httpx.HTTPError as exc:
                    code = type(exc).__name__
                with lock:
                    statuses[code] += 1
                    up_lat.append(time.perf_counter() - t)

    q_lat: list[float] = []
    q_codes: collections.Counter = collections.Counter()
    stop = threading.Event()
    with rss_sampled(srv.proc.pid) as sampler:
        querier = threading.Thread(target=text_loop, args=(srv.base, stop, q_lat, q_codes))
        querier.start()
        threads = [threading.Thread(target=client, args=(i,)) for i in range(clients)]
        t0 = time.perf_counter()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        stop.set()
        querier.join()
        peak = sampler.peak
        time.sleep(settle_s)
    after = rss_mb(srv.proc.pid)
    return {"rss_before_mb": before, "rss_peak_mb": peak, "rss_after_mb": after,
            "burst_wall_s": wall, "statuses": dict(statuses), "upload_latency_s": up_lat,
            "idle_text_latency_s": idle_lat, "idle_text_codes": dict(idle_codes),
            "burst_text_latency_s": q_lat, "burst_text_codes": dict(q_codes),
            "rss_series": sampler.series}


# --- 2. huge request head --------------------------------------------------------------------
def send_huge_head(port: int, value_bytes: int, limit_s: float, piece: int = 1 << 20) -> dict:
    """Stream `GET /health` with one header of value_bytes; stop at the first answer or close."""
    head = b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Huge: "
    filler = b"a" * piece
    total = len(head) + value_bytes + 4
    s = socket.create_connection(("127.0.0.1", port))
    s.setblocking(False)
    sent, outcome, status_line, answer = 0, None, None, b""
    t0 = time.perf_counter()
    pending = memoryview(head)
    try:
        while time.perf_counter() - t0 < limit_s:
            want_write = sent < total
            r, w, _ = select.select([s], [s] if want_write else [], [], 0.05)
            if r:
                try:
                    data = s.recv(65536)
                except ConnectionResetError:
                    outcome = "reset"
                    break
                if not data:
                    outcome = "closed"
                    break
                answer += data
                if b"\r\n" in answer:
                    outcome = "answered"
                    break
                continue
            if w and want_write:
                if not pending:
                    left = total - sent - 4
                    pending = memoryview(filler[:left] if left < piece else filler) if left > 0 \
                        else memoryview(b"\r\n\r\n")
                try:
                    n = s.send(pending)
                except BlockingIOError:
                    continue
                except (BrokenPipeError, ConnectionResetError):
                    outcome = "reset while sending"
                    # an answer may still be in our receive buffer
                    try:
                        answer += s.recv(65536)
                        if answer:
                            outcome = "answered"
                    except OSError:
                        pass
                    break
                sent += n
                pending = pending[n:]
        elapsed = time.perf_counter() - t0
    finally:
        s.close()
    if answer:
        status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    return {"outcome": outcome or f"not answered within {limit_s:.0f} s", "seconds": elapsed,
            "status_line": status_line, "sent_mb": sent / 2**20, "total_mb": total / 2**20}


def huge_head(srv: Server, value_bytes: int, limit_s: float) -> dict:
    import httpx

    def poll(stop, lat, codes):
        with httpx.Client(base_url=srv.base, timeout=limit_s + 30) as c:
            while not stop.is_set():
                t = time.perf_counter()
                try:
                    codes[c.get("/health").status_code] += 1
                except httpx.HTTPError as exc:
                    codes[type(exc).__name__] += 1
                dt = time.perf_counter() - t
                lat.append(dt)
                stop.wait(max(0.0, 0.05 - dt))

    idle_lat, idle_codes = [], collections.Counter()
    stop = threading.Event()
    threading.Timer(2.0, stop.set).start()
    poll(stop, idle_lat, idle_codes)
    lat, codes = [], collections.Counter()
    stop = threading.Event()
    with rss_sampled(srv.proc.pid) as sampler:
        poller = threading.Thread(target=poll, args=(stop, lat, codes))
        poller.start()
        res = send_huge_head(srv.port, value_bytes, limit_s)
        time.sleep(0.2)  # a poll or two after the answer
        stop.set()
        poller.join()
    alive = srv.proc.poll() is None
    return {**res, "health_idle_latency_s": idle_lat, "health_latency_s": lat,
            "health_codes": dict(codes), "rss_peak_mb": sampler.peak,
            "rss_before_mb": sampler.series[0][1] if sampler.series else float("nan"),
            "server_alive_after": alive}


# --- main ------------------------------------------------------------------------------------
def build_index(n: int, checkpoint: str) -> tuple[Path, dict]:
    from encoder import Encoder, load_checkpoint
    from indexer import pipeline
    from indexer.faiss_index import FaissIndex
    from indexer.repository import IndexRepository
    from objectstore import LocalStore

    work = Path(tempfile.mkdtemp(prefix="bench-hostile-"))
    cache = str(work / "onnx")
    store = LocalStore(work / "store", "flickr8k")
    names = sorted(x.name for x in (FLICKR / "Images").iterdir())[:n]
    for name in names:
        store.put("flickr8k/images/" + name, (FLICKR / "Images" / name).read_bytes())
    enc = Encoder(load_checkpoint(checkpoint), image_runtime="onnx", text_runtime="onnx",
                  onnx_cache_dir=cache)
    repo = IndexRepository(work / "index")
    pipeline.rebuild(store, enc, FaissIndex(repo), "flickr8k/images/", progress=False)
    count = repo.load().count
    env = {**os.environ, "MODEL_PATH": checkpoint, "INDEX_DIR": str(work / "index"),
           "STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(work / "store"),
           "MINIO_BUCKET": "flickr8k", "IMAGE_RUNTIME": "onnx", "TEXT_RUNTIME": "onnx",
           "ONNX_CACHE_DIR": cache, "RELOAD_INTERVAL_S": "0"}
    env.pop("API_KEY", None)
    return work, {"env": env, "count": count, "first_image": FLICKR / "Images" / names[0]}


def fmt_codes(codes: dict) -> str:
    return ", ".join(f"{k}: {v}" for k, v in sorted(codes.items(), key=lambda kv: str(kv[0])))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--checkpoint", default=MODEL)
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--per-client", type=int, default=2)
    p.add_argument("--settle", type=float, default=10.0, help="seconds before the 'after' RSS")
    p.add_argument("--head-mb", type=int, default=HEAD_BYTES // 2**20)
    p.add_argument("--head-limit", type=float, default=HEAD_LIMIT_S)
    p.add_argument("--baseline-tree", default=None,
                   help="another checkout whose service is measured the same way, after this one")
    p.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                   help="environment for this tree's server only (repeatable)")
    args = p.parse_args()
    signal.signal(signal.SIGTERM, _on_signal)
    header("hostile uploads and request heads vs normal queries")

    extra = dict(kv.split("=", 1) for kv in args.env)
    work, built = build_index(args.n, args.checkpoint)
    env = built["env"]
    trees = {"this tree": (ROOT, {**env, **extra})}
    if args.baseline_tree:
        trees["baseline"] = (Path(args.baseline_tree).resolve(), env)
    images = [("g.gif", huge_canvas_gif(), "image/gif"), ("p.png", transparent_png(), "image/png")]
    warm_image = built["first_image"].read_bytes()
    results: dict[str, dict] = {}
    for name, (tree, tree_env) in trees.items():
        srv = Server(tree, tree_env, work / f"server-{name.replace(' ', '-')}.log")
        try:
            srv.wait_ready()
            print(f"[{name}] decode burst ...", file=sys.stderr, flush=True)
            burst = decode_burst(srv, images, warm_image, args.clients, args.per_client,
                                 args.settle)
            print(f"[{name}] huge head ...", file=sys.stderr, flush=True)
            head = huge_head(srv, args.head_mb * 2**20, args.head_limit)
        finally:
            srv.stop()
        results[name] = {"tree": str(tree), "burst": burst, "head": head,
                         "env": extra if name == "this tree" else {}}

    print(f"index: {built['count']} vectors (first {args.n} Flickr8k images), runtimes onnx; "
          f"burst: {args.clients} clients x {args.per_client} uploads ({len(images[0][1])} B GIF "
          f"/ {len(images[1][1]) / 1e3:.0f} kB PNG, {SIDE}x{SIDE}); head: {args.head_mb} MB "
          f"header value; trees: {', '.join(f'{k}={v[0]}' for k, v in trees.items())}"
          + (f"; this tree's extra env: {extra}" if extra else "") + "\n")

    rows1 = []
    for name, r in results.items():
        b = r["burst"]
        idle50, q = median(b["idle_text_latency_s"]), b["burst_text_latency_s"]
        rows1.append({
            "tree": name, "RSS before MB": b["rss_before_mb"], "RSS peak MB": b["rss_peak_mb"],
            "peak - before MB": b["rss_peak_mb"] - b["rss_before_mb"],
            f"RSS {args.settle:.0f} s after MB": b["rss_after_mb"],
            "after - before MB": b["rss_after_mb"] - b["rss_before_mb"],
            "burst wall s": b["burst_wall_s"], "upload statuses": fmt_codes(b["statuses"]),
            "text p50 no burst ms": 1000 * idle50, "text n in burst": len(q),
            "text p50 in burst ms": 1000 * median(q), "text max in burst ms": 1000 * max(q or [0]),
            "p50 burst / no burst": median(q) / idle50})
    print("## 1. decode burst\n")
    print(table(rows1))
    if len(rows1) == 2:
        a, b = rows1
        print(f"\nbaseline / this tree: peak growth {b['peak - before MB'] / a['peak - before MB']:.1f}x"
              f", burst wall {b['burst wall s'] / a['burst wall s']:.2f}x, text p50 in burst "
              f"{b['text p50 in burst ms'] / a['text p50 in burst ms']:.2f}x, text max in burst "
              f"{b['text max in burst ms'] / a['text max in burst ms']:.2f}x")

    rows2 = []
    for name, r in results.items():
        h = r["head"]
        idle50 = median(h["health_idle_latency_s"])
        hmax = max(h["health_latency_s"] or [float("nan")])
        rows2.append({
            "tree": name, "outcome": h["outcome"], "time to answer s": h["seconds"],
            "status line": h["status_line"] or "-", "MB sent": h["sent_mb"],
            "/health polls": len(h["health_latency_s"]), "/health codes": fmt_codes(
                h["health_codes"]),
            "/health p50 idle ms": 1000 * idle50,
            "/health p50 during ms": 1000 * median(h["health_latency_s"]),
            "/health max during ms": 1000 * hmax, "max / idle p50": hmax / idle50,
            "RSS before MB": h["rss_before_mb"], "RSS peak MB": h["rss_peak_mb"],
            "server alive": h["server_alive_after"]})
    print(f"\n## 2. huge request head ({args.head_mb} MB header value, "
          f"{args.head_limit:.0f} s limit)\n")
    print(table(rows2))
    if len(rows2) == 2:
        a, b = rows2
        print(f"\nbaseline / this tree: time to answer {b['time to answer s'] / a['time to answer s']:.0f}x"
              f", /health max {b['/health max during ms'] / a['/health max during ms']:.1f}x, "
              f"RSS peak - before {(b['RSS peak MB'] - b['RSS before MB']):.0f} MB vs "
              f"{(a['RSS peak MB'] - a['RSS before MB']):.0f} MB")
    save_json("hostile", {"args": vars(args), "results": results, "burst_rows": rows1,
                          "head_rows": rows2})
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
