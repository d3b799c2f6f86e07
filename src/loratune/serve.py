"""HTTP server for trained adapters: a FastAPI app factory and a micro-batcher.

    loratune serve --adapter outputs/lora/final                          # http://127.0.0.1:8000/docs
    loratune serve --adapter billing=runs/a/final --adapter triage=runs/b/final   # two adapters, one base

Requests are answered by a :class:`~loratune.predict.Classifier`. Concurrent requests are gathered into
micro-batches (up to ``predict.batch_size`` texts, or whatever arrived within ``max_wait_ms``), and each batch
is one forward pass in ONE worker thread, so the event loop stays free and only one copy of the model is in
memory. Several adapters share one base model through PEFT's multi-adapter API; a batch never mixes adapters.
The model loads in the background: ``/healthz`` answers at once, ``/readyz`` says 503 until it is loaded.
"""

import asyncio
import hmac
import json
import logging
import re
import socket
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Mapping
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, Literal

from fastapi import Depends, FastAPI, HTTPException, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.exceptions import HTTPException as StarletteHTTPException

from .adapter import AdapterMeta, check_shared_base, load_adapters
from .config import Config, PredictConfig
from .errors import LoratuneError
from .predict import INVALID, Classifier, Prediction, inference_dtype, pick_device

log = logging.getLogger("loratune.serve")

DEFAULT_NAME = "default"
NAME_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
OPEN_PATHS = ("/healthz", "/readyz")
"""Routes that never ask for the API key: probes from load balancers and orchestrators carry none."""


# --------------------------------------------------------------------------------------------------
# Models: one base model in memory, one or more named adapters over it.

def parse_adapter_specs(specs: list[str]) -> dict[str, Path]:
    """``--adapter DIR`` (named "default") or ``--adapter NAME=DIR``, repeatable, into {name: dir}."""
    adapters: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        # A directory whose name holds "=" (runs/lr=1e-3/final) is a path, not NAME=DIR.
        if not sep or Path(spec).exists() or "/" in name or "\\" in name:
            name, path = DEFAULT_NAME, spec
        if not NAME_PATTERN.match(name):
            raise LoratuneError(f"--adapter {spec!r}: the name must be letters, digits, '.', '_' or '-' "
                                f"(at most 64), e.g. --adapter billing=outputs/lora/final")
        if name in adapters:
            raise LoratuneError(f"--adapter: the name {name!r} is given twice; name each adapter: "
                                f"--adapter NAME=DIR")
        adapters[name] = Path(path)
    if not adapters:
        raise LoratuneError("nothing to serve: pass --adapter DIR (or NAME=DIR, repeatable)")
    return adapters


def check_adapters(adapters: Mapping[str, Path], base_model: str | None = None) -> dict[str, dict]:
    """Read every adapter's metadata and check they can be served together, without loading any weights."""
    metas = {name: AdapterMeta.read(path) for name, path in adapters.items()}
    check_shared_base(metas, base_model)
    return metas


class ModelPool:
    """Named classifiers over ONE base model. Only the batcher's worker thread calls :meth:`predict`."""

    def __init__(self, classifiers: Mapping[str, Classifier], peft_model=None):
        self.classifiers = dict(classifiers)
        self.default = next(iter(self.classifiers))
        """The model a request gets when it names none: the first adapter given."""
        self._peft_model = peft_model

    @property
    def batch_size(self) -> int:
        return min(c.batch_size for c in self.classifiers.values())

    def predict(self, name: str, texts: list[str], mode: str, progress=None) -> list[Prediction]:
        if self._peft_model is not None:
            self._peft_model.set_adapter(name)  # a batch holds one adapter's requests only
        return self.classifiers[name].predict(texts, mode=mode, progress=progress)


def load_pool(adapters: Mapping[str, Path], settings: PredictConfig | None = None, *, base_model: str | None = None,
              device: str | None = None, **overrides) -> ModelPool:
    """Load the adapters over one base model with the ``predict`` settings (``overrides`` replace single fields).
    A single adapter is merged into the base (same scores, faster)."""
    import dataclasses

    from .families import family_class
    from .predict import classifier_from_config

    check_adapters(adapters, base_model)
    settings = dataclasses.replace(settings or PredictConfig(), **overrides)
    if len(adapters) == 1:
        (name, path), = adapters.items()
        cfg = Config(predict=settings)
        return ModelPool({name: classifier_from_config(cfg, path, base_override=base_model, device=device)})
    dev = pick_device(device)
    model, loaded = load_adapters(adapters, base_model=base_model, dtype=inference_dtype(dev))
    model.to(dev).eval()
    classifiers = {name: Classifier(family_class(meta.family)(model, tokenizer, meta.spec), settings, meta=meta,
                                    name=str(adapters[name]))
                   for name, (tokenizer, meta) in loaded.items()}
    return ModelPool(classifiers, peft_model=model)


# --------------------------------------------------------------------------------------------------
# Micro-batching.

@dataclass
class _Job:
    key: Hashable
    items: list
    future: asyncio.Future


class ShuttingDown(Exception):
    """The batcher no longer takes work."""


class MicroBatcher:
    """Gather concurrent requests into batches and run each batch in one worker thread.

    ``run(key, items) -> results`` does the work; only jobs with the same key share a batch. A batch closes
    when ``max_batch`` items are waiting or ``max_wait_s`` has passed since its first job arrived; a job
    larger than ``max_batch`` forms a batch of its own. While a batch runs, new jobs queue up, so under load
    batches fill without waiting.
    """

    def __init__(self, run: Callable[[Hashable, list], list], max_batch: int, max_wait_s: float):
        self._run = run
        self.max_batch = max_batch
        self.max_wait_s = max_wait_s
        self.batches = 0
        self._queue: asyncio.Queue[_Job | None] = asyncio.Queue()
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="loratune-infer")
        self._task: asyncio.Task | None = None
        self._closed = False

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def submit(self, key: Hashable, items: list) -> tuple[list, int]:
        """Results for ``items`` (in order) and the size of the batch that computed them."""
        if self._closed:
            raise ShuttingDown
        future = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Job(key, list(items), future))
        return await future

    async def stop(self) -> None:
        """Take no new jobs, finish every queued one, then stop the worker."""
        if self._closed:
            return
        self._closed = True
        self._queue.put_nowait(None)
        if self._task is not None:
            await self._task
        self._executor.shutdown(wait=True)

    async def _loop(self) -> None:
        loop = asyncio.get_running_loop()
        pending: deque[_Job] = deque()
        stopping = False
        while pending or not stopping:
            if not pending:
                job = await self._queue.get()
                if job is None:
                    stopping = True
                    continue
                pending.append(job)
            deadline = loop.time() + self.max_wait_s
            while not stopping and self._waiting(pending) < self.max_batch:
                try:
                    job = self._queue.get_nowait()
                except asyncio.QueueEmpty:
                    remaining = deadline - loop.time()
                    if remaining <= 0:
                        break
                    try:
                        job = await asyncio.wait_for(self._queue.get(), remaining)
                    except asyncio.TimeoutError:
                        break
                if job is None:
                    stopping = True
                else:
                    pending.append(job)
            await self._execute(self._take(pending))

    @staticmethod
    def _waiting(pending: deque[_Job]) -> int:
        key = pending[0].key
        return sum(len(j.items) for j in pending if j.key == key)

    def _take(self, pending: deque[_Job]) -> list[_Job]:
        """The first job plus later jobs with its key, up to max_batch items; the rest stay queued in order."""
        first = pending.popleft()
        batch, size, keep = [first], len(first.items), deque()
        while pending:
            job = pending.popleft()
            if job.key == first.key and size + len(job.items) <= self.max_batch:
                batch.append(job)
                size += len(job.items)
            else:
                keep.append(job)
        pending.extend(keep)
        return batch

    async def _execute(self, batch: list[_Job]) -> None:
        batch = [job for job in batch if not job.future.done()]  # clients that gave up cost nothing
        if not batch:
            return
        items = [item for job in batch for item in job.items]
        try:
            results = await asyncio.get_running_loop().run_in_executor(
                self._executor, self._run, batch[0].key, items)
        except Exception as exc:
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(exc)
            return
        self.batches += 1
        start = 0
        for job in batch:
            if not job.future.done():
                job.future.set_result((results[start:start + len(job.items)], len(items)))
            start += len(job.items)


# --------------------------------------------------------------------------------------------------
# Request and response bodies.

# At least one character that is not whitespace (str.isspace, as data.py's "is empty" check), spelled out so
# that JSON Schema clients, Python and pydantic's Rust regex all read the pattern the same way.
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def classify_request_model(max_chars: int, max_batch: int) -> type[BaseModel]:
    """The body of ``POST /v1/classify``, with this server's limits in its schema, where clients see them."""
    one_text = Annotated[str, Field(min_length=1, max_length=max_chars, pattern=NOT_BLANK)]

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(extra="forbid", json_schema_extra={
            "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],
            "examples": [{"text": "I was charged twice for my subscription."},
                         {"texts": ["The app crashes on startup.", "Where is my parcel?"], "model": "default"}]})

        # Defaults of None keep the fields optional, while an explicit null is refused like any non-string.
        text: one_text = Field(None, description="One text to classify. Give this or `texts`.")
        texts: list[one_text] = Field(None, min_length=1, max_length=max_batch,
                                  description="Several texts to classify, answered in order.")
        model: str = Field(None, description="Adapter name (see /v1/models); default: the first one served.")
        mode: Literal["score", "generate"] = Field(
            None, description="score: probability of every label; generate: free greedy decoding (label "
                              "'invalid' when the output is no label). Default: the server's --mode.")

        @model_validator(mode="after")
        def _one_input(self):
            if ("text" in self.model_fields_set) == ("texts" in self.model_fields_set):
                raise ValueError("give exactly one of 'text' or 'texts'")
            return self

    return ClassifyRequest


class Classification(BaseModel):
    label: str = Field(description="The predicted label ('invalid' in generate mode when the output matches none).")
    labels: list[str] = Field(description="All predicted labels: [label] for single-label adapters.")
    scores: dict[str, float] | None = Field(
        description="Probability of each label (score mode): they sum to 1, or for a multi-label adapter each is independent.")
    raw: str | None = Field(None, description="The generated text (generate mode).")


class ClassifyResponse(BaseModel):
    model: str
    mode: str
    results: list[Classification] = Field(description="One per input text, in order.")


class ModelInfo(BaseModel):
    name: str
    labels: list[str]
    multi_label: bool
    base_model: str
    default: bool


class ModelsResponse(BaseModel):
    models: list[ModelInfo]


class LabelsResponse(BaseModel):
    model: str
    labels: list[str]


class Status(BaseModel):
    status: str


class Stats(BaseModel):
    requests: int = Field(description="Classify requests answered.")
    texts: int = Field(description="Texts classified.")
    batches: int = Field(description="Micro-batches run.")
    forward_passes: int = Field(description="Model forward passes (score mode: one per batch of up to "
                                            "predict.batch_size texts).")
    in_flight: int = Field(description="Classify requests waiting for their answer now.")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def _errors(*statuses: int) -> dict:
    return {status: {"model": ErrorBody} for status in statuses}


class ApiError(HTTPException):
    """An HTTP error with a machine-readable code, rendered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.code = code


CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found", 405: "method_not_allowed",
         413: "too_large", 415: "unsupported_media_type", 422: "invalid_request", 503: "unavailable"}


class _AsciiJSON(JSONResponse):
    # Error messages may quote client input; ASCII escapes keep even lone surrogates encodable.
    def render(self, content: Any) -> bytes:
        return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return _AsciiJSON({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


LIMIT_HINTS = {"string_too_long": " (the server's --max-chars)", "too_long": " (the server's --max-batch)"}
PLAIN_MESSAGES = {"string_pattern_mismatch": "text is blank (only whitespace)"}


def _describe(errors) -> tuple[int, str, str]:
    """(status, code, message) for FastAPI validation errors: malformed JSON is a 400, the rest 422."""
    for e in errors:
        if e.get("type") == "json_invalid":
            reason = (e.get("ctx") or {}).get("error", "malformed")
            return 400, "malformed_json", f"the request body is not valid JSON ({reason})"
    parts = []
    for e in errors[:5]:
        where = ".".join(str(p) for p in e.get("loc", ()) if p != "body") or "body"
        msg = PLAIN_MESSAGES.get(e.get("type")) or e.get("msg", "invalid").removeprefix("Value error, ")
        parts.append(f"{where}: {msg}{LIMIT_HINTS.get(e.get('type'), '')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "invalid_request", "; ".join(parts) + more


# --------------------------------------------------------------------------------------------------
# ASGI middleware: access log (outermost), API key, body size limit.

class AccessLog:
    """One JSON line per request: method, path, status, latency and, for classify, model and batch size."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started = time.perf_counter()
        info = scope.setdefault("state", {})
        status = 500

        async def send_status(message):
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        finally:
            record = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime()) + "Z", "method": scope["method"],
                      "path": scope["path"], "status": status,
                      "latency_ms": round(1000 * (time.perf_counter() - started), 2)}
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
                message = ("missing API key: send 'Authorization: Bearer KEY'" if not given
                           else "wrong API key")
                response = error_response(401, "unauthorized", message, {"WWW-Authenticate": "Bearer"})
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


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


# --------------------------------------------------------------------------------------------------
# The app.

def create_app(load: Callable[[], ModelPool], *, api_key: str | None = None, max_chars: int = 4000,
               max_batch: int = 64, max_wait_ms: float = 5.0, default_mode: str = "score",
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The FastAPI app. ``load`` builds the models in a background thread once the server is up.

    ``max_chars``/``max_batch`` bound one text / the texts in one request; ``on_load_error`` is told when
    loading fails (the CLI stops the server then).
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        loop = asyncio.get_running_loop()
        state = app.state

        def loaded(pool: ModelPool, seconds: float) -> None:
            if state.closing:
                return
            state.pool = pool
            state.batcher = MicroBatcher(lambda key, texts: pool.predict(key[0], texts, key[1], progress=count_pass),
                                         pool.batch_size, max_wait_ms / 1000)
            state.batcher.start()
            log.info(json.dumps({"event": "ready", "load_s": round(seconds, 2), "models": list(pool.classifiers),
                                 "batch_size": pool.batch_size}))

        def failed(exc: BaseException) -> None:
            state.load_error = exc
            log.error(json.dumps({"event": "load_failed", "error": str(exc) or type(exc).__name__}))
            if on_load_error is not None:
                on_load_error(exc)

        def count_pass(_n: int) -> None:  # called by the Classifier once per forward pass, in the worker
            state.forward_passes += 1

        def load_in_background() -> None:
            started = time.perf_counter()
            try:
                pool = load()
            except Exception as exc:
                outcome: tuple = (failed, exc)
            else:
                outcome = (loaded, pool, time.perf_counter() - started)
            try:
                loop.call_soon_threadsafe(*outcome)
            except RuntimeError:
                pass  # the server stopped while loading

        # A daemon thread: stopping the server during a long load need not wait for it.
        threading.Thread(target=load_in_background, name="loratune-load", daemon=True).start()
        try:
            yield
        finally:
            state.closing = True
            if state.batcher is not None:
                await state.batcher.stop()  # uvicorn has let in-flight requests finish; this drains the rest

    async def known_query_only(request: Request) -> None:
        # Like extra="forbid" for bodies: a typo such as ?modle=b must not quietly answer for the default model.
        route = request.scope.get("route")
        known = {p.alias for p in route.dependant.query_params} if route is not None else set()
        unknown = sorted(set(request.query_params) - known)
        if unknown:
            raise ApiError(422, "invalid_request", f"unknown query parameter {', '.join(map(repr, unknown))}")

    request_model = classify_request_model(max_chars, max_batch)
    app = FastAPI(title="loratune", version=_version(), lifespan=lifespan,
                  dependencies=[Depends(known_query_only)],
                  description="Classify text with LoRA adapters trained by loratune. Errors are "
                              '`{"error": {"code", "message"}}`.')
    app.state.pool = None
    app.state.batcher = None
    app.state.load_error = None
    app.state.closing = False
    app.state.requests = 0
    app.state.texts = 0
    app.state.forward_passes = 0
    app.state.in_flight = 0

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        status, code, message = _describe(exc.errors())
        return error_response(status, code, message)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException):
        code = getattr(exc, "code", None) or CODES.get(exc.status_code, "error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)

    @app.exception_handler(Exception)
    async def _crash(request: Request, exc: Exception):
        return error_response(500, "internal_error", "the server failed to answer; see its log")

    def ready() -> tuple[ModelPool, MicroBatcher]:
        state = app.state
        if state.closing:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "1"})
        if state.load_error is not None:
            raise ApiError(503, "load_failed", f"the model failed to load: {state.load_error}")
        if state.pool is None:
            raise ApiError(503, "loading", "the model is still loading", {"Retry-After": "1"})
        return state.pool, state.batcher

    def pick(pool: ModelPool, name: str | None) -> str:
        name = pool.default if name is None else name
        if name not in pool.classifiers:
            raise ApiError(404, "model_not_found",
                           f"no model named {name!r}; this server has {', '.join(map(repr, pool.classifiers))}")
        return name

    async def json_body(request: Request) -> None:
        kind = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if kind != "application/json" and not kind.endswith("+json"):
            raise ApiError(415, "unsupported_media_type",
                           f"send the body as JSON with 'Content-Type: application/json' (got {kind or 'none'!r})")

    @app.get("/healthz", response_model=Status, tags=["health"])
    async def healthz():
        """Liveness: the process answers (the model may still be loading)."""
        return Status(status="ok")

    @app.get("/readyz", response_model=Status, responses=_errors(503), tags=["health"])
    async def readyz():
        """Readiness: 200 once the model is loaded and the server takes requests, else 503."""
        ready()
        return Status(status="ready")

    @app.post("/v1/classify", response_model=ClassifyResponse, dependencies=[Depends(json_body)],
              responses=_errors(400, 404, 413, 415, 422, 503), tags=["classify"])
    async def classify(body: request_model, request: Request):
        """Classify one text (`text`) or several (`texts`) with the chosen adapter (`model`)."""
        pool, batcher = ready()
        name = pick(pool, body.model)
        texts = [body.text] if body.text is not None else body.texts
        mode = body.mode or default_mode
        app.state.in_flight += 1
        try:
            predictions, batch_size = await batcher.submit((name, mode), texts)
        except ShuttingDown:
            raise ApiError(503, "shutting_down", "the server is shutting down", {"Retry-After": "1"}) from None
        finally:
            app.state.in_flight -= 1
        app.state.requests += 1
        app.state.texts += len(texts)
        request.state.model, request.state.mode = name, mode
        request.state.texts, request.state.batch_size = len(texts), batch_size
        return ClassifyResponse(model=name, mode=mode, results=[_result(p) for p in predictions])

    @app.get("/v1/models", response_model=ModelsResponse, responses=_errors(503), tags=["models"])
    async def models():
        """The adapters this server answers with, their labels and base model."""
        pool, _ = ready()
        return ModelsResponse(models=[
            ModelInfo(name=name, labels=c.labels, multi_label=c.multi_label,
                      base_model=c.meta.base_model_requested or c.meta.base_model,
                      default=name == pool.default)
            for name, c in pool.classifiers.items()])

    @app.get("/v1/labels", response_model=LabelsResponse, responses=_errors(404, 422, 503), tags=["models"])
    async def labels(model: Annotated[str | None, Query(description="Adapter name; default: the first.")] = None):
        """The label set of one adapter, in prompt order."""
        pool, _ = ready()
        name = pick(pool, model)
        return LabelsResponse(model=name, labels=pool.classifiers[name].labels)

    @app.get("/v1/stats", response_model=Stats, tags=["health"])
    async def stats():
        """Counters since start: requests, texts, micro-batches and forward passes."""
        batcher = app.state.batcher
        return Stats(requests=app.state.requests, texts=app.state.texts,
                     batches=batcher.batches if batcher else 0, forward_passes=app.state.forward_passes,
                     in_flight=app.state.in_flight)

    # Middleware: the last added runs first. Body limit: max_batch texts of max_chars, JSON-escaped (up to
    # 6 bytes per character, as \uXXXX), plus room for the rest of the request.
    app.add_middleware(LimitBody, max_bytes=6 * max_chars * max_batch + 64 * 1024)
    if api_key:
        app.add_middleware(RequireApiKey, api_key=api_key)
        _document_bearer_auth(app)
    app.add_middleware(AccessLog)
    return app


def _result(p: Prediction) -> Classification:
    if p.labels is not None:  # multi-label adapter: every predicted label, probabilities independent
        return Classification(label=p.label, labels=p.labels, scores=p.scores, raw=p.raw)
    return Classification(label=p.label, labels=[] if p.label == INVALID else [p.label], scores=p.scores, raw=p.raw)


def _document_bearer_auth(app: FastAPI) -> None:
    """Declare the bearer key in the OpenAPI schema (the RequireApiKey middleware enforces it)."""
    build = app.openapi

    def openapi() -> dict:
        if app.openapi_schema is None:
            schema = build()
            schema.setdefault("components", {})["securitySchemes"] = {"apiKey": {"type": "http", "scheme": "bearer"}}
            schema["security"] = [{"apiKey": []}]
            refused = {"description": "Missing or wrong API key",
                       "content": {"application/json": {"schema": {"$ref": "#/components/schemas/ErrorBody"}}}}
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
    from . import __version__

    return __version__


# --------------------------------------------------------------------------------------------------
# Running it: the `loratune serve` command.

def run(adapters: Mapping[str, Path], cfg: Config, *, base_model: str | None = None,
        api_key: str | None = None) -> None:
    """Check the adapters, listen on ``cfg.serve.host:port``, load in the background, serve until SIGTERM/SIGINT.

    ``base_model`` overrides the adapters' recorded base model (``--model``). JSON log lines go to stderr.
    """
    import uvicorn

    check_adapters(adapters, base_model)  # metadata only: adapters that cannot share a base fail at once
    s = cfg.serve
    sock = _listen(s.host, s.port)
    log.setLevel(logging.INFO)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(message)s"))
    log.addHandler(handler)
    log.propagate = False

    def load() -> ModelPool:
        return load_pool(adapters, cfg.predict, base_model=base_model)

    def stop(_exc: BaseException) -> None:
        server.should_exit = True

    app = create_app(load, api_key=api_key, max_chars=s.max_chars, max_batch=s.max_batch,
                     max_wait_ms=s.max_wait_ms, default_mode=cfg.predict.mode, on_load_error=stop)
    # On SIGTERM uvicorn stops accepting, lets in-flight requests finish (for at most 30 s), then runs the
    # lifespan shutdown, which drains the batcher.
    server = uvicorn.Server(uvicorn.Config(app, access_log=False, timeout_graceful_shutdown=30, log_level="info"))
    host, port = sock.getsockname()[:2]
    url = f"http://{f'[{host}]' if ':' in host else host}:{port}"
    log.info(json.dumps({"event": "listening", "url": url, "docs": f"{url}/docs",
                         "models": {name: str(path) for name, path in adapters.items()}}))
    if not api_key and s.host not in ("127.0.0.1", "localhost", "::1"):
        print(f"warning: listening on {s.host} without an API key: anyone who reaches this port can use it",
              file=sys.stderr)
    server.run(sockets=[sock])
    if app.state.load_error is not None:
        raise app.state.load_error


def _listen(host: str, port: int) -> socket.socket:
    """Bind before loading anything, so a busy port is a one-line error and port 0 gets a real port."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as exc:
        raise LoratuneError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
