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

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from uvicorn.protocols.utils import ClientDisconnected

from serving import playground, protocol
from serving.batcher import ModelWorker, Retired
from serving.engine import Engine, QueueFull, UnknownModel
from serving.generation import Event, Generation
from serving.limits import BodyLimit
from serving.metrics import Metrics
from serving.protocol import VERSION_HEADER, ApiError, CompletionRequest, GenerationFields
from serving.sampling import SamplingParams
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
            merged[-1] = (index, Event("delta", prev.text + event.text, event.tokens))
        else:
            merged.append((index, event))
    return merged


@dataclass
class Job:
    worker: ModelWorker
    gens: list[Generation]
    prompt_tokens: int
    sub: Subscription


def start_job(state: ServingState, model: str, fields: GenerationFields) -> Job:
    """Validate against the model (404, context length), then submit one generation per prompt x n."""
    for _ in range(3):
        try:
            return _submit_job(state, model, fields)
        except Retired:  # a hot swap retired the worker between lookup and submit: the new version takes it
            continue
    raise ApiError(503, f"model {model!r} is being swapped; retry", "server_overloaded", code="swapping",
                   headers={"Retry-After": RETRY_AFTER_S})


def _submit_job(state: ServingState, model: str, fields: GenerationFields) -> Job:
    try:
        worker = state.engine.worker(model)
    except UnknownModel:
        raise ApiError(404, f"The model {model!r} does not exist; served models: {sorted(state.engine.models())}",
                       param="model", code="model_not_found") from None
    # Tokenizing runs on the event loop: refuse what cannot fit before paying for it (natural text averages a few
    # characters per token, so a prompt of more than 64 characters per context token cannot fit), and bound the fan-out.
    if len(fields.prompts()) * fields.n > state.settings.max_queue:
        raise ApiError(400, f"{len(fields.prompts())} prompts x n={fields.n} exceeds this server's queue of "
                       f"{state.settings.max_queue}; send fewer prompts per request", param="prompt",
                       code="too_many_prompts")
    longest = max(len(p) for p in fields.prompts())
    if longest > worker.n_ctx * CHARS_PER_TOKEN_MAX:
        raise ApiError(400, f"This model's maximum context length is {worker.n_ctx} tokens; a prompt of {longest} "
                       f"characters cannot fit. Please reduce the prompt.", param="prompt",
                       code="context_length_exceeded", version=worker.version)
    ids = [worker.encode(p) or [worker.eot_id] for p in fields.prompts()]
    for prompt_ids in ids:
        if len(prompt_ids) + fields.max_tokens > worker.n_ctx:
            raise ApiError(400, f"This model's maximum context length is {worker.n_ctx} tokens. However, you requested "
                           f"{len(prompt_ids) + fields.max_tokens} tokens ({len(prompt_ids)} in the prompt, "
                           f"{fields.max_tokens} for the completion). Please reduce the prompt or max_tokens.",
                           param="max_tokens", code="context_length_exceeded", version=worker.version)
    seed = request_seed(state, fields)
    sub, gens = Subscription(), []
    try:
        for prompt, prompt_ids in zip(fields.prompts(), ids):
            for j in range(fields.n):
                params = SamplingParams(max_tokens=fields.max_tokens, temperature=fields.temperature, top_p=fields.top_p,
                                        top_k=fields.top_k, stop=fields.stops(), seed=seed + j)
                gen = state.engine.submit(worker, prompt, prompt_ids, params)
                sub.attach(len(gens), gen)
                gens.append(gen)
    except QueueFull as e:
        sub.close()
        raise ApiError(429, f"{e}; retry shortly", "rate_limit_exceeded", code="queue_full",
                       headers={"Retry-After": RETRY_AFTER_S}, version=worker.version) from None
    except Retired:
        sub.close()  # the part already submitted to the old version is cancelled (unless shared)
        raise
    return Job(worker, gens, sum(len(i) for i in ids), sub)


def request_seed(state: ServingState, fields: GenerationFields) -> int:
    """The seed of choice 0 (choice j uses seed + j): the request's, else the node's `default_seed`."""
    return state.settings.default_seed if fields.seed is None else fields.seed


def engine_error(event: Event, version: str) -> ApiError:
    err = event.error
    return ApiError(err.status, str(err), err.type, code="out_of_memory" if err.status == 503 else None, version=version)


def create_app(state: ServingState) -> FastAPI:
    app = FastAPI(title="textmill serving", version="1")
    s = state.settings
    app.add_middleware(BodyLimit, max_bytes=s.max_body_bytes, timeout_s=s.body_timeout,
                       on_limit=lambda name: state.metrics.limit_hits.labels(name).inc())
    app.add_middleware(RequestMiddleware, state=state)  # added last = outermost: sees every answer, even a 413
    _exception_handlers(app)
    auth = Depends(api_key_guard(state.settings.api_keys))

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(request: Request):
        body = protocol.parse_request(await request.body(), CompletionRequest)
        job = start_job(state, body.model, body)
        if body.stream:
            return await stream_completion(state, job, body, request)
        return await full_completion(state, job, body, request)

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


async def full_completion(state: ServingState, job: Job, body: CompletionRequest, request: Request) -> JSONResponse:
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
    choices = [protocol.choice(i, g.text, done[i].finish_reason) for i, g in enumerate(job.gens)]
    usage = protocol.usage(job.prompt_tokens, sum(g.tokens for g in job.gens))
    body_json = protocol.completion(protocol.completion_id(), body.model, job.worker.version, choices, usage)
    return JSONResponse(body_json, headers={VERSION_HEADER: job.worker.version})


async def stream_completion(state: ServingState, job: Job, body: CompletionRequest, request: Request):
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
    cid, version = protocol.completion_id(), job.worker.version
    include_usage = bool(body.stream_options and body.stream_options.include_usage)

    def sse(obj: dict) -> str:
        return f"data: {json.dumps(obj)}\n\n"

    async def events():
        pending, finished = [first], 0
        try:
            while finished < len(job.gens):
                pending = pending or [await job.sub.next()]
                out = []
                for index, event in coalesce(pending + job.sub.drain()):
                    if event.kind == "error":
                        yield "".join(out) + sse(engine_error(event, version).body())
                        return
                    finished += event.kind == "done"
                    chunk = protocol.choice(index, event.text, event.finish_reason)
                    out.append(sse(protocol.completion(cid, body.model, version, [chunk], None)))
                pending = []
                yield "".join(out)  # one write for everything that piled up while the client was being served
            if include_usage:
                usage = protocol.usage(job.prompt_tokens, sum(g.tokens for g in job.gens))
                yield sse(protocol.completion(cid, body.model, version, [], usage))
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
    job = start_job(state, model, fields)
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
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        report, ok = {}, not state.draining
        for name in state.expected:
            try:
                worker = state.engine.worker(name)
            except UnknownModel:
                report[name], ok = {"loaded": False}, False
                continue
            fresh = time.monotonic() - worker.last_ok < READY_MAX_AGE_S
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
        return Response(generate_latest(state.metrics.registry), media_type=CONTENT_TYPE_LATEST)


def info_body(state: ServingState) -> dict:
    s = state.settings
    models = {}
    for name, w in sorted(state.engine.models().items()):
        models[name] = {
            "version": w.version, "created": w.manifest.get("created"), "folder": w.folder, "device": str(w.device),
            "dtype": str(next(w.model.parameters()).dtype).replace("torch.", "") if w.model is not None else None,
            "n_ctx": w.n_ctx, "metrics": w.manifest.get("metrics", {}),
            "files": [{k: f[k] for k in ("path", "size", "sha256")} for f in w.manifest.get("files", [])],
            "queue_depth": w.queue_depth,
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

    ENDPOINTS = ("/v1/completions", "/v1/models", "/live", "/ready", "/info", "/metrics")

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
