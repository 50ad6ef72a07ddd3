"""Wire formats: OpenAI-compatible completion requests/responses and OpenAI-shaped errors."""

from __future__ import annotations

import time
import uuid
from typing import Any, Optional, TypeVar, Union

import orjson
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator

VERSION_HEADER = "X-Textmill-Model-Version"
MAX_N = 16
MAX_SEED = 2**63 - 1 - MAX_N  # torch.Generator.manual_seed takes an int64


class StreamOptions(BaseModel):
    include_usage: bool = False


class GenerationFields(BaseModel):
    """What a client may ask of one generation (shared by /v1/completions and the WebSocket)."""

    model_config = ConfigDict(extra="ignore")

    prompt: Union[str, list[str]]
    max_tokens: int = Field(16, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: Optional[Union[str, list[str]]] = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)  # torch seeds are int64; choice j of n uses seed + j
    n: int = Field(1, ge=1, le=MAX_N)
    # OpenAI fields this server does not implement: accepted only at their "off" value, never silently ignored
    echo: bool = False
    logprobs: Optional[int] = None
    best_of: Optional[int] = None
    suffix: Optional[str] = None
    logit_bias: Optional[dict[str, float]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("echo", "logprobs", "best_of", "suffix", "logit_bias", "presence_penalty", "frequency_penalty")
    @classmethod
    def _unsupported(cls, v, info):
        if v not in (None, False, 0, {}) and not (info.field_name == "best_of" and v == 1):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    @field_validator("prompt")
    @classmethod
    def _prompt_not_empty(cls, v):
        if isinstance(v, list) and not v:
            raise ValueError("prompt list must not be empty")
        return v

    @field_validator("stop")
    @classmethod
    def _stop_list(cls, v):
        if isinstance(v, list) and len(v) > 4:
            raise ValueError("at most 4 stop sequences")
        return v

    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else list(self.prompt)

    def stops(self) -> tuple[str, ...]:
        if self.stop is None:
            return ()
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop)


class CompletionRequest(GenerationFields):
    model: str
    stream: bool = False
    stream_options: Optional[StreamOptions] = None


Request = TypeVar("Request", bound=BaseModel)


def parse_request(raw: bytes | str, model: type[Request], what: str = "request body") -> Request:
    """The one decoder of client JSON, for HTTP bodies and WebSocket messages alike: bytes (UTF-8) or text -> `model`.

    orjson refuses, with its position, what would otherwise crash later or deep inside: invalid UTF-8, lone UTF-16
    surrogates (`"\\ud800"`, which no tokenizer or UTF-8 encoder takes), nesting deeper than 1,024 levels (Python's
    `json` recurses until RecursionError), integers too large for a double (Python's `json` spends quadratic time on a
    long digit string, then refuses over 4,300 digits), NaN/Infinity. Raises ApiError 400 `invalid_json` for those and
    for a value that is not an object, 422 `invalid_value` naming the first bad field.
    """
    try:
        data = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        hint = " (lone UTF-16 surrogates are not text: send valid Unicode)" if "surrogate" in str(e) else ""
        raise ApiError(400, f"{what} is not valid JSON: {e}{hint}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise ApiError(400, f"{what} must be a JSON object, not {type(data).__name__}", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(422, f"{param or what}: {first.get('msg')}", param=param or None, code="invalid_value") from None


def error_body(message: str, type_: str, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


def error_response(status: int, message: str, type_: str = "invalid_request_error", *, param: str | None = None,
                   code: str | None = None, version: str | None = None,
                   headers: dict[str, str] | None = None) -> JSONResponse:
    headers = dict(headers or {})
    if version:
        headers[VERSION_HEADER] = version
    return JSONResponse(error_body(message, type_, param, code), status_code=status, headers=headers)


class ApiError(Exception):
    """Raised by handlers; turned into an OpenAI-shaped error response by one exception handler."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", *, param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None, version: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers, self.version = headers or {}, version

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.type, self.param, self.code)

    def response(self) -> JSONResponse:
        return error_response(self.status, self.message, self.type, param=self.param, code=self.code,
                              version=self.version, headers=self.headers)


def completion_id() -> str:
    return f"cmpl-{uuid.uuid4().hex}"


def completion(cid: str, model: str, version: str, choices: list[dict], usage: dict | None) -> dict[str, Any]:
    body = {"id": cid, "object": "text_completion", "created": int(time.time()), "model": model,
            "system_fingerprint": version, "model_version": version, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
