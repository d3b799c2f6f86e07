"""ASGI middleware: access log (outermost), API key, body size limit; and the 503 for a full queue."""

import hmac
import json
import logging
import time

from .schemas import ApiError, error_response

log = logging.getLogger("loratune.serve")

OPEN_PATHS = ("/healthz", "/readyz")
"""Routes that never ask for the API key: probes from load balancers and orchestrators carry none."""


def body_limit(max_chars: int, max_batch: int) -> int:
    """The largest body a valid classify request can need, in bytes.

    Limits are in characters, checked after JSON decoding; this byte cap only keeps memory bounded. A character
    can take 12 bytes escaped (an emoji as a surrogate pair, ``\\ud83d\\ude00``), so any body within
    ``max_batch`` texts of ``max_chars`` fits, with room for the rest of the request.
    """
    return 12 * max_chars * max_batch + 64 * 1024


class AccessLog:
    """One JSON line per request: method, path, status, latency and, for classify, model and batch size."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        info = scope.setdefault("state", {})
        info["arrived"] = time.monotonic()  # a request's X-Timeout-Ms counts from here
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            record = {
                "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z",
                "method": scope["method"],
                "path": scope["path"],
                "status": status,
                "latency_ms": round(1000 * (time.perf_counter() - started), 2),
            }
            record.update({k: info[k] for k in ("model", "mode", "texts", "batch_size") if k in info})
            log.info(json.dumps(record, ensure_ascii=True))


class RequireApiKey:
    """``Authorization: Bearer KEY`` on every route but the health probes; compared in constant time."""

    def __init__(self, app, api_key: str):
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                message = "missing API key: send 'Authorization: Bearer KEY'" if not given else "wrong API key"
                response = error_response(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def overloaded(batcher) -> ApiError:
    """503 with a Retry-After of the time the queue likely takes to drain."""
    message = f"the server is at capacity ({batcher.waiting} texts queued); retry after Retry-After seconds"
    return ApiError(503, "overloaded", message, {"Retry-After": str(batcher.retry_after_s())})


class LimitBody:
    """Refuse bodies over ``max_bytes`` (413) before they fill memory, declared or streamed."""

    def __init__(self, app, max_bytes: int):
        self.app = app
        self.max_bytes = max_bytes
        self.message = f"the request body is larger than {max_bytes} bytes"

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            return await error_response(413, "too_large", self.message)(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.max_bytes:
                raise ApiError(413, "too_large", self.message)  # FastAPI re-raises HTTPExceptions from body reading
            return message

        return await self.app(scope, counted, send)
