"""What stands between a client and the routes: the HTTP protocol with request-head limits and
a head timeout (`limited_http_protocol`), and pure-ASGI middleware: a hard cap on request body
size, a body-read timeout, HEAD answered as GET without a body, and security headers."""
from __future__ import annotations

import asyncio
import json

from starlette.exceptions import HTTPException


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes",
                         headers={"connection": "close"})


def _json_response(status: int, detail: str):
    body = json.dumps({"detail": detail}).encode()
    return [
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"),
                     (b"content-length", str(len(body)).encode()),
                     (b"connection", b"close")]},
        {"type": "http.response.body", "body": body},
    ]


def _raw_response(status: int, reason: str, detail: str) -> bytes:
    body = json.dumps({"detail": detail}).encode()
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
            f"content-length: {len(body)}\r\nconnection: close\r\n\r\n").encode() + body


class _HeadRefused(Exception):
    def __init__(self, status: int, reason: str, detail: str):
        self.status, self.reason, self.detail = status, reason, detail


def limited_http_protocol(max_head_bytes: int, max_url_bytes: int, max_headers: int,
                          head_timeout_s: float):
    """uvicorn's httptools protocol with bounds on the request head, checked before the parser
    sees the bytes: the head (request line + headers) must fit in `max_head_bytes` (431), the
    URL in `max_url_bytes` (414), at most `max_headers` headers (431), and it must arrive within
    `head_timeout_s` of the connection opening or the request starting (408). Refused at once,
    the connection closed: nothing unbounded is buffered or re-copied on the event loop (the
    parser's header and URL buffers grow by concatenation: quadratic in their size).

    Returns None when httptools is not installed (then uvicorn's h11 is used, bounded by
    `h11_max_incomplete_event_size`)."""
    try:
        import httptools
        from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
    except ImportError:  # pragma: no cover - uvicorn without httptools
        return None

    class LimitedHttpToolsProtocol(HttpToolsProtocol):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self._in_head = True  # between requests, or inside a head
            self._head_room = max_head_bytes
            self._url_bytes = 0
            self._header_count = 0
            self._head_timer: asyncio.TimerHandle | None = None
            self._refusal: _HeadRefused | None = None  # raised by a parser callback

        # --- head timeout ---------------------------------------------------------------------
        def _arm_head_timer(self):
            self._cancel_head_timer()
            self._head_timer = self.loop.call_later(head_timeout_s, self._head_timed_out)

        def _cancel_head_timer(self):
            if self._head_timer is not None:
                self._head_timer.cancel()
                self._head_timer = None

        def _head_timed_out(self):
            self._head_timer = None
            if self.transport.is_closing() or not self._in_head:
                return
            if self.cycle is not None and not self.cycle.response_complete:
                self.cycle.keep_alive = False  # a pipelined head is late: close after this one
                return
            if self._head_room == max_head_bytes:  # not a byte of a request: just close
                self._cancel_head_timer()
                self.transport.close()
                return
            self._refuse(_HeadRefused(408, "Request Timeout",
                                      f"request head not received within {head_timeout_s:g} s"))

        def connection_made(self, transport):
            super().connection_made(transport)
            self._arm_head_timer()  # a connection that never sends a byte is not kept forever

        def connection_lost(self, exc):
            self._cancel_head_timer()
            super().connection_lost(exc)

        # --- head size ------------------------------------------------------------------------
        def _refuse(self, err: _HeadRefused):
            self._cancel_head_timer()
            self._unset_keepalive_if_required()
            if self.transport.is_closing():
                return
            if self.cycle is None or self.cycle.response_complete:
                self.transport.write(_raw_response(err.status, err.reason, err.detail))
            elif self.cycle is not None:
                self.cycle.disconnected = True  # a response is in flight: just drop the client
            self.transport.close()

        def data_received(self, data: bytes) -> None:
            if self.transport.is_closing():
                return
            try:
                if self._in_head:
                    if len(data) > self._head_room:
                        # feed what may still be head; past that, the head must have ended
                        cut = self._head_room + 1
                        self._feed(data[:cut])
                        if self._in_head and not self.transport.is_closing():
                            raise _HeadRefused(431, "Request Header Fields Too Large",
                                               f"request head larger than {max_head_bytes} bytes")
                        data = data[cut:]
                        if not data or self.transport.is_closing():
                            return
                    else:
                        self._head_room -= len(data)
                self._feed(data)
            except _HeadRefused as err:
                self._refuse(err)

        def _feed(self, data: bytes) -> None:
            """HttpToolsProtocol.data_received, but a refusal raised by a callback (which the
            parser wraps in its own error) is answered as itself rather than as a 400."""
            self._unset_keepalive_if_required()
            try:
                self.parser.feed_data(data)
            except httptools.HttpParserUpgrade:
                if self._should_upgrade():
                    self.handle_websocket_upgrade()
                else:
                    self._unsupported_upgrade_warning()
            except httptools.HttpParserError:
                if self._refusal is not None:
                    raise self._refusal from None
                self.logger.warning("Invalid HTTP request received.")
                self.send_400_response("Invalid HTTP request received.")

        # parser callbacks (raise _HeadRefused through feed_data: caught in data_received)
        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._in_head = True
            self._url_bytes = 0
            self._header_count = 0
            self._arm_head_timer()

        def on_url(self, url: bytes) -> None:
            self._url_bytes += len(url)
            if self._url_bytes > max_url_bytes:
                self._refusal = _HeadRefused(414, "URI Too Long",
                                             f"URL longer than {max_url_bytes} bytes")
                raise self._refusal
            super().on_url(url)

        def on_header(self, name: bytes, value: bytes) -> None:
            self._header_count += 1
            if self._header_count > max_headers:
                self._refusal = _HeadRefused(431, "Request Header Fields Too Large",
                                             f"more than {max_headers} request headers")
                raise self._refusal
            super().on_header(name, value)

        def on_headers_complete(self) -> None:
            self._in_head = False
            self._cancel_head_timer()
            super().on_headers_complete()

        def on_message_complete(self) -> None:
            super().on_message_complete()
            self._in_head = True  # what follows is the next request's head
            self._head_room = max_head_bytes

    return LimitedHttpToolsProtocol


class BodyTimeout(HTTPException):
    def __init__(self, timeout: float):
        super().__init__(408, f"request body not received: nothing came for {timeout:g} s",
                         headers={"connection": "close"})


class BodyGuardMiddleware:
    """One wrapper around `receive` for every request body:
    - size: over `limit` bytes is a 413, at once from Content-Length, or while streaming (chunked
      uploads have no Content-Length), so no route ever buffers more than the limit;
    - time: a client that stops sending mid-body gets a 408 (connection closed) after `timeout`
      seconds without a byte, instead of holding its connection and task forever.
    Both are raised from `receive` as HTTPExceptions, so the routes' error handling answers."""

    def __init__(self, app, limit: int, timeout: float):
        self.app = app
        self.limit = limit
        self.timeout = timeout

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = None
        for name, value in scope.get("headers", ()):
            if name == b"content-length":
                length = value
                break
        if length is not None:
            try:
                n = int(length)
                if n < 0:
                    raise ValueError
            except ValueError:
                n = None
            refusal = (400, "invalid Content-Length header") if n is None else \
                (413, f"request body larger than {self.limit} bytes") if n > self.limit else None
            if refusal is not None:
                for m in _json_response(*refusal):
                    await send(m)
                return

        received = 0
        done = False
        started = False

        async def guarded_receive():
            nonlocal received, done
            if done:  # body complete: later receives wait for a disconnect, untimed
                return await receive()
            try:
                message = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise BodyTimeout(self.timeout) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            if message["type"] != "http.request" or not message.get("more_body", False):
                done = True
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, guarded_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside a route's exception handling
            if started:
                raise
            for m in _json_response(413, exc.detail):
                await send(m)


class HeadAsGetMiddleware:
    """HEAD is answered as GET without the body (health checkers use HEAD): routes declare GET
    only, and FastAPI would answer HEAD with a 405."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope.get("method") != "HEAD":
            return await self.app(scope, receive, send)
        sent_end = False

        async def bodiless_send(message):
            nonlocal sent_end
            if message["type"] == "http.response.body":
                if sent_end:
                    return
                if message.get("more_body", False):
                    return
                sent_end = True
                message = {"type": "http.response.body", "body": b"", "more_body": False}
            await send(message)

        await self.app({**scope, "method": "GET"}, receive, bodiless_send)


class SecurityHeadersMiddleware:
    """nosniff everywhere (image bytes come from users); a strict CSP on the web page."""

    PAGE_CSP = (b"default-src 'self'; img-src 'self' blob: data:; style-src 'self'; "
                b"script-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
                b"frame-ancestors 'none'; form-action 'self'")

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        page = scope.get("path") == "/" or scope.get("path", "").startswith("/static/")

        async def send_wrapper(message):
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                headers.append((b"x-content-type-options", b"nosniff"))
                if page:
                    headers.append((b"content-security-policy", self.PAGE_CSP))
                    headers.append((b"x-frame-options", b"DENY"))
                    headers.append((b"referrer-policy", b"same-origin"))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, send_wrapper)
