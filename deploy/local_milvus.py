"""Start a real Milvus standalone server (the PyPI `milvus` wheel, 2.3.5) on loopback.

Used by the tests and benchmarks of the Milvus backend; docker-compose's `scale` profile runs
the official image instead. `python -m deploy.local_milvus --dir DIR --port 19530` (or
`python deploy/local_milvus.py ...`) runs it in the foreground.

Every component listens on 127.0.0.1 on ports chosen here, so several servers (and other
people's tests) can run side by side; that includes the embedded etcd, which otherwise takes
the fixed ports 2379/2380 whatever the wheel's etcd_port says (its own config file, passed as
ETCD_CONFIG_PATH, names the ports). Stopping goes through the wheel's API (SIGTERM, then
SIGKILL of its own pid after a second: it may take 25 s to stop on SIGTERM alone); data stays
in DIR, so `start` again serves the same collections and aliases. Run as a program, SIGTERM or
SIGHUP stops the server too before the helper exits (`deploy.foreground`).
"""
from __future__ import annotations

import argparse
import os
import socket
import sys
import threading
import time
from pathlib import Path

if not __package__:  # run as `python deploy/<this file>.py`: import the repository's packages
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from deploy.foreground import stopped_on_exit  # noqa: E402
from deploy.ports import free_port  # noqa: E402

_ENV_LOCK = threading.Lock()  # the wheel copies os.environ when it starts the server
COMPONENTS = ("rootCoord", "proxy", "queryCoord", "queryNode", "indexNode", "dataCoord",
              "dataNode")
# Segments seal at 0.23 of this size as Milvus estimates rows, from each VARCHAR's max length:
# the photo fields make that ~5x a real row, and at the default 512 MB a 1M collection was 44
# segments of ~23k rows, each searched and indexed on its own (p50 10.2 ms, BENCHMARKS.md §7)
SEGMENT_MAX_MB = 2048


def _config_class():
    from milvus import MilvusServerConfig

    class LoopbackConfig(MilvusServerConfig):
        def try_bind_port(self, port):
            # the wheel probes each port with a plain bind; after a restart the old server's
            # connections sit in TIME_WAIT on them, which the server itself (SO_REUSEADDR)
            # does not mind
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                sock.bind(("127.0.0.1", port))
                sock.listen()
                return sock
            except OSError:
                sock.close()
                return None

    return LoopbackConfig


class LocalMilvus:
    """One Milvus standalone process with its data under `base_dir`."""

    def __init__(self, base_dir: str | os.PathLike, port: int | None = None):
        from milvus import MilvusServer

        self.base_dir = Path(base_dir)
        self.server = MilvusServer(_config_class()(), wait_for_started=True)
        self.server.set_base_dir(str(self.base_dir))
        ports = {k: free_port() for k in self.server.config_keys if k.endswith("_port")}
        if port:
            ports["proxy_port"] = port
        self.server.config.update(**ports)
        for comp in COMPONENTS:
            self.server.config.set(f"{comp}.ip", "127.0.0.1")
        self.server.config.set("dataCoord.segment.maxSize", SEGMENT_MAX_MB)
        self.port = ports["proxy_port"]
        self.etcd_ports = (ports["etcd_port"], free_port())  # client, peer

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def pid(self) -> int | None:
        return self.server.server_proc.pid if self.server.server_proc else None

    def _etcd_config(self) -> Path:
        client, peer = (f"http://127.0.0.1:{p}" for p in self.etcd_ports)
        path = self.base_dir / "embed-etcd.yaml"
        self.base_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(f"listen-client-urls: {client}\nadvertise-client-urls: {client}\n"
                        f"listen-peer-urls: {peer}\ninitial-advertise-peer-urls: {peer}\n"
                        f"initial-cluster: default={peer}\n")
        return path

    def _start_once(self) -> None:
        with _ENV_LOCK:
            before = os.environ.get("ETCD_CONFIG_PATH")
            os.environ["ETCD_CONFIG_PATH"] = str(self._etcd_config().resolve())
            try:
                self.server.start()
            finally:
                if before is None:
                    os.environ.pop("ETCD_CONFIG_PATH", None)
                else:
                    os.environ["ETCD_CONFIG_PATH"] = before

    def start(self, attempts: int = 3) -> "LocalMilvus":
        for attempt in range(1, attempts + 1):
            try:
                self._start_once()
                return self
            except RuntimeError:  # a port still held by the previous process: wait, retry
                self.server.stop()
                if attempt == attempts:
                    raise
                time.sleep(2.0 * attempt)
        return self

    def stop(self) -> None:
        self.server.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dir", default="data/milvus")
    p.add_argument("--port", type=int, default=19530)
    a = p.parse_args()
    m = LocalMilvus(a.dir, a.port)
    with stopped_on_exit(m.stop):  # also a SIGTERM that comes while it starts
        m.start()
        print(f"Milvus standalone on {m.uri} (pid {m.pid}); Ctrl-C or SIGTERM stops it",
              flush=True)
        m.server.wait()
