"""A bounded soak: the service searched without pause while the bucket changes, the index is
updated every few minutes and processes are SIGKILLed at random.

    python bench/soak.py [--minutes 30] [--n 400] [--clients 16] [--update-every 180]
                         [--kill-every 240] [--backend faiss|milvus] [--indexer command|dag]
                         [--seed 0]

Setup: a local store with N Flickr8k photos (more held back for uploads), the shipped model
(ONNX), an index built once (FAISS, or a Milvus server started here with its data in the run's
folder); two `python -m search_api` replicas on that index behind a round-robin balancer
(tests/faults/test_api_replicas.py's, which skips an upstream that refuses or drops
connections). Then, for --minutes:
- 16 clients (asyncio + httpx, in this process) search through the balancer back to back; a
  failed search is retried once, as a client of a replicated service does (after the answer's
  Retry-After, at most 5 s, when it has one);
- every ~15 s a photo is uploaded to the bucket or one deleted (not while an index run is on:
  the verify after it compares with the bucket as the run listed it);
- the index follows the bucket every --update-every seconds: `python -m indexer update` (the
  reindex DAG's work in one process; --indexer command), or the reindex DAG itself on that cron
  schedule under a real Airflow (--indexer dag: scheduler with the LocalExecutor, dag-processor
  and api-server, tests/faults/test_airflow_killed.py's deployment); the replicas follow the new
  version; after each publish `python -m indexer verify` checks that it holds exactly the
  bucket's photos;
- every --kill-every seconds one process is SIGKILLed, each kind once per round in a random
  order: an API replica (started again on its port); with --indexer command an update 0.5-2.5 s
  after it started (one starts then if none runs; it is run again at once); with --indexer dag
  a task process of the DAG 0.3-2 s into its work (in turn a shard, the publish, the plan: the
  next one to run if none does now; Airflow retries it) or the scheduler with its session (a new one starts); with --backend milvus the
  Milvus server (started again on its data: searches answer 503 until it is back, the
  documented window, counted apart).
Report: searches answered and failed (after the retry) per minute with p50 / p99; the resident
memory (RSS) of every long-lived process (replicas, Milvus, Airflow's) after warm-up and at the
end, per incarnation; every index run and every verify. Raw samples land in
.cache/bench/soak.json. Not part of CI: it runs for as long as asked.
"""
from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
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
from deploy.balancer import Balancer
from deploy.local_airflow import REINDEX_DAG, LocalAirflow, alive
from deploy.ports import free_port
from search_api.testing import rss_mb

QUERIES = ["two dogs playing in the snow", "a man rides a bicycle down a city street",
           "a little girl in a pink dress", "people sitting on a bench next to the water",
           "a black dog jumps over a log", "a surfer riding a big wave",
           "children playing soccer on a field", "a woman climbing a rock wall"]
PREFIX = "flickr8k/images/"
WARM_UP_S = 60


class Replica:
    def __init__(self, name: str, env: dict):
        self.name, self.env, self.port = name, env, free_port()
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
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

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(30)


def run_json(cmd: list[str], env: dict) -> dict:
    r = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    try:
        out = json.loads(r.stdout)
    except ValueError:
        out = {"stdout": r.stdout[-500:], "stderr": r.stderr[-500:]}
    return {"rc": r.returncode, **out} if isinstance(out, dict) else {"rc": r.returncode}


class CommandUpdates:
    """`python -m indexer update` every `every` seconds; its victim: an update mid-way."""

    victims = ["update"]

    def __init__(self, env: dict, work: Path, every: float, log, rng: random.Random):
        self.env, self.work, self.every, self.log, self.rng = env, work, every, log, rng
        self.proc: subprocess.Popen | None = None
        self.next_at = time.time() + every
        self.kill_at: float | None = None
        self.history: list[dict] = []

    def busy(self) -> bool:
        return self.proc is not None

    def tick(self, now: float) -> bool:
        """Start what is due, kill what is due; True when an update has just published."""
        if self.proc is None and now >= self.next_at:
            with open(self.work / "updates.log", "a") as out:
                self.proc = subprocess.Popen([sys.executable, "-m", "indexer", "--quiet",
                                              "update"], env=self.env, cwd=ROOT, stdout=out,
                                             stderr=subprocess.STDOUT)
            self.started = now
            self.log("update started", pid=self.proc.pid)
            self.next_at = now + self.every
        if self.kill_at is not None and now >= self.kill_at and self.proc is not None:
            self.kill_at = None
            self.proc.send_signal(signal.SIGKILL)
            self.log("SIGKILL update", pid=self.proc.pid)
        if self.proc is not None and self.proc.poll() is not None:
            rc, self.proc = self.proc.returncode, None
            self.history.append({"ended s": self.log("update ended", rc=rc), "rc": rc,
                                 "seconds": round(now - self.started, 1)})
            if rc != 0:
                self.next_at = now  # run again at once
            return rc == 0
        return False

    def kill(self, victim: str, now: float) -> None:
        if self.proc is None:  # one starts now, to be killed mid-way
            self.next_at = now
        self.kill_at = now + self.rng.uniform(0.5, 2.5)

    def finish(self) -> bool:
        """Let the update on now end, start no other; True when it published."""
        self.next_at, published = float("inf"), False
        while self.proc is not None:
            published |= self.tick(time.time())
            time.sleep(0.2)
        return published

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def processes(self) -> dict[str, int]:
        return {}


class DagRuns:
    """The reindex DAG on a cron schedule under a real Airflow deployment; its victims: a task
    process mid-work, the scheduler with its session."""

    victims = ["task", "scheduler"]

    def __init__(self, env: dict, work: Path, every: float, log, rng: random.Random):
        minutes = max(1, round(every / 60))
        self.dag, self.log, self.rng = REINDEX_DAG, log, rng
        self.dep = LocalAirflow(work, env, REINDEX_SCHEDULE=f"*/{minutes} * * * *",
                              FLICKR8K_TASK_RETRIES="3")
        try:
            for name in ("api-server", "dag-processor", "scheduler"):
                self.dep.start(name)
            self.dep.cli("dags", "unpause", REINDEX_DAG)
        except BaseException:  # nothing it started outlives a failed start
            self.dep.stop_all()
            raise
        self.ended: set[str] = set()
        self.kill_task_until: float | None = None
        # the task each task kill waits for, in turn: a shard mid-embedding, the publish,
        # the plan
        self.task_targets = itertools.cycle(["embed_shard", "publish_index", "plan_shards"])
        self.history: list[dict] = []

    def busy(self) -> bool:
        return any(state not in ("success", "failed") for _, state in self.dep.runs())

    def tick(self, now: float) -> bool:
        if self.kill_task_until is not None:
            self._kill_a_task(now)
        published = False
        for run_id, state in self.dep.runs():
            if state not in ("success", "failed") or run_id in self.ended:
                continue
            self.ended.add(run_id)
            tasks = self.dep.tasks(run_id)
            out = self.dep.xcom(run_id, "publish_index")
            run = {"run": run_id.split("__")[-1][:19], "state": state, "tasks": len(tasks),
                   "retried": sum(t["try_number"] > 1 for t in tasks.values()),
                   "publish": tasks.get("publish_index", {}).get("state"),
                   "count": (out or {}).get("count")}
            self.history.append({"ended s": self.log("run ended", run=run_id, state=state,
                                                     publish=run["publish"],
                                                     retried=run["retried"]), **run})
            if state == "failed":  # the next one mends it; not left to the schedule
                self.dep.cli("dags", "trigger", self.dag)
                self.log("run triggered")
            published |= state == "success" and self.history[-1]["publish"] == "success"
        return published

    def _kill_a_task(self, now: float) -> None:
        for run_id, state in self.dep.runs():
            if state != "running":
                continue
            for name, t in self.dep.tasks(run_id).items():
                if name.split("[")[0] == self.task_target and t["state"] == "running" \
                        and t["pid"] and alive(t["pid"]):
                    if now < self.task_seen.setdefault((run_id, name, t["pid"]), now) + \
                            self.task_delay:
                        continue
                    cmdline = _cmdline(t["pid"])  # before: a killed process has none
                    os.kill(t["pid"], signal.SIGKILL)
                    self.kill_task_until = None
                    self.log("SIGKILL task", run=run_id, task=name, pid=t["pid"],
                             cmdline=cmdline)
                    return
        if now > self.kill_task_until:
            self.kill_task_until = None
            self.log("no task to kill", task=self.task_target)

    def kill(self, victim: str, now: float) -> None:
        if victim == "task":  # the next such task once it has worked a moment
            self.kill_task_until, self.task_seen = now + 400, {}
            self.task_target, self.task_delay = next(self.task_targets), self.rng.uniform(0.3, 2)
        else:
            pids = self.dep.kill("scheduler")
            self.log("SIGKILL scheduler", session=pids)
            self.dep.start("scheduler")
            self.log("scheduler back", pid=self.dep.procs["scheduler"].pid)

    def finish(self) -> bool:
        """Let the runs on now end (a paused DAG's runs would stall: not paused); True when
        one published."""
        on = {run_id for run_id, state in self.dep.runs() if state not in ("success", "failed")}
        deadline, published = time.time() + 600, False
        while on - self.ended and time.time() < deadline:
            published |= self.tick(time.time())
            time.sleep(1)
        return published

    def stop(self) -> None:
        self.dep.stop_all()

    def processes(self) -> dict[str, int]:
        return {name: proc.pid for name, proc in self.dep.procs.items()}


def _cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"



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
                        if status == 503 and "Milvus" in r.text:  # says why: Milvus is down
                            status = "503 Milvus"
                        if not ok and tries < 2 and "retry-after" in r.headers:
                            await asyncio.sleep(min(5.0, float(r.headers["retry-after"])))
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
    p.add_argument("--backend", choices=["faiss", "milvus"], default="faiss")
    p.add_argument("--indexer", choices=["command", "dag"], default="command")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    # `kill` (SIGTERM) stops the soak as Ctrl-C does: what it started is stopped on the way out
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    with contextlib.ExitStack() as cleanup:
        return soak(args, cleanup)


def soak(args, cleanup: contextlib.ExitStack) -> int:
    """The soak; every process it starts is stopped by `cleanup`, however it ends."""
    header(f"soak: search load, bucket changes, index runs ({args.indexer}) and kills, "
           f"{args.backend}")
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
    milvus = None
    if args.backend == "milvus":
        from deploy.local_milvus import LocalMilvus

        milvus = LocalMilvus(work / "milvus")
        cleanup.callback(milvus.stop)
        milvus.start()
        env.update(INDEX_BACKEND="milvus", MILVUS_URI=milvus.uri,
                   MILVUS_COLLECTION_PREFIX="soak")
    bucket = store_dir / "flickr8k" / PREFIX
    bucket.mkdir(parents=True)
    for name in held:
        (bucket / name).write_bytes((FLICKR / "Images" / name).read_bytes())
    r = subprocess.run([sys.executable, "-m", "indexer", "--quiet", "rebuild"], env=env,
                       cwd=ROOT, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(r.stderr[-2000:])

    stop = threading.Event()
    samples: list = []
    events: list[dict] = []
    verifies: list[dict] = []
    rss: dict[str, list[tuple[float, int, float]]] = {}  # name: (t, pid, MB)
    outages: list[list[float]] = []  # Milvus [killed, started again] (time.time())
    t_start = time.time()

    def log(kind: str, **kw) -> float:
        """Record an event; its time in seconds since the soak's start."""
        events.append({"t": round(time.time() - t_start, 1), "event": kind, **kw})
        print(f"[{events[-1]['t']:7.1f} s] {kind} {kw if kw else ''}", flush=True)
        return events[-1]["t"]

    def verify() -> None:
        v = run_json([sys.executable, "-m", "indexer", "verify", "--json"], env)
        verifies.append({"t": round(time.time() - t_start, 1),
                         **{k: v.get(k) for k in ("rc", "ok", "objects", "rows", "version")},
                         **{k: (v.get(k) or {}).get("count") for k in (
                             "missing", "stale", "extra", "duplicated")}})
        log("verify", ok=v.get("ok"), rows=v.get("rows"), objects=v.get("objects"))

    replicas = [Replica(f"api-{i}", env) for i in range(2)]
    for rep in replicas:
        cleanup.callback(rep.stop)
        rep.start()
    cleanup.callback(stop.set)  # the load's clients
    runs = (DagRuns if args.indexer == "dag" else CommandUpdates)(
        env, work, args.update_every, log, rng)
    cleanup.callback(runs.stop)
    victims = [rep.name for rep in replicas] + runs.victims + (["milvus"] if milvus else [])
    t_start = time.time()  # all started: the soak's clock
    bag: list[str] = []

    with Balancer([rep.port for rep in replicas]) as balancer:
        url = f"http://127.0.0.1:{balancer.port}/search_images_by_text"
        load = threading.Thread(target=lambda: asyncio.run(
            search_load(url, args.clients, stop, samples)), daemon=True)
        load.start()
        end = t_start + 60 * args.minutes
        next_change = t_start + 15
        next_kill = t_start + args.kill_every
        next_rss = t_start
        while time.time() < end:
            now = time.time()
            if now >= next_rss:
                procs = {rep.name: rep.proc.pid for rep in replicas}
                procs.update(runs.processes())
                if milvus and milvus.pid:
                    procs["milvus"] = milvus.pid
                for name, pid in procs.items():
                    mb = rss_mb(pid)
                    if mb == mb:  # NaN: gone
                        rss.setdefault(name, []).append((round(now - t_start, 1), pid, mb))
                next_rss = now + 5
            if runs.tick(now):  # published: the version must equal the bucket
                verify()
            # an upload or a deletion, not while an index run is on
            if now >= next_change and not runs.busy():
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
            if now >= next_kill:
                if not bag:  # every kind of victim once per round, in a random order
                    bag = rng.sample(victims, len(victims))
                victim = bag.pop()
                if victim == "milvus":
                    log("SIGKILL milvus", pid=milvus.pid)
                    outages.append([time.time()])
                    os.kill(milvus.pid, signal.SIGKILL)
                    milvus.server.server_proc.wait(timeout=60)
                    milvus.stop()
                    time.sleep(1)
                    milvus.start()  # the same data and ports
                    outages[-1].append(time.time())
                    log("milvus back", pid=milvus.pid)
                elif victim in runs.victims:
                    runs.kill(victim, now)
                else:
                    rep = next(r for r in replicas if r.name == victim)
                    log("SIGKILL replica", replica=victim, pid=rep.proc.pid)
                    rep.kill()
                    time.sleep(1)
                    rep.start()
                    log("replica back", replica=victim, pid=rep.proc.pid)
                next_kill = now + args.kill_every
            time.sleep(0.2)
        if runs.finish():
            verify()
        stop.set()
        load.join(60)
    cleanup.close()  # every process stopped before the report

    # --- report ---------------------------------------------------------------------------------
    # a Milvus outage: from its kill until the first search answered after it was started again
    # and the replicas had found its collection loaded (the "503 Milvus" answers end)
    windows = []
    for i, (killed, *back) in enumerate(outages):
        until = outages[i + 1][0] if i + 1 < len(outages) else float("inf")
        later = [s for s in samples if back and back[0] < s[0] < until]
        last_503 = max((s[0] for s in later if s[4] == "503 Milvus"),
                       default=back[0] if back else float("inf"))
        windows.append((killed, min((s[0] for s in later if s[2] and s[0] >= last_503),
                                    default=float("inf"))))

    def down_window(t: float) -> bool:
        return any(a <= t <= b for a, b in windows)

    failed = [s for s in samples if not s[2]]
    in_window = [s for s in failed if s[4] == "503 Milvus" and down_window(s[0])]
    beyond = [s for s in failed if s not in in_window]
    by_minute: dict[int, list] = {}
    for t, lat, ok, tries, status in samples:
        by_minute.setdefault(int((t - t_start) // 60), []).append((lat, ok, tries, status, t))
    rows = []
    for minute, ss in sorted(by_minute.items()):
        lats = [s[0] for s in ss if s[1]]
        row = {"minute": minute, "searches": len(ss),
               "failed": sum(not s[1] for s in ss), "retried": sum(s[2] > 1 for s in ss)}
        if milvus:
            row["503 Milvus down"] = sum(not s[1] and s[3] == "503 Milvus"
                                         and down_window(s[4]) for s in ss)
        row.update({"p50 ms": 1000 * median(lats) if lats else "-",
                    "p99 ms": 1000 * pct(lats, 99) if lats else "-"})
        rows.append(row)
    print(f"\n{len(samples)} searches, {len(failed)} failed after one retry, of which "
          f"{len(in_window)} answered 503 while Milvus was down and {len(beyond)} beyond "
          f"({sum(s[3] > 1 for s in samples)} retried); kills: "
          f"{sum(e['event'].startswith('SIGKILL') for e in events)}; index runs: "
          f"{len(runs.history)}; verifies: {len(verifies)}, all ok: "
          f"{all(v.get('ok') for v in verifies)}\n")
    if windows:
        print("Milvus down (killed until the first search answered after it): " + ", ".join(
            f"{a - t_start:.0f}-{b - t_start:.0f} s" for a, b in windows) + "\n")
    print(table(rows))
    rss_rows = []
    for name, series_all in rss.items():
        for pid in dict.fromkeys(pid for _, pid, _ in series_all):
            series = [(t, mb) for t, i, mb in series_all if i == pid]
            first_t = series[0][0]
            warm = [mb for t, mb in series if t >= first_t + WARM_UP_S] or [series[-1][1]]
            rss_rows.append({"process": name, "pid": pid, "from s": first_t,
                             "to s": series[-1][0], "RSS after warm-up MB": warm[0],
                             "RSS at end MB": series[-1][1],
                             "max MB": max(mb for _, mb in series),
                             "growth MB": series[-1][1] - warm[0]})
    print()
    print(table(rss_rows))
    print()
    print(table(runs.history) if runs.history else "(no index run ended)")
    print()
    print(table(verifies) if verifies else "(no publish verified)")
    save_json("soak", {"args": vars(args), "events": events, "verifies": verifies,
                       "runs": runs.history, "rows": rows, "rss": rss, "outages": outages,
                       "failed": failed[:200], "failed_beyond_window": beyond[:200],
                       "milvus_down_windows": [(a - t_start, b - t_start) for a, b in windows],
                       "searches": len(samples),
                       "balancer_connections": dict(balancer.connections)})
    return 0 if not beyond and verifies and all(v.get("ok") for v in verifies) else 1


if __name__ == "__main__":
    raise SystemExit(main())
