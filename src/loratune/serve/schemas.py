"""Request, response and error bodies of the HTTP API, and how validation errors are worded."""

import json
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from fastapi import HTTPException
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..predict import INVALID, Prediction

# At least one character that is not whitespace (str.isspace, as data.py's "is empty" check), spelled out so
# that JSON Schema clients, Python and pydantic's Rust regex all read the pattern the same way.
NOT_BLANK = r"[^\t\n\x0b\x0c\r\x1c-\x1f \x85\xa0\u1680\u2000-\u200a\u2028\u2029\u202f\u205f\u3000]"


def classify_request_model(max_chars: int, max_batch: int) -> type[BaseModel]:
    """The body of ``POST /v1/classify``, with this server's limits in its schema, where clients see them.

    ``max_length`` counts characters (code points) after JSON decoding, however the client escaped them.
    """
    one_text = Annotated[str, Field(min_length=1, max_length=max_chars, pattern=NOT_BLANK)]

    class ClassifyRequest(BaseModel):
        model_config = ConfigDict(
            extra="forbid",
            json_schema_extra={
                "oneOf": [{"required": ["text"]}, {"required": ["texts"]}],
                "examples": [
                    {"text": "I was charged twice for my subscription."},
                    {"texts": ["The app crashes on startup.", "Where is my parcel?"], "model": "default"},
                ],
            },
        )

        # Defaults of None keep the fields optional, while an explicit null is refused like any non-string.
        text: one_text = Field(None, description="One text to classify. Give this or `texts`.")
        texts: list[one_text] = Field(None, min_length=1, max_length=max_batch, description="Several texts to classify, answered in order.")
        model: str = Field(None, description="Adapter name (see /v1/models); default: the first one served.")
        mode: Literal["score", "generate"] = Field(
            None,
            description="score: probability of every label; generate: free greedy decoding (label "
            "'invalid' when the output is no label). Default: the server's --mode.",
        )

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
        description="Probability of each label (score mode): they sum to 1, or for a multi-label adapter each is independent."
    )
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
    quantize: str = Field(
        "none", description="none, int8 (the merged model's Linear layers in dynamic int8) or bf16 (the merged model in bfloat16); CPU."
    )


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
    forward_passes: int = Field(description="Model forward passes (score mode: one per batch of up to predict.batch_size texts).")
    in_flight: int = Field(description="Classify requests waiting for their answer now.")
    queued_texts: int = Field(0, description="Texts waiting for a forward pass now (bounded by --max-queue).")
    refused: int = Field(0, description="Classify requests refused with 503 'overloaded' because the queue was full.")
    dropped: int = Field(0, description="Requests dropped before their forward pass: the client left or its deadline passed.")
    model_restarts: int = Field(0, description="Times the model process died and was started again.")


class ErrorDetail(BaseModel):
    code: str
    message: str


class ErrorBody(BaseModel):
    error: ErrorDetail


def error_responses(*statuses: int) -> dict:
    """OpenAPI ``responses`` entries: these statuses answer with an :class:`ErrorBody`."""
    return {status: {"model": ErrorBody} for status in statuses}


class ApiError(HTTPException):
    """An HTTP error with a machine-readable code, rendered as ``{"error": {"code", "message"}}``."""

    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(status, message, headers)
        self.code = code


CODES = {
    400: "bad_request",
    401: "unauthorized",
    404: "not_found",
    405: "method_not_allowed",
    408: "request_timeout",
    413: "too_large",
    415: "unsupported_media_type",
    422: "invalid_request",
    503: "unavailable",
}


class _AsciiJSON(JSONResponse):
    # Error messages may quote client input; ASCII escapes keep even lone surrogates encodable.
    def render(self, content: Any) -> bytes:
        return error_json(content)


def error_json(content: Any) -> bytes:
    return json.dumps(content, ensure_ascii=True, separators=(",", ":")).encode("ascii")


def error_response(status: int, code: str, message: str, headers: Mapping[str, str] | None = None) -> JSONResponse:
    return _AsciiJSON({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


LIMIT_HINTS = {"string_too_long": " (the server's --max-chars)", "too_long": " (the server's --max-batch)"}
PLAIN_MESSAGES = {"string_pattern_mismatch": "text is blank (only whitespace)"}


def describe_validation_errors(errors) -> tuple[int, str, str]:
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


def to_classification(p: Prediction) -> Classification:
    if p.labels is not None:  # multi-label adapter: every predicted label, probabilities independent
        return Classification(label=p.label, labels=p.labels, scores=p.scores, raw=p.raw)
    return Classification(label=p.label, labels=[] if p.label == INVALID else [p.label], scores=p.scores, raw=p.raw)
