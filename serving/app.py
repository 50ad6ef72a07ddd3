"""The HTTP/WebSocket API (FastAPI): OpenAI-compatible completions, model list, streaming socket, health and metrics.

Every answer names the model version that produced it (header `X-Textmill-Model-Version` and the JSON body). Errors are
OpenAI-shaped (`{"error": {"message", "type", "param", "code"}}`); `ApiError` is the one way handlers report them.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import time
import uuid
from dataclasses import dataclass, field
from datetime import datetime

import orjson
from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.utils import ClientDisconnected

from textmill.serving import chat, liveness, playground, protocol
from textmill.serving.engine import Engine, QueueFull, Retired, UnknownModel
from textmill.serving.engines.base import ModelEngine
from textmill.serving.generation import Event, Generation
from textmill.serving.limits import BodyLimit
from textmill.serving.metrics import Metrics
from textmill.serving.protocol import (VERSION_HEADER, ApiError, ChatRequest, CompletionRequest, GenerationFields, PromptInput,
                              SamplingFields)
from textmill.serving.sampling import SamplingParams
from textmill.config import ServingConfig

log = logging.getLogger(__name__)

READY_MAX_AGE_S = 15.0     # /ready runs its own one-token forward pass when the model has been idle longer than this
DISCONNECT_POLL_S = 0.5
RETRY_AFTER_S = "1"

CHARS_PER_TOKEN_MAX = 64


@dataclass
class ServingState:
    """What the app shares with the daemon: the engine, settings, which models must be live, and drain status."""

    engine: Engine
    settings: ServingConfig
    metrics: Metrics
    expected: list[str] = field(default_factory=list)   # models that must be loaded for /ready
    draining: bool = False
    inflight: int = 0
    websockets: int = 0


class Subscription:
    """Events of several generations (choices) merged into one asyncio queue, fed from the worker thread."""

    def __init__(self) -> None:
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, Event]] = asyncio.Queue()
        self._subs: list[tuple[Generation, object]] = []

    def attach(self, index: int, gen: Generation) -> None:
        def deliver(event: Event) -> None:
            try:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, (index, event))
            except RuntimeError:  # the event loop is closed (server shutting down): nobody is left to tell
                log.debug("dropped an event for a closed event loop")
        gen.subscribe(deliver)
        self._subs.append((gen, deliver))

    async def next(self, request: Request | None = None) -> tuple[int, Event]:
        """Next event; with `request`, raise ClientGone if the HTTP client disconnected while waiting."""
        while True:
            try:
                return await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S if request else None)
            except TimeoutError:
                if await request.is_disconnected():
                    raise ClientGone() from None

    def drain(self) -> list[tuple[int, Event]]:
        """Events already waiting, without blocking."""
        events = []
        while not self.queue.empty():
            events.append(self.queue.get_nowait())
        return events

    def close(self) -> None:
        """Leave every generation; one nobody else waits for is cancelled."""
        for gen, sub in self._subs:
            gen.unsubscribe(sub)
        self._subs = []


class ClientGone(Exception):
    pass


def coalesce(events: list[tuple[int, Event]]) -> list[tuple[int, Event]]:
    """Merge back-to-back text deltas of the same choice, so a slow reader gets fewer, larger stream chunks."""
    merged: list[tuple[int, Event]] = []
    for index, event in events:
        if merged and event.kind == "delta" and merged[-1][0] == index and merged[-1][1].kind == "delta":
            prev = merged[-1][1]
            merged[-1] = (index, Event("delta", prev.text + event.text, event.tokens, steps=prev.steps + event.steps))
        else:
            merged.append((index, event))
    return merged


@dataclass
class Ask:
    """What one request asks of the engine, whatever its route: prompts (text or token ids), sequences per prompt
    (n, or best_of), sampling fields, and whether to score tokens (`logprobs` alternatives; `prompt_logprobs` for echo)."""

    inputs: list[PromptInput]
    per_prompt: int
    fields: SamplingFields
    max_tokens: int
    logprobs: int | None = None
    prompt_logprobs: bool = False


@dataclass
class PromptInfo:
    """One prompt as the model sees it: `ids` (an empty prompt becomes the EOT token), its `text`, and `sent`, how
    many of `ids` the client sent (the last `sent` ids; usage.prompt_tokens counts these)."""

    text: str
    ids: list[int]
    sent: int


@dataclass
class Job:
    worker: ModelEngine
    gens: list[Generation]
    prompts: list[PromptInfo]
    per_prompt: int
    sub: Subscription

    @property
    def prompt_tokens(self) -> int:
        return sum(p.sent for p in self.prompts)

    def prompt_of(self, index: int) -> PromptInfo:
        return self.prompts[index // self.per_prompt]


def completion_ask(fields: GenerationFields) -> Ask:
    """The engine work a completion request (HTTP or WebSocket) asks for; 400 for what GPT-2 cannot do."""
    if fields.suffix:
        raise ApiError(400, "suffix is not supported: GPT-2 generates left to right and was not trained to fill in text "
                       "before a suffix; send the text before the gap as the prompt and leave suffix out",
                       param="suffix", code="unsupported_suffix")
    if fields.max_tokens == 0 and not fields.echo:
        raise ApiError(400, "max_tokens must be at least 1; max_tokens: 0 only scores the prompt and needs echo: true",
                       param="max_tokens", code="invalid_value")
    best_of = fields.best_of or fields.n
    if best_of < fields.n:
        raise ApiError(400, f"best_of ({best_of}) must be at least n ({fields.n})", param="best_of",
                       code="invalid_value")
    if best_of > fields.n and getattr(fields, "stream", False):
        raise ApiError(400, "best_of cannot be used with stream: the best choices are known only at the end",
                       param="best_of", code="invalid_value")
    logprobs = fields.logprobs if fields.logprobs is not None else (0 if best_of > fields.n else None)
    return Ask(fields.prompts(), best_of, fields, fields.max_tokens, logprobs,
               prompt_logprobs=fields.echo and fields.logprobs is not None)


def start_job(state: ServingState, model: str, ask: Ask) -> Job:
    """Validate against the model (404, vocabulary, context length), then submit one generation per prompt x
    `ask.per_prompt`."""
    for _ in range(3):
        try:
            return _submit_job(state, model, ask)
        except Retired:  # a hot swap retired the engine between lookup and submit: the new version takes it
            continue
    raise ApiError(503, f"model {model!r} is being swapped; retry", "server_overloaded", code="swapping",
                   headers={"Retry-After": RETRY_AFTER_S})


def live_engine(state: ServingState, model: str) -> ModelEngine:
    try:
        return state.engine.worker(model)
    except UnknownModel:
        raise ApiError(404, f"The model {model!r} does not exist; served models: {sorted(state.engine.models())}",
                       param="model", code="model_not_found") from None


def _prompt_info(worker: ModelEngine, prompt: PromptInput) -> PromptInfo:
    if isinstance(prompt, str):
        ids = worker.encode(prompt)
        return PromptInfo(prompt, ids or [worker.eot_id], len(ids))
    bad = next((t for t in prompt if t >= worker.vocab_size), None)
    if bad is not None:
        raise ApiError(400, f"prompt token id {bad} is outside this model's vocabulary (ids 0..{worker.vocab_size - 1})",
                       param="prompt", code="invalid_value", version=worker.version)
    return PromptInfo(worker.decode(prompt, skip_special_tokens=False), list(prompt), len(prompt))


def _submit_job(state: ServingState, model: str, ask: Ask) -> Job:
    worker = live_engine(state, model)
    # Tokenizing runs on the event loop: refuse what cannot fit before paying for it (natural text averages a few
    # characters per token, so a prompt of more than 64 characters per context token cannot fit), and bound the fan-out.
    if len(ask.inputs) * ask.per_prompt > state.settings.max_queue:
        raise ApiError(400, f"{len(ask.inputs)} prompts x {ask.per_prompt} sequences each exceeds this server's queue "
                       f"of {state.settings.max_queue}; send fewer prompts per request", param="prompt",
                       code="too_many_prompts")
    longest = max(len(p) for p in ask.inputs)
    if longest > worker.n_ctx * CHARS_PER_TOKEN_MAX:
        raise ApiError(400, f"This model's maximum context length is {worker.n_ctx} tokens; a prompt of {longest} "
                       f"characters cannot fit. Please reduce the prompt.", param="prompt",
                       code="context_length_exceeded", version=worker.version)
    prompts = [_prompt_info(worker, p) for p in ask.inputs]
    for info in prompts:
        if len(info.ids) + ask.max_tokens > worker.n_ctx:
            raise ApiError(400, f"This model's maximum context length is {worker.n_ctx} tokens. However, you requested "
                           f"{len(info.ids) + ask.max_tokens} tokens ({len(info.ids)} in the prompt, "
                           f"{ask.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded", version=worker.version)
    f = ask.fields
    seed = request_seed(state, f)
    sub, gens = Subscription(), []
    try:
        for info in prompts:
            for j in range(ask.per_prompt):
                params = SamplingParams(max_tokens=ask.max_tokens, temperature=f.temperature, top_p=f.top_p,
                                        top_k=f.top_k, stop=f.stops(), seed=seed + j, logprobs=ask.logprobs,
                                        prompt_logprobs=ask.prompt_logprobs)
                gen = state.engine.submit(worker, info.text, info.ids, params)
                sub.attach(len(gens), gen)
                gens.append(gen)
    except QueueFull as e:
        sub.close()
        raise ApiError(429, f"{e}; retry shortly", "rate_limit_exceeded", code="queue_full",
                       headers={"Retry-After": RETRY_AFTER_S}, version=worker.version) from None
    except Retired:
        sub.close()  # the part already submitted to the old version is cancelled (unless shared)
        raise
    return Job(worker, gens, prompts, ask.per_prompt, sub)


def scored_tokens(job: Job, index: int, *, echo: bool) -> list[tuple[int, float | None, tuple]]:
    """(id, logprob, top) for choice `index`: the prompt tokens the client sent (echo; the first has no logprob), then
    the generated ones."""
    gen, out = job.gens[index], []
    if echo:
        info = job.prompt_of(index)
        first = len(info.ids) - info.sent
        for j in range(first, len(info.ids)):
            if j == 0:
                out.append((info.ids[0], None, ()))
            else:
                s = gen.prompt_steps[j - 1]
                out.append((s.token, s.logprob, s.top))
    return out + [(s.token, s.logprob, s.top) for s in gen.steps]


def ranked(job: Job, n: int) -> list[int]:
    """Indices of the choices to return: per prompt, all `n` sequences, or with best_of the `n` with the highest mean
    token logprob."""
    out = []
    for p in range(len(job.prompts)):
        cands = list(range(p * job.per_prompt, (p + 1) * job.per_prompt))
        if job.per_prompt > n:
            cands.sort(key=lambda i: -job.gens[i].cumulative_logprob / max(1, job.gens[i].tokens))
        out.extend(cands[:n])
    return out


def request_seed(state: ServingState, fields: GenerationFields) -> int:
    """The seed of choice 0 (choice j uses seed + j): the request's, else the node's `default_seed`."""
    return state.settings.default_seed if fields.seed is None else fields.seed


def engine_error(event: Event, version: str) -> ApiError:
    err = event.error
    return ApiError(err.status, str(err), err.type, code="out_of_memory" if err.status == 503 else None, version=version)


def create_app(state: ServingState) -> FastAPI:
    # No slash redirects: Starlette's 307 for `/v1/completions/` is not OpenAI-shaped and builds its Location from the
    # client's Host header; such a path is a plain 404 like any unknown route.
    app = FastAPI(title="textmill serving", version="1", redirect_slashes=False)
    s = state.settings
    app.add_middleware(BodyLimit, max_bytes=s.max_body_bytes, timeout_s=s.body_timeout,
                       on_limit=lambda name: state.metrics.limit_hits.labels(name).inc())
    app.add_middleware(RequestMiddleware, state=state)  # added last = outermost: sees every answer, even a 413
    _exception_handlers(app)
    auth = Depends(api_key_guard(state.settings.api_keys))

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(request: Request):
        body = protocol.parse_request(await request.body(), CompletionRequest)
        job = start_job(state, body.model, completion_ask(body))
        fmt = CompletionFormat(body, job)
        if body.stream:
            return await stream_job(state, job, fmt, request)
        return await full_job(state, job, fmt, request)

    @app.post("/v1/chat/completions", dependencies=[auth])
    async def chat_completions(request: Request):
        body = protocol.parse_request(await request.body(), ChatRequest)
        worker = live_engine(state, body.model)
        template = chat.template_for(body.model, worker.chat_template, state.settings.chat_templates)
        prompt = chat.render(template, body.messages, worker, body.model)
        logprobs = (body.top_logprobs or 0) if body.logprobs else None
        limit = body.completion_limit(len(worker.encode(prompt)), worker.n_ctx)
        job = start_job(state, body.model, Ask([prompt], body.n, body, limit, logprobs))
        fmt = ChatFormat(body, job)
        if body.stream:
            return await stream_job(state, job, fmt, request)
        return await full_job(state, job, fmt, request)

    @app.get("/v1/models", dependencies=[auth])
    async def list_models():
        data = [{"id": name, "object": "model", "created": _created_ts(w.manifest), "owned_by": "textmill",
                 "version": w.version} for name, w in sorted(state.engine.models().items())]
        return {"object": "list", "data": data}

    @app.websocket("/v1/stream/{model}")
    async def stream_socket(websocket: WebSocket, model: str):
        await websocket_session(state, websocket, model)

    _health_routes(app, state, auth)
    playground.mount(app, keys_required=bool(state.settings.api_keys))
    return app


def _created_ts(manifest: dict) -> int:
    try:
        return int(datetime.fromisoformat(str(manifest.get("created", "")).replace("Z", "+00:00")).timestamp())
    except ValueError:
        return 0


def _exception_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, e: RequestValidationError):
        first = e.errors()[0]
        if first.get("type") == "json_invalid" or tuple(first.get("loc", ())) == ("body",):
            return protocol.error_response(400, f"request body must be a JSON object (Content-Type: application/json): "
                                           f"{first.get('msg')}", code="invalid_json")
        param = ".".join(str(p) for p in first.get("loc", ()) if p != "body")
        return protocol.error_response(422, f"{param or 'body'}: {first.get('msg')}", param=param or None,
                                       code="invalid_value")

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        """Routing errors (unknown route, wrong method) in the OpenAI shape instead of Starlette's `{"detail"}`."""
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        message = f"{request.method} {request.url.path}: {e.detail}"
        if e.status_code == 404:
            message += f"; routes: {', '.join(RequestMiddleware.ENDPOINTS)}, WS /v1/stream/{{model}}"
        return protocol.error_response(e.status_code, message, code=code, headers=dict(e.headers or {}))


def api_key_guard(keys: list[str]):
    encoded = [k.encode() for k in keys]

    def check(header: str | None) -> bool:
        if not encoded:
            return True
        scheme, _, token = (header or "").partition(" ")
        # compare against every key (no early exit) so timing does not reveal which prefix matched
        matches = [hmac.compare_digest(token.strip().encode(), k) for k in encoded]
        return scheme.lower() == "bearer" and any(matches)

    async def guard(request: Request) -> None:
        if not check(request.headers.get("authorization")):
            raise ApiError(401, "Incorrect or missing API key (send `Authorization: Bearer <key>`)",
                           code="invalid_api_key")
    guard.check = check  # type: ignore[attr-defined]
    return guard


class CompletionFormat:
    """text_completion objects: choices with `text`, OpenAI completions `logprobs`, `echo` of the prompt."""

    obj, prefix = "text_completion", "cmpl"

    def __init__(self, body: CompletionRequest, job: Job) -> None:
        self.body, self.job, self.tok = body, job, job.worker.tokenizer
        self.offsets = [0 if body.echo else len(job.prompt_of(i).text) for i in range(len(job.gens))]

    def final(self, out_index: int, index: int, finish_reason: str | None) -> dict:
        gen, echo = self.job.gens[index], self.body.echo
        text = (self.job.prompt_of(index).text if echo else "") + gen.text
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = protocol.completion_logprobs(self.tok, scored_tokens(self.job, index, echo=echo),
                                                    self.offsets[index])
        return protocol.choice(out_index, text, finish_reason, logprobs)

    def head(self, index: int) -> dict | None:
        """The first chunk of a streamed choice: with echo, the prompt (and its logprobs)."""
        if not self.body.echo:
            return None
        info = self.job.prompt_of(index)
        scored = scored_tokens(self.job, index, echo=True)[:info.sent] if self.body.logprobs is not None else []
        return self._chunk(index, info.text, None, scored)

    def delta(self, index: int, event: Event) -> dict:
        return self._chunk(index, event.text, event.finish_reason, [(s.token, s.logprob, s.top) for s in event.steps])

    def _chunk(self, index: int, text: str, finish_reason: str | None, scored: list) -> dict:
        logprobs = None
        if self.body.logprobs is not None:
            logprobs = protocol.completion_logprobs(self.tok, scored, self.offsets[index])
            if logprobs["tokens"]:
                self.offsets[index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
        return protocol.choice(index, text, finish_reason, logprobs)


class ChatFormat:
    """chat.completion objects: an assistant `message` (stream: `delta`), chat `logprobs`."""

    obj, prefix = "chat.completion", "chatcmpl"

    def __init__(self, body: ChatRequest, job: Job) -> None:
        self.body, self.job, self.tok = body, job, job.worker.tokenizer

    def final(self, out_index: int, index: int, finish_reason: str | None) -> dict:
        gen = self.job.gens[index]
        logprobs = None
        if self.body.logprobs:
            logprobs = protocol.chat_logprobs(self.tok, scored_tokens(self.job, index, echo=False))
        return protocol.chat_choice(out_index, gen.text, finish_reason, logprobs)

    def head(self, index: int) -> dict | None:
        return protocol.chat_delta(index, {"role": "assistant", "content": ""}, None)

    def delta(self, index: int, event: Event) -> dict:
        logprobs = None
        if self.body.logprobs and event.steps:
            logprobs = protocol.chat_logprobs(self.tok, [(s.token, s.logprob, s.top) for s in event.steps])
        return protocol.chat_delta(index, {"content": event.text} if event.text else {}, event.finish_reason, logprobs)


async def full_job(state: ServingState, job: Job, fmt, request: Request) -> JSONResponse:
    started, done, first = time.monotonic(), {}, True
    try:
        while len(done) < len(job.gens):
            index, event = await job.sub.next(request)
            if event.kind == "error":
                raise engine_error(event, job.worker.version)
            if first and event.kind == "delta":
                state.metrics.ttft.labels(job.worker.name).observe(time.monotonic() - started)
                first = False
            if event.kind == "done":
                done[index] = event
    except ClientGone:
        return JSONResponse({"detail": "client disconnected"}, status_code=499)
    finally:
        job.sub.close()

    def respond() -> JSONResponse:
        choices = [fmt.final(out, i, done[i].finish_reason) for out, i in enumerate(ranked(job, fmt.body.n))]
        usage = protocol.usage(job.prompt_tokens, sum(g.tokens for g in job.gens))
        body_json = protocol.completion(protocol.completion_id(fmt.prefix), fmt.body.model, job.worker.version,
                                        choices, usage, fmt.obj)
        return Response(orjson.dumps(body_json), media_type="application/json",
                        headers={VERSION_HEADER: job.worker.version})

    # Off the event loop: with echo and logprobs the body is up to 64 sequences x the context x 21 alternatives, each
    # detokenized, then serialized (megabytes, seconds of CPU for a 1,024-token model) -- time in which /live, every
    # stream and every other request would otherwise stall.
    return await asyncio.to_thread(respond)


async def stream_job(state: ServingState, job: Job, fmt, request: Request):
    """SSE: wait for the first event so an immediate failure (e.g. out of memory) is still a proper HTTP error."""
    started = time.monotonic()
    try:
        first = await job.sub.next(request)
    except ClientGone:
        job.sub.close()
        return Response(status_code=499)
    if first[1].kind == "error":
        job.sub.close()
        raise engine_error(first[1], job.worker.version)
    state.metrics.ttft.labels(job.worker.name).observe(time.monotonic() - started)
    cid, version, model = protocol.completion_id(fmt.prefix), job.worker.version, fmt.body.model
    include_usage = bool(fmt.body.stream_options and fmt.body.stream_options.include_usage)
    obj = fmt.obj + ".chunk" if fmt.obj == "chat.completion" else fmt.obj

    def sse(obj_: dict) -> str:
        return f"data: {json.dumps(obj_)}\n\n"

    async def events():
        pending, finished = [first], 0
        try:
            heads = await asyncio.to_thread(lambda: [h for h in (fmt.head(i) for i in range(len(job.gens))) if h])
            if heads:  # echo's prompt (completions) or the assistant role (chat) before any generated text
                yield "".join(sse(protocol.completion(cid, model, version, [h], None, obj)) for h in heads)
            while finished < len(job.gens):
                pending = pending or [await job.sub.next()]
                out = []
                for index, event in coalesce(pending + job.sub.drain()):
                    if event.kind == "error":
                        yield "".join(out) + sse(engine_error(event, version).body())
                        return
                    finished += event.kind == "done"
                    out.append(sse(protocol.completion(cid, model, version, [fmt.delta(index, event)], None, obj)))
                pending = []
                yield "".join(out)  # one write for everything that piled up while the client was being served
            if include_usage:
                usage = protocol.usage(job.prompt_tokens, sum(g.tokens for g in job.gens))
                yield sse(protocol.completion(cid, model, version, [], usage, obj))
            yield "data: [DONE]\n\n"
        finally:
            job.sub.close()  # also runs when the client disconnects: its generations stop unless shared

    return StreamingResponse(events(), media_type="text/event-stream",
                             headers={VERSION_HEADER: version, "Cache-Control": "no-cache"})


async def websocket_session(state: ServingState, ws: WebSocket, model: str) -> None:
    """One JSON request at a time: updates every `stream_every` tokens, then a final message. Any bad message (binary
    frame, invalid JSON, bad field, an unexpected failure) is answered `{"error": {...}}` and the socket stays usable.
    A wrong key refuses the handshake (HTTP 403); over `max_websockets` the socket is closed 1013; a socket that waits
    longer than `ws_idle_timeout` for its next request is closed 1000."""
    authorization, subprotocol = playground.websocket_credentials(ws)  # browsers send the key as a subprotocol
    if not api_key_guard(state.settings.api_keys).check(authorization):
        await ws.close(code=1008, reason="invalid API key")  # before accept: uvicorn answers the handshake with 403
        return
    await ws.accept(subprotocol=subprotocol)
    if state.websockets >= state.settings.max_websockets:
        state.metrics.limit_hits.labels("max_websockets").inc()
        await _ws_error(ws, ApiError(503, f"this node holds its maximum of {state.settings.max_websockets} WebSockets "
                                     f"(serving.max_websockets); retry shortly", "server_overloaded",
                                     code="too_many_websockets"))
        await ws.close(code=1013, reason="too many WebSockets; retry later")
        return
    state.websockets += 1
    state.metrics.websockets.set(state.websockets)
    try:
        while (raw := await _ws_next_request(state, ws)) is not None:
            started = time.monotonic()
            status = await _ws_answer(state, ws, model, raw)
            state.metrics.requests.labels("/v1/stream", status).inc()
            state.metrics.latency.labels("/v1/stream").observe(time.monotonic() - started)
    except (WebSocketDisconnect, ClientDisconnected):
        return  # the client left; a generation it was waiting for was cancelled on the way out
    finally:
        state.websockets -= 1
        state.metrics.websockets.set(state.websockets)


async def _ws_next_request(state: ServingState, ws: WebSocket) -> str | bytes | None:
    """The next client message (text, or bytes of a binary frame); None when the client left or idled too long."""
    idle = state.settings.ws_idle_timeout
    try:
        message = await asyncio.wait_for(ws.receive(), idle)
    except TimeoutError:
        state.metrics.limit_hits.labels("ws_idle_timeout").inc()
        await ws.close(code=1000, reason=f"idle for {idle:g} s (serving.ws_idle_timeout)")
        return None
    if message["type"] == "websocket.disconnect":
        return None
    return message["text"] if message.get("text") is not None else message.get("bytes") or b""


async def _ws_answer(state: ServingState, ws: WebSocket, model: str, raw: str | bytes) -> str:
    """Serve one message; returns the status it counts as. Errors become `{"error": ...}` messages, never a drop."""
    try:
        if isinstance(raw, bytes):
            raise ApiError(400, "binary frames are not accepted: send the JSON request as a text frame",
                           code="invalid_frame")
        await websocket_generate(state, ws, model, raw)
        return "200"
    except ApiError as e:
        await _ws_error(ws, e)
        return str(e.status)
    except (WebSocketDisconnect, ClientDisconnected):
        raise
    except Exception:
        request_id = new_request_id()
        log.exception("WebSocket /v1/stream/%s request %s failed", model, request_id)
        state.metrics.internal_errors.labels("/v1/stream").inc()
        await _ws_error(ws, internal_error(request_id))
        return "500"


async def _ws_error(ws: WebSocket, e: ApiError) -> None:
    body = e.body()
    body["error"]["status"] = e.status
    await ws.send_json(body)


async def websocket_generate(state: ServingState, ws: WebSocket, model: str, raw: str) -> None:
    if state.draining:
        raise ApiError(503, "server is shutting down; reconnect to another node", "server_overloaded", code="draining")
    fields = protocol.parse_request(raw, GenerationFields, "message")
    if fields.echo or fields.logprobs is not None or (fields.best_of or fields.n) > fields.n:
        raise ApiError(400, "echo, logprobs and best_of are not available on the WebSocket; use POST /v1/completions",
                       param="echo" if fields.echo else "logprobs" if fields.logprobs is not None else "best_of",
                       code="unsupported_on_websocket")
    job = start_job(state, model, completion_ask(fields))
    every, started = state.settings.stream_every, time.monotonic()
    texts, unsent, sent_at, done = [""] * len(job.gens), [""] * len(job.gens), [0] * len(job.gens), {}
    state.inflight += 1
    try:
        while len(done) < len(job.gens):
            index, event = await job.sub.next()
            if event.kind == "error":
                raise engine_error(event, job.worker.version)
            if event.kind == "delta":
                if not texts[index] and not any(texts):
                    state.metrics.ttft.labels(model).observe(time.monotonic() - started)
                texts[index] += event.text
                unsent[index] += event.text
            if unsent[index] and (event.kind == "done" or event.tokens - sent_at[index] >= every):
                await ws.send_json({"type": "update", "index": index, "text": unsent[index], "tokens": event.tokens})
                unsent[index], sent_at[index] = "", event.tokens
            if event.kind == "done":
                done[index] = event
    finally:
        state.inflight -= 1
        job.sub.close()
    choices = [{"index": i, "text": texts[i], "finish_reason": done[i].finish_reason} for i in range(len(job.gens))]
    await ws.send_json({"type": "done", "model": model, "version": job.worker.version, "seed": request_seed(state, fields),
                        "choices": choices,
                        "text": choices[0]["text"], "finish_reason": choices[0]["finish_reason"],
                        "usage": protocol.usage(job.prompt_tokens, sum(g.tokens for g in job.gens))})


def _health_routes(app: FastAPI, state: ServingState, auth) -> None:
    """/live, /ready and /metrics stay open for probes and scrapers (they reveal no paths or keys); /info shows the
    registry URI, cache folders and checksums, so it needs a key when keys are set."""
    @app.get("/live")
    async def live():
        try:
            report = await asyncio.wait_for(asyncio.to_thread(liveness.check, state.engine, state.metrics),
                                            liveness.DEVICE_CHECK_TIMEOUT_S)
        except TimeoutError:
            return JSONResponse({"status": "dead", "error": "device check hung"}, status_code=503)
        return JSONResponse(report.body(), status_code=200 if report.alive else 503)

    @app.get("/ready")
    async def ready():
        report, ok = {}, not state.draining
        for name in state.expected:
            try:
                worker = state.engine.worker(name)
            except UnknownModel:
                report[name], ok = {"loaded": False}, False
                continue
            fresh = time.monotonic() - worker.health().last_ok < READY_MAX_AGE_S
            if not fresh:
                fresh = await asyncio.to_thread(state.engine.probe, name)
            report[name] = {"loaded": True, "version": worker.version, "forward_ok": fresh}
            ok = ok and fresh
        body = {"ready": ok and bool(state.expected), "draining": state.draining, "models": report}
        return JSONResponse(body, status_code=200 if body["ready"] else 503)

    @app.get("/info", dependencies=[auth])
    async def info():
        return info_body(state)

    @app.get("/metrics")
    async def metrics():
        await asyncio.to_thread(liveness.check, state.engine, state.metrics)  # refreshes textmill_worker_alive
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def info_body(state: ServingState) -> dict:
    s = state.settings
    models = {}
    for name, w in sorted(state.engine.models().items()):
        stats = w.stats()
        models[name] = {
            "version": w.version, "created": w.manifest.get("created"), "folder": w.folder, **stats,
            "n_ctx": w.n_ctx, "metrics": w.manifest.get("metrics", {}),
            "files": [{k: f[k] for k in ("path", "size", "sha256")} for f in w.manifest.get("files", [])],
            "chat_template": bool(w.chat_template or name in s.chat_templates),
        }
    return {"models": models, "failed_loads": dict(state.engine.failed), "draining": state.draining,
            "registry": s.root, "limits": {"max_batch_size": s.max_batch_size, "max_queue": s.max_queue,
                                          "max_n": protocol.MAX_N, "stream_every": s.stream_every,
                                          "api_keys_required": bool(s.api_keys),
                                          **{k: getattr(s, k) for k in LIMIT_FIELDS}}}


# the limits of docs/serving.md "Security and limits", shown under /info "limits" with the values in force
LIMIT_FIELDS = ("max_body_bytes", "body_timeout", "header_timeout", "keep_alive_timeout", "max_connections",
                "max_websockets", "ws_idle_timeout")


def new_request_id() -> str:
    return f"req_{uuid.uuid4().hex[:24]}"


def internal_error(request_id: str) -> ApiError:
    return ApiError(500, f"internal server error; request id {request_id} (quote it when reporting: the node's log "
                    f"has the traceback)", "server_error", code="internal_error")


class RequestMiddleware:
    """Pure ASGI (keeps streaming and disconnects intact): gives every HTTP request an id (`x-request-id` header),
    counts requests by status, times them, tracks in-flight /v1 requests for the SIGTERM drain, turns new /v1 requests
    away with 503 once draining, and answers any exception a route lets escape with an OpenAI-shaped 500 carrying the
    request id (traceback logged under that id, `textmill_internal_errors_total` counted) instead of a plain-text 500."""

    ENDPOINTS = ("/v1/completions", "/v1/chat/completions", "/v1/models", "/live", "/ready", "/info", "/metrics")

    def __init__(self, app, state: ServingState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path, request_id = scope["path"], new_request_id()
        endpoint = path if path in self.ENDPOINTS else "other"
        status, started, sent = ["500"], time.monotonic(), [False]

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0], sent[0] = str(message["status"]), True
                message = {**message, "headers": [*message.get("headers", []), (b"x-request-id", request_id.encode())]}
            await send(message)

        tracked = path.startswith("/v1/")
        if self.state.draining and tracked:
            response = protocol.error_response(503, "server is shutting down; retry on another node",
                                               "server_overloaded", code="draining")
            self.state.metrics.requests.labels(endpoint, "503").inc()
            return await response(scope, receive, send_status)
        self.state.inflight += tracked
        self.state.metrics.inflight.set(self.state.inflight)
        try:
            await self.app(scope, receive, send_status)
        except ApiError as e:  # raised outside a route's handlers (e.g. while reading the body for one)
            if not sent[0]:
                await e.response()(scope, receive, send_status)
        except (ClientDisconnect, ClientDisconnected):  # the client left mid-request (or was closed by a limit)
            status[0] = "499"
        except Exception:
            log.exception("%s %s request %s failed", scope.get("method"), path, request_id)
            self.state.metrics.internal_errors.labels(endpoint).inc()
            if not sent[0]:  # nothing sent yet; otherwise the half-sent response is cut and uvicorn closes
                await internal_error(request_id).response()(scope, receive, send_status)
        finally:
            self.state.inflight -= tracked
            self.state.metrics.inflight.set(self.state.inflight)
            self.state.metrics.requests.labels(endpoint, status[0]).inc()
            self.state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
