"""The service's HTTP protocol (search_api.middleware.limited_http_protocol) driven in process
over a recording transport: every response leaves in one write (head and body together), and
what must not wait for a body (100 Continue, a HEAD response's head) is not held."""
from __future__ import annotations

import asyncio

import uvicorn
from uvicorn.server import ServerState

from search_api.middleware import limited_http_protocol


class RecordingTransport(asyncio.Transport):
    def __init__(self):
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False

    def write(self, data):
        self.writes.append(bytes(data))

    def is_closing(self):
        return self.closed

    def close(self):
        self.closed = True

    def pause_reading(self):
        pass

    def resume_reading(self):
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1234) if name in ("peername", "sockname") else default


async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    out = b'{"echo":%d}' % len(body)
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(out)).encode())]})
    await asyncio.sleep(0)  # the body a turn later, as a route that awaits between them
    await send({"type": "http.response.body", "body": out})


async def _serve(*chunks: bytes) -> RecordingTransport:
    config = uvicorn.Config(app, lifespan="off", log_level="warning")
    config.load()
    protocol = limited_http_protocol(8192, 2048, 50, 5.0)(config=config,
                                                          server_state=ServerState(), app_state={})
    transport = RecordingTransport()
    protocol.connection_made(transport)
    for chunk in chunks:
        protocol.data_received(chunk)
        for _ in range(20):
            await asyncio.sleep(0)
    protocol.connection_lost(None)
    return transport


def test_each_response_leaves_in_one_write_pipelined_or_not():
    post = (b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 5\r\n\r\nhello")
    writes = asyncio.run(_serve(post, post + post)).writes
    assert len(writes) == 3
    for w in writes:
        assert w.startswith(b"HTTP/1.1 200 OK\r\n") and w.endswith(b'\r\n\r\n{"echo":5}')


def test_100_continue_and_a_head_response_are_not_held():
    expect = (b"POST /x HTTP/1.1\r\nHost: x\r\nExpect: 100-continue\r\n"
              b"Content-Length: 3\r\n\r\n")
    head = b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n"
    writes = asyncio.run(_serve(expect, b"abc", head)).writes
    # the 100 Continue alone, before the client sends the body; then the answer in one write
    assert writes[0] == b"HTTP/1.1 100 Continue\r\n\r\n"
    assert writes[1].startswith(b"HTTP/1.1 200 OK") and writes[1].endswith(b'{"echo":3}')
    # HEAD: the head goes out though no body write follows
    assert len(writes) == 3 and writes[2].startswith(b"HTTP/1.1 200 OK")
    assert writes[2].endswith(b"\r\n\r\n")
