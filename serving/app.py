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
from dataclasses import dataclass, field
from datetime import datetime

from fastapi import Depends, FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from pydantic import ValidationError
from uvicorn.protocols.utils import ClientDisconnected

from serving import protocol
from serving.batcher import ModelWorker, Retired
from serving.engine import Engine, QueueFull, UnknownModel
from serving.generation import Event, Generation
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
    seed = state.settings.default_seed if fields.seed is None else fields.seed
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


def engine_error(event: Event, version: str) -> ApiError:
    err = event.error
    return ApiError(err.status, str(err), err.type, code="out_of_memory" if err.status == 503 else None, version=version)


def create_app(state: ServingState) -> FastAPI:
    app = FastAPI(title="textmill serving", version="1")
    app.add_middleware(RequestMiddleware, state=state)
    _exception_handlers(app)
    auth = Depends(api_key_guard(state.settings.api_keys))

    @app.post("/v1/completions", dependencies=[auth])
    async def completions(body: CompletionRequest, request: Request):
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

    _health_routes(app, state)
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
    """One JSON request at a time: updates every `stream_every` tokens, then a final message; errors keep the socket."""
    if not api_key_guard(state.settings.api_keys).check(ws.headers.get("authorization")):
        await ws.close(code=1008, reason="invalid API key")
        return
    await ws.accept()
    try:
        while True:
            raw = await ws.receive_text()
            started = time.monotonic()
            status = "200"
            try:
                await websocket_generate(state, ws, model, raw)
            except ApiError as e:
                status = str(e.status)
                body = e.body()
                body["error"]["status"] = e.status
                await ws.send_json(body)
            state.metrics.requests.labels("/v1/stream", status).inc()
            state.metrics.latency.labels("/v1/stream").observe(time.monotonic() - started)
    except (WebSocketDisconnect, ClientDisconnected):
        return  # the client left; a generation it was waiting for was cancelled on the way out


async def websocket_generate(state: ServingState, ws: WebSocket, model: str, raw: str) -> None:
    if state.draining:
        raise ApiError(503, "server is shutting down; reconnect to another node", "server_overloaded", code="draining")
    try:
        fields = GenerationFields.model_validate(json.loads(raw))
    except json.JSONDecodeError as e:
        raise ApiError(400, f"message is not valid JSON: {e}", code="invalid_json") from None
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ()))
        raise ApiError(422, f"{param}: {first.get('msg')}", param=param, code="invalid_value") from None
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
    await ws.send_json({"type": "done", "model": model, "version": job.worker.version, "choices": choices,
                        "text": choices[0]["text"], "finish_reason": choices[0]["finish_reason"],
                        "usage": protocol.usage(job.prompt_tokens, sum(g.tokens for g in job.gens))})


def _health_routes(app: FastAPI, state: ServingState) -> None:
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

    @app.get("/info")
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
            "n_ctx": w.n_ctx, "metrics": w.manifest.get("metrics", {}), "precision": getattr(w, "precision", None),
            "files": [{k: f[k] for k in ("path", "size", "sha256")} for f in w.manifest.get("files", [])],
            "queue_depth": w.queue_depth,
        }
    return {"models": models, "failed_loads": dict(state.engine.failed), "draining": state.draining,
            "registry": s.root, "limits": {"max_batch_size": s.max_batch_size, "max_queue": s.max_queue,
                                          "max_n": protocol.MAX_N, "stream_every": s.stream_every,
                                          "api_keys_required": bool(s.api_keys)}}


class RequestMiddleware:
    """Pure ASGI (keeps streaming and disconnects intact): counts requests by status, times them, tracks in-flight
    /v1 requests for the SIGTERM drain, and turns new /v1 requests away with 503 once draining."""

    ENDPOINTS = ("/v1/completions", "/v1/models", "/live", "/ready", "/info", "/metrics")

    def __init__(self, app, state: ServingState) -> None:
        self.app, self.state = app, state

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        endpoint = path if path in self.ENDPOINTS else "other"
        if self.state.draining and path.startswith("/v1/"):
            response = protocol.error_response(503, "server is shutting down; retry on another node",
                                               "server_overloaded", code="draining")
            self.state.metrics.requests.labels(endpoint, "503").inc()
            return await response(scope, receive, send)
        status, started = ["500"], time.monotonic()

        async def send_status(message):
            if message["type"] == "http.response.start":
                status[0] = str(message["status"])
            await send(message)

        tracked = path.startswith("/v1/")
        self.state.inflight += tracked
        self.state.metrics.inflight.set(self.state.inflight)
        try:
            await self.app(scope, receive, send_status)
        finally:
            self.state.inflight -= tracked
            self.state.metrics.inflight.set(self.state.inflight)
            self.state.metrics.requests.labels(endpoint, status[0]).inc()
            self.state.metrics.latency.labels(endpoint).observe(time.monotonic() - started)
