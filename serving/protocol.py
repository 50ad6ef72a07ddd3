"""Wire formats: OpenAI-compatible completion and chat requests/responses, logprobs, and OpenAI-shaped errors.

Every optional field accepts `null` as "use the default" (clients built on LangChain or LiteLLM send nulls). Fields
whose JSON type may vary (`prompt`, `stop`, a message's `content`) are checked by hand so that an error names the field
as the client wrote it, never a validator's internal branch.
"""

from __future__ import annotations

import time
import uuid
from functools import lru_cache
from typing import Any, Optional, TypeVar, Union

import orjson
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

VERSION_HEADER = "X-Textmill-Model-Version"
MAX_N = 16
MAX_LOGPROBS = 20          # top alternatives per token (OpenAI allows 5 on completions, 20 on chat; vLLM 20)
MAX_STOP = 4
MAX_SEED = 2**63 - 1 - MAX_N  # torch.Generator.manual_seed takes an int64

PROMPT_FORMS = ("prompt must be a string, a list of strings, a list of token ids (integers >= 0), or a list of "
                "non-empty lists of token ids")

PromptInput = Union[str, list[int]]


class NullMeansDefault(BaseModel):
    """A request model where `"field": null` means the field's default (the field is dropped before validation)."""

    # strict: a JSON `true` is not the number 1, `"true"`/`"yes"` are not booleans and `2.5` is not an integer (lax
    # pydantic turned `"max_tokens": true` into 1 and `"stream": "no"` into False); an integer is still a valid float
    model_config = ConfigDict(extra="ignore", strict=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            return {k: v for k, v in data.items()
                    if v is not None or (k in cls.model_fields and cls.model_fields[k].is_required())}
        return data


class StreamOptions(NullMeansDefault):
    include_usage: bool = False


def _is_token_id(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def parse_prompt(value: Any) -> list[PromptInput]:
    """OpenAI's four prompt forms -> a list of prompts, each a string or a list of token ids; ValueError otherwise."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(x, str) for x in value):
            return list(value)
        if all(_is_token_id(x) for x in value):
            return [list(value)]
        if all(isinstance(x, list) and x and all(_is_token_id(t) for t in x) for x in value):
            return [list(x) for x in value]
    if isinstance(value, list) and not value:
        raise ValueError("prompt must not be an empty list")
    raise ValueError(PROMPT_FORMS)


def parse_stop(value: Any) -> tuple[str, ...]:
    """`stop`: a string or a list of at most 4 strings -> a tuple (empty strings dropped)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,) if value else ()
    if isinstance(value, list) and all(isinstance(s, str) for s in value):
        if len(value) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences")
        return tuple(s for s in value if s)
    raise ValueError(f"stop must be a string or a list of at most {MAX_STOP} strings")


class SamplingFields(NullMeansDefault):
    """Sampling fields shared by /v1/completions, /v1/chat/completions and the WebSocket."""

    max_tokens: int = Field(16, ge=0)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0)
    stop: Any = None
    seed: Optional[int] = Field(None, ge=0, le=MAX_SEED)  # torch seeds are int64; choice j of n uses seed + j
    n: int = Field(1, ge=1, le=MAX_N)
    user: Optional[str] = None          # accepted for compatibility; not used
    # OpenAI fields this server does not implement: accepted only at their "off" value, never silently ignored
    logit_bias: Optional[dict[str, float]] = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0

    @field_validator("logit_bias", "presence_penalty", "frequency_penalty")
    @classmethod
    def _unsupported(cls, v, info):
        if v not in (None, 0, {}):
            raise ValueError(f"{info.field_name} is not supported by this server")
        return v

    @field_validator("stop")
    @classmethod
    def _stop(cls, v):
        parse_stop(v)
        return v

    def stops(self) -> tuple[str, ...]:
        return parse_stop(self.stop)


class GenerationFields(SamplingFields):
    """What a client may ask of a completion (shared by /v1/completions and the WebSocket)."""

    prompt: Any = Field(...)
    echo: bool = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    best_of: Optional[int] = Field(None, ge=1, le=MAX_N)
    suffix: Optional[str] = None

    @field_validator("prompt", mode="before")
    @classmethod
    def _prompt(cls, v):
        if v is None:
            raise ValueError("prompt is required")
        parse_prompt(v)
        return v

    def prompts(self) -> list[PromptInput]:
        """Each prompt as a string or a list of token ids."""
        return parse_prompt(self.prompt)


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
    if isinstance(raw, (bytes, bytearray)):
        try:  # orjson reports invalid UTF-8 as "surrogates not allowed", which sent clients looking for \ud800 escapes
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            raise ApiError(400, f"{what} is not valid UTF-8 (byte {raw[e.start]:#04x} at offset {e.start}); send "
                           "UTF-8 encoded JSON", code="invalid_json") from None
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


class ChatMessage(NullMeansDefault):
    role: str
    content: Any = ""

    @field_validator("content")
    @classmethod
    def _content(cls, v):
        message_text(v)
        return v


def message_text(content: Any) -> str:
    """A message's `content`: a string, or a list of `{"type": "text", "text": ...}` parts (joined)."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str)
                                         for p in content):
        return "".join(p["text"] for p in content)
    raise ValueError("content must be a string or a list of {\"type\": \"text\", \"text\": ...} parts "
                     "(this model reads text only)")


class ChatRequest(SamplingFields):
    model: str
    messages: list[ChatMessage] = Field(..., min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)             # chat default: the rest of the context window
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_LOGPROBS)
    stream: bool = False
    stream_options: Optional[StreamOptions] = None

    def completion_limit(self, prompt_tokens: int, n_ctx: int) -> int:
        """`max_completion_tokens` (the newer name) wins over `max_tokens`; with neither, what is left of the context
        window after the prompt (OpenAI's and vLLM's chat default), at least 1."""
        limit = self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens
        return limit if limit is not None else max(1, n_ctx - prompt_tokens)


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


def completion_id(prefix: str = "cmpl") -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def completion(cid: str, model: str, version: str, choices: list[dict], usage: dict | None,
               obj: str = "text_completion") -> dict[str, Any]:
    body = {"id": cid, "object": obj, "created": int(time.time()), "model": model,
            "system_fingerprint": version, "model_version": version, "choices": choices}
    if usage is not None:
        body["usage"] = usage
    return body


def choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": logprobs, "finish_reason": finish_reason}


def chat_choice(index: int, text: str, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs,
            "finish_reason": finish_reason}


def chat_delta(index: int, delta: dict, finish_reason: str | None, logprobs: dict | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


# logprobs
@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's byte-level alphabet back to bytes (inverse of openai/gpt-2 encoder.py `bytes_to_unicode`)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def token_text(tokenizer: Any, token: int) -> str:
    """A single token as text, as OpenAI shows it: special tokens kept (`<|endoftext|>`); a token that is not whole
    UTF-8 on its own (part of a multi-byte character) as `bytes:\\xNN...`, so distinct tokens stay distinct keys."""
    text = tokenizer.decode([token], skip_special_tokens=False)
    if "\ufffd" in text:
        piece, table = tokenizer.id_to_token(token) or "", _byte_decoder()
        if piece and all(c in table for c in piece):
            raw = bytes(table[c] for c in piece)
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                return "bytes:" + "".join(f"\\x{b:02x}" for b in raw)
    return text


def completion_logprobs(tokenizer: Any, scored: list[tuple[int, float | None, tuple]], start_offset: int) -> dict:
    """OpenAI's completions `logprobs` object for tokens `scored` = [(id, logprob or None, top (id, logprob) pairs)]:
    `tokens`, `token_logprobs`, `top_logprobs` (the top alternatives plus the chosen token, as {text: logprob}; None
    where there is no logprob, i.e. the first prompt token) and `text_offset` (character offset of each token, counted
    from `start_offset`, by the length of each token's own text, as vLLM does)."""
    tokens, token_logprobs, top_logprobs, offsets = [], [], [], []
    offset = start_offset
    for token, logprob, top in scored:
        text = token_text(tokenizer, token)
        tokens.append(text)
        token_logprobs.append(logprob)
        if logprob is None:
            top_logprobs.append(None)
        else:
            entry: dict[str, float] = {}
            for tid, lp in top:
                entry.setdefault(token_text(tokenizer, tid), lp)
            entry.setdefault(text, logprob)
            top_logprobs.append(entry)
        offsets.append(offset)
        offset += len(text)
    return {"tokens": tokens, "token_logprobs": token_logprobs, "top_logprobs": top_logprobs, "text_offset": offsets}


def chat_logprobs(tokenizer: Any, scored: list[tuple[int, float | None, tuple]]) -> dict:
    """OpenAI's chat `logprobs` object: `{"content": [{token, logprob, bytes, top_logprobs: [{token, logprob,
    bytes}]}]}` (the top list holds the `top_logprobs` most likely alternatives)."""
    def entry(token: int, logprob: float) -> dict:
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": logprob, "bytes": list(text.encode("utf-8"))}

    return {"content": [{**entry(t, lp if lp is not None else 0.0), "top_logprobs": [entry(i, v) for i, v in top]}
                        for t, lp, top in scored]}
