"""The FastAPI app: routes, error handlers, and the background model load."""

import asyncio
import gc
import json
import logging
import threading
import time
from collections.abc import Callable, Hashable
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from .batcher import DeadlineExceeded, MicroBatcher, QueueFull, ShuttingDown
from .middleware import OPEN_PATHS, AccessLog, LimitBody, RequireApiKey, body_limit, overloaded
from .pool import ModelPool
from .protocol import raw_error
from .schemas import (
    CODES,
    ApiError,
    ClassifyResponse,
    LabelsResponse,
    ModelInfo,
    ModelsResponse,
    Stats,
    Status,
    classify_request_model,
    describe_validation_errors,
    error_response,
    error_responses,
    to_classification,
)
from .worker import ModelUnavailable

log = logging.getLogger("loratune.serve")


def create_app(
    load: Callable[[], ModelPool],
    *,
    api_key: str | None = None,
    max_chars: int = 4000,
    max_batch: int = 64,
    max_wait_ms: float = 5.0,
    default_mode: str = "score",
    max_queue: int | None = None,
    on_load_error: Callable[[BaseException], None] | None = None,
) -> FastAPI:
    """The FastAPI app. ``load`` builds the models in a background thread once the server is up.

    ``max_chars``/``max_batch`` bound one text / the texts in one request; ``max_queue`` bounds the texts
    waiting for a forward pass (beyond it: 503 with Retry-After; None, the default here: unbounded;
    ``loratune serve`` passes ``serve.max_queue``); ``on_load_error`` is told
    when loading fails (the CLI stops the server then).
    """
    app = FastAPI(
        title="loratune",
        version=_version(),
        lifespan=_lifespan(load, max_wait_ms / 1000, max_queue, default_mode, on_load_error),
        dependencies=[Depends(_known_query_only)],
        description='Classify text with LoRA adapters trained by loratune. Errors are `{"error": {"code", "message"}}`.',
    )
    state = app.state
    state.pool = state.batcher = state.load_error = None
    state.closing = False
    state.requests = state.texts = state.forward_passes = state.in_flight = state.refused = 0
    state.admission = Admission(app)  # asked by the HTTP layer (serve/protocol.py) before it parses a request
    _add_error_handlers(app)
    _add_probe_routes(app)
    _add_classify_route(app, classify_request_model(max_chars, max_batch), default_mode)
    _add_model_routes(app)
    # Middleware: the last added runs first.
    app.add_middleware(LimitBody, max_bytes=body_limit(max_chars, max_batch))
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)
        _document_bearer_auth(app)
    app.add_middleware(AccessLog)
    return app


class Admission:
    """Admission control for the HTTP layer, before a request is parsed (serve/protocol.py).

    Counts the classify requests let in and not yet answered. While that count reaches the queue's bound plus one
    batch (those requests are queued, in the forward pass, or still on their way through the app), or the queue
    itself is full, a new one gets a ready-made 503 ``overloaded`` with ``Retry-After`` and never reaches the app.
    Counting requests, not just queued texts, matters under overload: requests accepted faster than the event
    loop can bring them to the queue would otherwise all be let in, and wait in the loop instead of the queue.
    """

    def __init__(self, app: FastAPI):
        self.state = app.state
        self.admitted = 0
        self._refusals: dict[int, bytes] = {}

    def enter(self) -> bytes | None:
        """None: the request is let in (call :meth:`leave` once it is answered); else the response to send."""
        batcher = self.state.batcher
        if batcher is None or batcher.max_queue is None or (self.admitted < batcher.max_queue + batcher.max_batch and not batcher.full()):
            self.admitted += 1
            return None
        self.state.refused += 1
        return self._refusal(batcher.retry_after_s())

    def leave(self) -> None:
        self.admitted -= 1

    def _refusal(self, retry_after: int) -> bytes:
        if retry_after not in self._refusals:  # a handful of values: built once each
            message = "the server is at capacity; retry after Retry-After seconds"
            self._refusals[retry_after] = raw_error(503, "Service Unavailable", "overloaded", message, {"Retry-After": str(retry_after)})
        return self._refusals[retry_after]


def _lifespan(load, max_wait_s: float, max_queue: int | None, mode: str, on_load_error):
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        state = app.state

        def count_pass(_n: int) -> None:  # called by the Classifier once per forward pass, in the worker
            state.forward_passes += 1

        def loaded(pool: ModelPool, seconds: float) -> None:
            if state.closing:
                return
            state.pool = pool
            if hasattr(pool, "on_give_up"):  # a model process that died and could not be restarted stops the server
                pool.on_give_up = lambda exc: loop.call_soon_threadsafe(failed, exc)
            run = lambda key, texts: pool.predict(key[0], texts, key[1], progress=count_pass)  # noqa: E731
            state.batcher = MicroBatcher(run, pool.batch_size, max_wait_s, max_queue)
            state.batcher.start()
            # Everything loaded so far (torch, transformers, the app) leaves the cyclic GC's view: a full collection
            # over it stalled the event loop ~100 ms every couple of seconds under load, and refusals waited.
            gc.collect()
            gc.freeze()
            log.info(
                json.dumps({"event": "ready", "load_s": round(seconds, 2), "models": list(pool.classifiers), "batch_size": pool.batch_size})
            )

        def failed(exc: BaseException) -> None:
            state.load_error = exc
            log.error(json.dumps({"event": "load_failed", "error": str(exc) or type(exc).__name__}))
            if on_load_error is not None:
                on_load_error(exc)

        # A daemon thread: stopping the server during a long load need not wait for it.
        threading.Thread(target=_load_in_background, args=(load, mode, loop, loaded, failed), name="loratune-load", daemon=True).start()
        try:
            yield
        finally:
            state.closing = True
            if state.batcher is not None:
                await state.batcher.stop()  # uvicorn has let in-flight requests finish; this drains the rest
            if state.pool is not None:
                await asyncio.to_thread(state.pool.close)  # a model process ends after the drained queue

    return lifespan


def _load_in_background(load, mode: str, loop: asyncio.AbstractEventLoop, loaded, failed) -> None:
    started = time.perf_counter()
    try:
        pool = load()
        pool.warm_up(mode)  # before /readyz says 200
    except Exception as exc:
        outcome: tuple = (failed, exc)
    else:
        outcome = (loaded, pool, time.perf_counter() - started)
    try:
        loop.call_soon_threadsafe(*outcome)
    except RuntimeError:
        pass  # the server stopped while loading


async def _known_query_only(request: Request) -> None:
    # Like extra="forbid" for bodies: a typo such as ?modle=b must not quietly answer for the default model.
    route = request.scope.get("route")
    known = {p.alias for p in route.dependant.query_params} if route is not None else set()
    unknown = sorted(set(request.query_params) - known)
    if unknown:
        raise ApiError(422, "invalid_request", f"unknown query parameter {', '.join(map(repr, unknown))}")


async def _json_body(request: Request) -> None:
    kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
    if kind != "application/json" and not kind.endswith("+json"):
        raise ApiError(
            415, "unsupported_media_type", f"send the body as JSON with 'Content-Type: application/json' (got {kind or 'none'!r})"
        )


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        status, code, message = describe_validation_errors(exc.errors())
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = getattr(exc, "code", None) or CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return error_response(500, "internal_error", "the server failed to answer; see its log")


def _ready(state) -> tuple[ModelPool, MicroBatcher]:
    if state.closing:
        raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "1"})
    if state.load_error is not None:
        raise ApiError(503, "load_failed", f"the model failed to load: {state.load_error}")
    if state.pool is None:
        raise ApiError(503, "loading", "the model is still loading", {"Retry-After": "1"})
    if not getattr(state.pool, "ready", True):
        raise ApiError(503, "model_restarting", state.pool.unavailable(), {"Retry-After": "1"})
    return state.pool, state.batcher


def _pick(pool: ModelPool, name: str | None) -> str:
    name = pool.default if name is None else name
    if name not in pool.classifiers:
        raise ApiError(404, "model_not_found", f"no model named {name!r}; this server has {', '.join(map(repr, pool.classifiers))}")
    return name


def _add_probe_routes(app: FastAPI) -> None:
    @app.get("/healthz", response_model=Status, tags=["health"])
    async def healthz():
        """Liveness: the process answers (the model may still be loading)."""
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses=error_responses(503), tags=["health"])
    async def readyz():
        """Readiness: 200 once the model is loaded and the server takes requests, else 503."""
        _ready(app.state)
        return Status(status="ready")

    @app.get("/v1/stats", response_model=Stats, tags=["health"])
    async def stats():
        """Counters since start: requests, texts, micro-batches, forward passes, queue and refusals."""
        state, batcher = app.state, app.state.batcher
        return Stats(
            requests=state.requests,
            texts=state.texts,
            batches=batcher.batches if batcher else 0,
            forward_passes=state.forward_passes,
            in_flight=state.in_flight,
            queued_texts=batcher.waiting if batcher else 0,
            refused=state.refused,
            dropped=batcher.dropped if batcher else 0,
            model_restarts=getattr(state.pool, "restarts", 0),
        )


def _add_classify_route(app: FastAPI, request_model: type[BaseModel], default_mode: str) -> None:
    @app.post(
        "/v1/classify",
        response_model=ClassifyResponse,
        dependencies=[Depends(_json_body)],
        responses=error_responses(400, 404, 413, 415, 422, 503, 504),
        tags=["classify"],
    )
    async def classify(body: request_model, request: Request):
        """Classify one text (`text`) or several (`texts`) with the chosen adapter (`model`).

        Optional header `X-Timeout-Ms`: how long the client waits, from the request's arrival. A request the
        queue cannot serve in time is refused at once (503 `overloaded`); one whose turn comes too late is
        dropped unrun (504 `deadline_exceeded`).
        """
        # Read by hand, not declared as a parameter: a schema fuzzer sending `X-Timeout-Ms: 1e-300` would get
        # the 503/504 a deadline nobody can meet deserves, and report it as a server error.
        timeout_ms = _timeout_ms(request)
        state = app.state
        pool, batcher = _ready(state)
        name = _pick(pool, body.model)
        texts = [body.text] if body.text is not None else body.texts
        mode = body.mode or default_mode
        arrived = request.scope.get("state", {}).get("arrived", time.monotonic())
        deadline = None if timeout_ms is None else arrived + timeout_ms / 1000
        state.in_flight += 1
        try:
            predictions, batch_size = await _answer(state, batcher, (name, mode), texts, deadline, request.receive)
        finally:
            state.in_flight -= 1
        state.requests += 1
        state.texts += len(texts)
        request.state.model, request.state.mode = name, mode
        request.state.texts, request.state.batch_size = len(texts), batch_size
        return ClassifyResponse(model=name, mode=mode, results=[to_classification(p) for p in predictions])


def _timeout_ms(request: Request) -> float | None:
    raw = request.headers.get("x-timeout-ms")
    if raw is None:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0 < value < float("inf"):  # also refuses nan
        raise ApiError(422, "invalid_request", f"X-Timeout-Ms must be a positive number of milliseconds (got {raw[:40]!r})")
    return value


async def _answer(state, batcher: MicroBatcher, key: Hashable, texts: list[str], deadline: float | None, receive) -> tuple[list, int]:
    """The batcher's answer, or an ApiError; if the client disconnects first, its job is dropped unrun."""
    work = asyncio.ensure_future(batcher.submit(key, texts, deadline))
    gone = asyncio.ensure_future(_disconnected(receive))
    try:
        await asyncio.wait({work, gone}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        gone.cancel()
        if not work.done():
            work.cancel()  # cancels the job's future: the batcher skips it
    if not work.done() or work.cancelled():  # a cancelled task is done only once the loop has run it again
        # nginx's "client closed request": nobody reads it, but the access log says what happened.
        raise ApiError(499, "client_closed_request", "the client closed the connection before the answer")
    try:
        return work.result()
    except ShuttingDown:
        raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "1"}) from None
    except QueueFull:
        state.refused += 1
        raise overloaded(batcher) from None
    except ModelUnavailable as exc:
        raise ApiError(503, "model_restarting", str(exc), {"Retry-After": "1"}) from None
    except DeadlineExceeded:
        raise ApiError(504, "deadline_exceeded", "X-Timeout-Ms passed before the request's turn; it was not computed") from None


async def _disconnected(receive) -> None:
    # The body is read already, so the server's next message is http.disconnect (the client left) or nothing.
    while (await receive())["type"] != "http.disconnect":
        pass


def _add_model_routes(app: FastAPI) -> None:
    @app.get("/v1/models", response_model=ModelsResponse, responses=error_responses(503), tags=["models"])
    async def models():
        """The adapters this server answers with, their labels and base model."""
        pool, _ = _ready(app.state)
        return ModelsResponse(
            models=[
                ModelInfo(
                    name=name,
                    labels=c.labels,
                    multi_label=c.multi_label,
                    base_model=c.meta.base_model_requested or c.meta.base_model,
                    default=name == pool.default,
                    quantize=c.quantize,
                )
                for name, c in pool.classifiers.items()
            ]
        )

    @app.get("/v1/labels", response_model=LabelsResponse, responses=error_responses(404, 422, 503), tags=["models"])
    async def labels(model: Annotated[str | None, Query(description="Adapter name; default: the first.")] = None):
        """The label set of one adapter, in prompt order."""
        pool, _ = _ready(app.state)
        name = _pick(pool, model)
        return LabelsResponse(model=name, labels=pool.classifiers[name].labels)


def _document_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer key in the OpenAPI schema (the RequireApiKey middleware enforces it)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"apiKey": []}]
            refused = {
                "description": "Missing or wrong API key",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}},
            }
            for path, operations in schema["paths"].items():
                for operation in operations.values():
                    if path in OPEN_PATHS:
                        operation["security"] = []
                    else:
                        operation["responses"].setdefault("401", refused)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi


def _version() -> str:
    from .. import __version__

    return __version__
