"""Pure-ASGI middleware: a hard cap on request body size, and security headers."""
from __future__ import annotations

import json

from starlette.exceptions import HTTPException


class BodyTooLarge(HTTPException):
    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")


def _json_response(status: int, detail: str):
    body = json.dumps({"detail": detail}).encode()
    return [
        {"type": "http.response.start", "status": status,
         "headers": [(b"content-type", b"application/json"),
                     (b"content-length", str(len(body)).encode()),
                     (b"connection", b"close")]},
        {"type": "http.response.body", "body": body},
    ]


class BodyLimitMiddleware:
    """Refuses bodies over `limit` bytes: at once from Content-Length, or while streaming
    (chunked uploads have no Content-Length), so no route ever buffers more than the limit."""

    def __init__(self, app, limit: int):
        self.app = app
        self.limit = limit

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
                for m in _json_response(400, "invalid Content-Length header"):
                    await send(m)
                return
            if n > self.limit:
                for m in _json_response(413, f"request body larger than {self.limit} bytes"):
                    await send(m)
                return

        received = 0
        started = False

        async def limited_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise BodyTooLarge(self.limit)
            return message

        async def tracking_send(message):
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except BodyTooLarge as exc:  # raised outside a route's exception handling
            if started:
                raise
            for m in _json_response(413, exc.detail):
                await send(m)


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
