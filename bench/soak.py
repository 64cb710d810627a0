"""A bounded soak: the service searched without pause while the bucket changes, the index is
updated every few minutes and processes are SIGKILLed at random.

    python bench/soak.py [--minutes 30] [--n 400] [--clients 16] [--update-every 180]
                         [--kill-every 240] [--seed 0]

Setup: a local store with N Flickr8k photos (more held back for uploads), the shipped model
(ONNX), a FAISS index built once; two `python -m search_api` replicas on that index behind a
round-robin balancer (tests/faults/test_api_replicas.py's, which skips an upstream that refuses
or drops connections). Then, for --minutes:
- 16 clients (asyncio + httpx, in this process) search through the balancer back to back; a
  failed search is retried once, as a client of a replicated service does;
- every ~15 s a photo is uploaded to the bucket or one deleted;
- every --update-every seconds `python -m indexer update` (the work of the reindex DAG's tasks,
  in one process) publishes what changed; the replicas reload the new version; after each
  publish `python -m indexer verify` checks that it holds exactly the bucket's photos as they
  were when the update listed them;
- every --kill-every seconds one process is SIGKILLed at random: an API replica (started again
  on its port), or an update 0.5-2.5 s after it started (one starts then if none runs; it is
  run again at once).
Report: searches answered and failed (after the retry) per minute with p50 / p99; each
replica's resident memory (RSS) after warm-up and at the end (per incarnation); every verify.
Raw samples land in .cache/bench/soak.json. Not part of CI: it runs for as long as asked.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

from common import FLICKR, MODEL, ROOT, header, median, pct, save_json, table
from deploy.ports import free_port

QUERIES = ["two dogs playing in the snow", "a man rides a bicycle down a city street",
           "a little girl in a pink dress", "people sitting on a bench next to the water",
           "a black dog jumps over a log", "a surfer riding a big wave",
           "children playing soccer on a field", "a woman climbing a rock wall"]
PREFIX = "flickr8k/images/"
WARM_UP_S = 60


def rss_mb(pid: int) -> float | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        return None
    return None


class Replica:
    def __init__(self, name: str, env: dict):
        self.name, self.env, self.port = name, env, free_port()
        self.proc: subprocess.Popen | None = None
        self.incarnation = 0
        self.rss: list[tuple[float, int, float]] = []  # (t, incarnation, MB)

    def start(self) -> None:
        self.incarnation += 1
        self.proc = subprocess.Popen([sys.executable, "-m", "search_api", "--port",
                                      str(self.port), "--log-level", "warning"],
                                     env=self.env, cwd=ROOT, stdout=subprocess.DEVNULL,
                                     stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{self.port}/health", timeout=2)
                return
            except OSError:
                if self.proc.poll() is not None:
                    raise SystemExit(f"{self.name} did not start")
                time.sleep(0.2)
        raise SystemExit(f"{self.name} did not start in 180 s")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()


def run_json(cmd: list[str], env: dict) -> dict:
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        out = {"stdout": r.stdout[-500:]}
    return {"rc": r.returncode, **out} if isinstance(out, dict) else {"rc": r.returncode}


async def search_load(url: str, clients: int, stop: threading.Event, samples: list) -> None:
    import httpx

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(limits=limits, timeout=30) as client:
        async def one(w: int) -> None:
            i = w
            while not stop.is_set():
                q = QUERIES[i % len(QUERIES)]
                i += 1
                t0 = time.perf_counter()
                ok, tries, status = False, 0, None
                while not ok and tries < 2:  # a failed search is retried once
                    tries += 1
                    try:
                        r = await client.post(url, json={"query": q, "top_k": 10})
                        status = r.status_code
                        ok = status == 200
                    except httpx.HTTPError as exc:
                        status = type(exc).__name__
                samples.append((time.time(), time.perf_counter() - t0, ok, tries, status))

        await asyncio.gather(*(one(w) for w in range(clients)))


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--minutes", type=float, default=30)
    p.add_argument("--n", type=int, default=400)
    p.add_argument("--clients", type=int, default=16)
    p.add_argument("--update-every", type=float, default=180)
    p.add_argument("--kill-every", type=float, default=240)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    header("soak: search load, bucket changes, updates and kills")
    sys.path.insert(0, str(ROOT))
    from tests.faults.test_api_replicas import Balancer

    rng = random.Random(args.seed)
    work = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    names = sorted(x.name for x in (FLICKR / "Images").iterdir())
    held, spare = names[:args.n], names[args.n:args.n + 400]
    store_dir = work / "store"
    env = {**os.environ, "MODEL_PATH": MODEL, "INDEX_DIR": str(work / "index"),
           "STORE_BACKEND": "local", "LOCAL_STORE_DIR": str(store_dir),
           "MINIO_BUCKET": "flickr8k", "IMAGE_RUNTIME": "onnx", "TEXT_RUNTIME": "onnx",
           "ONNX_CACHE_DIR": str(work / "onnx"), "RELOAD_INTERVAL_S": "2",
           "PYTHONPATH": str(ROOT)}
    bucket = store_dir / "flickr8k" / PREFIX
    bucket.mkdir(parents=True)
    for name in held:
        (bucket / name).write_bytes((FLICKR / "Images" / name).read_bytes())
    r = subprocess.run([sys.executable, "-m", "indexer", "--quiet", "rebuild"], env=env,
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])

    replicas = [Replica(f"api-{i}", env) for i in range(2)]
    for rep in replicas:
        rep.start()
    stop = threading.Event()
    samples: list = []
    events: list[dict] = []
    verifies: list[dict] = []
    t_start = time.time()

    def log(kind: str, **kw) -> None:
        events.append({"t": round(time.time() - t_start, 1), "event": kind, **kw})
        print(f"[{events[-1]['t']:7.1f} s] {kind} {kw if kw else ''}", flush=True)

    with Balancer([rep.port for rep in replicas]) as balancer:
        url = f"http://127.0.0.1:{balancer.port}/search_images_by_text"
        load = threading.Thread(target=lambda: asyncio.run(
            search_load(url, args.clients, stop, samples)), daemon=True)
        load.start()
        end = t_start + 60 * args.minutes
        next_change = t_start + 15
        next_update = t_start + args.update_every
        next_kill = t_start + args.kill_every
        next_rss = t_start
        update: subprocess.Popen | None = None
        kill_update_at: float | None = None
        while time.time() < end:
            now = time.time()
            if now >= next_rss:
                for rep in replicas:
                    mb = rss_mb(rep.proc.pid) if rep.proc.poll() is None else None
                    if mb is not None:
                        rep.rss.append((round(now - t_start, 1), rep.incarnation, mb))
                next_rss = now + 5
            # an upload or a deletion (not while an update runs: its verify compares with the
            # bucket as the update listed it)
            if now >= next_change and update is None:
                present = sorted(x.name for x in bucket.iterdir())
                if spare and (rng.random() < 0.6 or len(present) < args.n // 2):
                    name = spare.pop()
                    (bucket / name).write_bytes((FLICKR / "Images" / name).read_bytes())
                    log("upload", key=name)
                else:
                    name = rng.choice(present)
                    (bucket / name).unlink()
                    log("delete", key=name)
                next_change = now + 15
            if update is None and now >= next_update:
                with open(work / "updates.log", "a") as out:
                    update = subprocess.Popen([sys.executable, "-m", "indexer", "--quiet",
                                               "update"], env=env, cwd=ROOT, stdout=out,
                                              stderr=subprocess.STDOUT)
                log("update started", pid=update.pid)
                next_update = now + args.update_every
            if update is not None and update.poll() is not None:
                rc = update.returncode
                update = None
                log("update ended", rc=rc)
                if rc == -signal.SIGKILL:
                    next_update = now  # run again at once
                else:
                    v = run_json([sys.executable, "-m", "indexer", "verify", "--json"], env)
                    verifies.append({"t": round(now - t_start, 1), "update_rc": rc,
                                     **{k: v.get(k) for k in ("rc", "ok", "objects", "rows",
                                                              "version")},
                                     **{k: (v.get(k) or {}).get("count") for k in (
                                         "missing", "stale", "extra", "duplicated")}})
                    log("verify", ok=v.get("ok"), rows=v.get("rows"), objects=v.get("objects"))
            if kill_update_at is not None and now >= kill_update_at:
                kill_update_at = None
                if update is not None and update.poll() is None:
                    update.send_signal(signal.SIGKILL)
                    log("SIGKILL update", pid=update.pid)
            if now >= next_kill:
                victim = rng.choice([rep.name for rep in replicas] + ["update"])
                if victim == "update":  # mid-way: an update starts now if none runs
                    if update is None:
                        next_update = now
                    kill_update_at = now + rng.uniform(0.5, 2.5)
                else:
                    rep = next(r for r in replicas if r.name == victim)
                    log("SIGKILL replica", replica=victim, pid=rep.proc.pid)
                    rep.kill()
                    time.sleep(1)
                    rep.start()
                    log("replica back", replica=victim, pid=rep.proc.pid)
                next_kill = now + args.kill_every
            time.sleep(0.2)
        if update is not None:
            update.wait()
        stop.set()
        load.join(60)
    for rep in replicas:
        rep.proc.terminate()
        rep.proc.wait(30)

    # --- report ---------------------------------------------------------------------------------
    by_minute: dict[int, list] = {}
    for t, lat, ok, tries, status in samples:
        by_minute.setdefault(int((t - t_start) // 60), []).append((lat, ok, tries, status))
    rows = []
    for minute, ss in sorted(by_minute.items()):
        lats = [s[0] for s in ss if s[1]]
        rows.append({"minute": minute, "searches": len(ss),
                     "failed": sum(not s[1] for s in ss),
                     "retried": sum(s[2] > 1 for s in ss),
                     "p50 ms": 1000 * median(lats) if lats else "-",
                     "p99 ms": 1000 * pct(lats, 99) if lats else "-"})
    failed = [s for s in samples if not s[2]]
    print(f"\n{len(samples)} searches, {len(failed)} failed after one retry "
          f"({sum(s[3] > 1 for s in samples)} retried); kills: "
          f"{sum(e['event'].startswith('SIGKILL') for e in events)}; updates verified: "
          f"{len(verifies)}, all ok: {all(v.get('ok') for v in verifies)}\n")
    print(table(rows))
    rss_rows = []
    for rep in replicas:
        for inc in sorted({i for _, i, _ in rep.rss}):
            series = [(t, mb) for t, i, mb in rep.rss if i == inc]
            first_t = series[0][0]
            warm = [mb for t, mb in series if t >= first_t + WARM_UP_S] or [series[-1][1]]
            rss_rows.append({"replica": rep.name, "incarnation": inc,
                             "from s": first_t, "to s": series[-1][0],
                             "RSS after warm-up MB": warm[0], "RSS at end MB": series[-1][1],
                             "max MB": max(mb for _, mb in series),
                             "growth MB": series[-1][1] - warm[0]})
    print()
    print(table(rss_rows))
    print()
    print(table(verifies) if verifies else "(no update verified)")
    save_json("soak", {"args": vars(args), "events": events, "verifies": verifies,
                       "rows": rows, "rss": {r.name: r.rss for r in replicas},
                       "failed": failed[:200], "searches": len(samples),
                       "balancer_connections": dict(balancer.connections)})
    return 0 if not failed and all(v.get("ok") for v in verifies) else 1


if __name__ == "__main__":
    raise SystemExit(main())
