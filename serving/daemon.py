"""`textmill serve`: initial sync + load, then uvicorn with a background sync loop (hot swap) and a SIGTERM drain."""

from __future__ import annotations

import argparse
import dataclasses
import errno
import logging
import random
import signal
import socket
import threading
import time

import uvicorn

from textmill.serving import settings as node_settings
from textmill.serving.app import ServingState, create_app
from textmill.serving.engine import Engine, EngineOptions
from textmill.serving.limits import ConnectionGuard, connection_cap, guarded_protocol, raise_open_files_limit
from textmill.serving.metrics import Metrics
from textmill.serving.sync import Cached, Syncer
from textmill.config import ServingConfig
from textmill.errors import UserError
from textmill.registry import UntrustedData, shown

log = logging.getLogger(__name__)


class LoadFailures:
    """Versions that failed to load or warm up, retried with exponential backoff: the cause is often transient (memory
    while the old version, the new one and running batches are all resident), so a node must not give up for good."""

    def __init__(self, first_s: float = 60.0, max_s: float = 3600.0, clock=time.monotonic) -> None:
        self.first_s, self.max_s, self.clock = first_s, max_s, clock
        self._failures: dict[tuple[str, str], tuple[int, float]] = {}   # (model, version) -> (count, retry at)

    def record(self, model: str, version: str) -> float:
        count, _ = self._failures.get((model, version), (0, 0.0))
        wait = min(self.first_s * 2 ** count, self.max_s)
        self._failures[(model, version)] = (count + 1, self.clock() + wait)
        log.warning("model %s: version %s failed to load (%d time(s)); next try in %.0f s", model, version, count + 1, wait)
        return wait

    def blocked(self, model: str, version: str) -> bool:
        entry = self._failures.get((model, version))
        return entry is not None and self.clock() < entry[1]

BACKOFF_FIRST_S = 1.0        # first retry after a failed sync pass; doubles up to poll_interval
GRACEFUL_CLOSE_S = 5.0
STARTUP_SYNC_WAIT_S = 5.0    # how long start-up waits for the registry before serving from the cache       # after the drain, how long uvicorn waits for lingering connections


class Node:
    """Keeps each model's live version equal to the registry's LATEST (when it loads), from its own thread."""

    def __init__(self, settings: ServingConfig, engine: Engine, syncer: Syncer, metrics: Metrics) -> None:
        self.settings, self.engine, self.syncer, self.metrics = settings, engine, syncer, metrics
        self.expected: list[str] = list(settings.models)
        self._bad = LoadFailures()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._first: threading.Thread | None = None
        self._registry_empty = False

    def models(self) -> tuple[list[str], bool]:
        """(models to serve, whether the registry answered)."""
        if self.settings.models:
            return list(self.settings.models), True
        try:
            valid, hostile = self.syncer.registry.listing()
            for name in hostile:
                log.error("registry %s: folder %s is not a valid model name; ignored", self.settings.root, shown(name))
                self.metrics.sync_rejected.labels("-", "model_name").inc()
            return sorted(set(valid) | set(self.syncer.cached_models())), True
        except Exception as e:  # unreachable bucket: serve what the cache holds and retry later
            log.error("registry %s unreachable (%s: %s); serving cached models", self.settings.root, type(e).__name__, e)
            return self.syncer.cached_models(), False

    def refresh(self, model: str) -> bool:
        """Sync one model and swap to its LATEST when that is new; True when the registry answered without error."""
        try:
            result = self.syncer.sync_model(model)
        except Exception as e:  # unreachable, verification failure, malformed manifest: keep the live version
            log.error("model %s: sync failed, keeping %s: %s: %s", model, self._live(model) or "nothing", type(e).__name__, e)
            self.metrics.sync_failures.labels(model).inc()
            if isinstance(e, UntrustedData):
                self.metrics.sync_rejected.labels(model, e.kind).inc()
            result = None
        target: Cached | None = result.cached if result is not None else None
        if (target is not None or self.syncer.cached(model)) and model not in self.expected:
            self.expected.append(model)
        if target is not None and target.version != self._live(model) and not self._bad.blocked(model, target.version):
            if not self._swap(target):
                self._bad.record(model, target.version)
        if self._live(model) is None:
            self.serve_cached(model)
        live = self._live(model)
        if live is not None:
            self.syncer.prune(model, {live} | ({target.version} if target else set()))
        return result is not None and result.error is None

    def serve_cached(self, model: str) -> None:
        """Nothing live for `model` (bucket unreachable, or its LATEST will not load): load the newest cached version
        that does."""
        for cached in reversed(self.syncer.cached(model)):
            if self._bad.blocked(model, cached.version):
                continue
            if self._swap(cached):
                log.warning("model %s: serving cached version %s", model, cached.version)
                return
            self._bad.record(model, cached.version)

    def _swap(self, cached: Cached) -> bool:
        try:
            manifest = cached.manifest()
        except UntrustedData as e:  # the cached copy was changed on disk after it was verified
            log.error("model %s: cached version %s not loaded: %s", cached.model, cached.version, e)
            self.metrics.sync_rejected.labels(cached.model, e.kind).inc()
            return False
        return self.engine.swap(cached.model, cached.version, cached.folder, manifest)

    def _live(self, model: str) -> str | None:
        worker = self.engine.models().get(model)
        return worker.version if worker else None

    def sync_pass(self) -> bool:
        models, reachable = self.models()
        results = [self.refresh(m) for m in models]
        self._registry_empty = reachable and not models
        return reachable and all(results)

    def initial(self) -> None:
        """First sync pass; if the registry has not answered within STARTUP_SYNC_WAIT_S (gcsfs retries an unreachable
        bucket for ~30 s), serve the newest verified cached versions meanwhile and let that pass finish in the background."""
        first = threading.Thread(target=self._guarded_pass, name="sync-initial", daemon=True)
        first.start()
        first.join(STARTUP_SYNC_WAIT_S)
        if first.is_alive():
            log.warning("registry %s has not answered in %.0fs; serving cached versions while it retries",
                        self.settings.root, STARTUP_SYNC_WAIT_S)
            for model in list(self.settings.models) or self.syncer.cached_models():
                if self.syncer.cached(model) and model not in self.expected:
                    self.expected.append(model)
                if self._live(model) is None:
                    self.serve_cached(model)
        elif self._registry_empty and not self.syncer.cached_models():
            raise UserError(f"{self.settings.root}: no models in the registry and none cached in "
                            f"{self.settings.cache_dir}; publish one (`textmill publish`) or pass the right --root")
        else:
            self.check_requested()
        self._first = first

    def check_requested(self) -> None:
        """After a first pass that finished: a `--models` name that is neither in the registry nor cached is a typo,
        not a model still to come; fail naming it and the models there are. (An unreachable registry proves nothing:
        then the node keeps retrying.)"""
        try:
            unknown, available = self.syncer.unknown([m for m in self.settings.models if self._live(m) is None])
        except Exception as e:  # unreachable now: cannot tell a typo from a model not reachable yet
            log.warning("cannot check --models against %s (%s: %s)", self.settings.root, type(e).__name__, e)
            return
        if unknown:
            raise UserError(f"--models: unknown model(s) {', '.join(unknown)} in {self.settings.root}; available: "
                            f"{', '.join(available) or 'none'}")

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="sync-loop", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def _guarded_pass(self) -> bool:
        try:
            return self.sync_pass()
        except Exception:  # the loop must outlive any one bad pass
            log.exception("sync pass failed")
            return False

    def _loop(self) -> None:
        while self._first is not None and self._first.is_alive() and not self._stop.is_set():
            self._first.join(0.2)
        failures, delay = 0, self._next_delay(0)
        while not self._stop.wait(delay):
            failures = 0 if self._guarded_pass() else failures + 1
            delay = self._next_delay(failures)

    def _next_delay(self, failures: int) -> float:
        poll = self.settings.poll_interval
        if failures:
            return min(poll, BACKOFF_FIRST_S * 2 ** (failures - 1))
        # jitter spreads a fleet's polls so the bucket does not see them all at once
        return poll * random.uniform(1 - self.settings.poll_jitter, 1 + self.settings.poll_jitter)


class DrainingServer(uvicorn.Server):
    """SIGTERM: /ready turns 503 and new requests are refused, in-flight ones finish (up to drain_timeout), exit 0."""

    def __init__(self, config: uvicorn.Config, state: ServingState) -> None:
        super().__init__(config)
        self.state = state

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and not self.state.draining:
            log.info("SIGTERM: draining %d in-flight request(s) (at most %.0fs)", self.state.inflight,
                     self.state.settings.drain_timeout)
            self.state.draining = True
            threading.Thread(target=self._drain, name="drain", daemon=True).start()
            return
        super().handle_exit(sig, frame)

    def _drain(self) -> None:
        deadline = time.monotonic() + self.state.settings.drain_timeout
        while self.state.inflight > 0 and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.state.inflight:
            log.warning("drain timeout: %d request(s) still running are cut off", self.state.inflight)
        self.should_exit = True


def listen_socket(host: str, port: int) -> socket.socket:
    """Bind (not yet listen on) host:port before anything slow starts, so a port in use or a bad host is one line at
    once; uvicorn then serves on this socket (`Server.run(sockets=...)`), leaving no gap for another process."""
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise UserError(f"--host {host}: cannot resolve ({e.strerror}); pass an address such as 127.0.0.1 or 0.0.0.0") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn does: restart while old sockets linger
    try:
        sock.bind(address)
    except OSError as e:
        sock.close()
        hint = ("another process is listening there; stop it or pass --port N" if e.errno == errno.EADDRINUSE else
                "binding below port 1024 needs privileges; pass --port N" if e.errno == errno.EACCES else
                "pass another --host/--port")
        raise UserError(f"cannot listen on {host}:{port}: {e.strerror}; {hint}") from None
    return sock


def with_socket_limits(settings: ServingConfig) -> ServingConfig:
    """Raise the soft open-files limit to the hard one, then lower `max_connections` to what it allows (keeping
    FD_RESERVE descriptors for model files and sync) and `max_websockets` to half of that; logs the values in force."""
    cap = connection_cap(settings.max_connections, raise_open_files_limit())
    settings = dataclasses.replace(settings, max_connections=cap,
                                   max_websockets=min(settings.max_websockets, cap // 2))
    log.info("limits: %d connections, %d WebSockets, %d-byte bodies, header/body/keep-alive/WebSocket-idle timeouts "
             "%g/%g/%g/%g s", settings.max_connections, settings.max_websockets, settings.max_body_bytes,
             settings.header_timeout, settings.body_timeout, settings.keep_alive_timeout, settings.ws_idle_timeout)
    return settings


def uvicorn_config(app, settings: ServingConfig, metrics: Metrics) -> uvicorn.Config:
    """uvicorn with this node's limits: h11 (bounded request heads) extended by serving/limits.py, keep-alive timeout,
    WebSocket message size = the body limit."""
    guard = ConnectionGuard(settings.max_connections, settings.header_timeout,
                            on_limit=lambda name: metrics.limit_hits.labels(name).inc())
    return uvicorn.Config(app, host=settings.host, port=settings.port, lifespan="off", access_log=False,
                          timeout_graceful_shutdown=GRACEFUL_CLOSE_S, log_config=None, http=guarded_protocol(guard),
                          timeout_keep_alive=settings.keep_alive_timeout, ws_max_size=settings.max_body_bytes)


def main(argv: list[str]) -> int:
    """Run a serving node: sync models from the registry, load them, serve the OpenAI-compatible API, hot-swap new
    versions as they are published, drain on SIGTERM (`textmill serve --root URI [--models a,b] [--port N]`)."""
    p = argparse.ArgumentParser(prog="textmill serve", description=main.__doc__)
    node_settings.add_arguments(p, server=True)
    settings = with_socket_limits(node_settings.load(p.parse_args(argv)))
    sock = listen_socket(settings.host, settings.port)  # a port in use: one line, exit 2, before any model loads
    metrics = Metrics()
    engine = Engine(EngineOptions(device=settings.device, dtype=settings.dtype, max_batch_size=settings.max_batch_size,
                                  max_prefill_tokens=settings.max_prefill_tokens,
                                  max_queue=settings.max_queue, cache_size=settings.cache_size,
                                  cache_ttl=settings.cache_ttl, cpu_threads=settings.cpu_threads,
                                  engine=settings.engine, cache_url=settings.cache_url,
                                  precision_tolerance=settings.precision_tolerance), metrics)
    node = Node(settings, engine, Syncer(settings), metrics)
    try:
        node.initial()
    except UserError:  # e.g. an unknown --models name: nothing to serve
        engine.close()
        sock.close()
        raise
    state = ServingState(engine, settings, metrics, expected=node.expected)
    config = uvicorn_config(create_app(state), settings, metrics)
    server = DrainingServer(config, state)
    node.start()
    try:
        server.run(sockets=[sock])
    finally:
        node.stop()
        engine.close()
        sock.close()
    if not server.started:
        raise UserError(f"cannot listen on {settings.host}:{settings.port} (port in use?); pass --port")
    log.info("stopped")
    return 0
