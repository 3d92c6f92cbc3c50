"""What every request passes before a route sees it: a request id, the API key, the body limit.

A plain ASGI middleware (not BaseHTTPMiddleware) so that it sees the body as the server streams
it: a body larger than `max_body_bytes` is refused with 413 from its Content-Length header
alone, or, without one (chunked), as soon as the bytes read pass the limit; it is never held
in memory whole. Refusals use the OpenAI error body (errors.py).

The API key guards the OpenAI routes (/v1/...) only: /healthz, /readyz and /metrics stay open
for probes and Prometheus. The key is compared in constant time and never logged or echoed.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable

from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import REQUEST_ID_HEADER, ApiError, new_request_id

PROTECTED_PREFIX = "/v1"


class BodyTooLarge(Exception):
    pass


class RequestGuard:
    def __init__(
        self,
        app: ASGIApp,
        *,
        max_body_bytes: int,
        api_key: str | None = None,
        on_reject: Callable[[int], None] | None = None,
    ):
        self.app = app
        self.max_body_bytes = max_body_bytes
        self._key = api_key.encode() if api_key is not None else None
        self._on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = new_request_id()
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                MutableHeaders(scope=message).append(REQUEST_ID_HEADER, request_id)
            await send(message)

        headers = Headers(scope=scope)
        error = self._unauthorized(scope["path"], headers)
        if error is None and self._declared_length(headers) > self.max_body_bytes:
            error = self._too_large()  # refused before a byte of the body is read
        body: bytes | None = None
        if error is None:
            try:
                body = await self._read_body(receive)
            except BodyTooLarge:
                error = self._too_large()
        if error is not None:
            if self._on_reject is not None:
                self._on_reject(error.status)
            await error.response()(scope, receive, send_with_id)
            return
        if body is None:  # the client went away before it sent its body: nobody to answer
            return
        await self.app(scope, _replay(body, receive), send_with_id)

    def _unauthorized(self, path: str, headers: Headers) -> ApiError | None:
        if self._key is None or not (
            path == PROTECTED_PREFIX or path.startswith(PROTECTED_PREFIX + "/")
        ):
            return None
        scheme, _, credentials = headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            message = (
                "You didn't provide an API key. Send it in an Authorization header using "
                "Bearer auth (Authorization: Bearer YOUR_KEY)."
            )
        elif hmac.compare_digest(credentials.strip().encode(), self._key):
            return None
        else:
            message = "Incorrect API key provided."
        return ApiError(
            401, message, code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}
        )

    @staticmethod
    def _declared_length(headers: Headers) -> int:
        # The HTTP server has checked the header's syntax; a missing one means chunked or empty.
        value = headers.get("content-length", "")
        return int(value) if value.isdigit() else 0

    def _too_large(self) -> ApiError:
        return ApiError(
            413,
            f"The request body is larger than {self.max_body_bytes} bytes.",
            code="request_too_large",
        )

    async def _read_body(self, receive: Receive) -> bytes | None:
        """The whole body, at most max_body_bytes of it (BodyTooLarge past that); None when
        the client disconnected first."""
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise BodyTooLarge
            chunks.append(chunk)
            if not message.get("more_body", False):
                return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """The body in one message, then the server's own messages (http.disconnect)."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if sent:
            return await receive()
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    return replayed
