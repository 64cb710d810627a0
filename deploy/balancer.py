"""A round-robin TCP balancer over local API replicas, in a thread of its own: what a proxy in
front of several `python -m search_api` processes does, for the replica tests and the soak bench.

One upstream per client connection. An upstream that refuses a connection, or drops one with a
request unanswered, is skipped for FAIL_TIMEOUT_S (nginx's passive health check with its defaults:
max_fails=1, fail_timeout=10s).
"""
from __future__ import annotations

import asyncio
import threading
import time
from collections import Counter

from deploy.ports import free_port


class Balancer:
    FAIL_TIMEOUT_S = 10.0

    def __init__(self, upstreams: list[int]):
        self.upstreams = upstreams
        self.port = free_port()
        self.connections: Counter[int] = Counter()
        self._down_until = {p: 0.0 for p in upstreams}
        self._turn = 0
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> "Balancer":
        self._thread.start()
        if not self._started.wait(10):
            raise RuntimeError(f"the balancer did not listen on port {self.port} in 10 s")
        return self

    def __exit__(self, *exc) -> None:
        asyncio.run_coroutine_threadsafe(self._shutdown(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._server = self._loop.run_until_complete(
            asyncio.start_server(self._handle, "127.0.0.1", self.port))
        self._started.set()
        self._loop.run_forever()

    async def _shutdown(self) -> None:
        self._server.close()
        tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    def _candidates(self) -> list[int]:
        now = time.monotonic()
        up = [p for p in self.upstreams if self._down_until[p] <= now] or self.upstreams
        self._turn += 1
        return up[self._turn % len(up):] + up[:self._turn % len(up)]

    async def _handle(self, client_r, client_w) -> None:
        try:
            await self._serve(client_r, client_w)
        except asyncio.CancelledError:  # the balancer stops: end quietly
            client_w.close()

    async def _serve(self, client_r, client_w) -> None:
        for port in self._candidates():
            try:
                up_r, up_w = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                self._down_until[port] = time.monotonic() + self.FAIL_TIMEOUT_S
                continue
            self.connections[port] += 1
            last = {"sent": 0.0, "answered": 0.0}  # when bytes last went up / came back
            await asyncio.gather(_pipe(client_r, up_w, last, "sent"),
                                 _pipe(up_r, client_w, last, "answered",
                                       on_end=lambda: self._ended(port, last)))
            return
        client_w.close()

    def _ended(self, port: int, last: dict) -> None:
        if last["sent"] > last["answered"]:  # the upstream went away with a request unanswered
            self._down_until[port] = time.monotonic() + self.FAIL_TIMEOUT_S


async def _pipe(reader, writer, last: dict, side: str, on_end=None) -> None:
    try:
        while data := await reader.read(65536):
            last[side] = time.monotonic()
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:  # one side gone: the connection is over (the client's next try opens another)
        if on_end is not None:
            on_end()
        writer.close()
