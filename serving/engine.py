"""The version router: which engine serves each model, hot swap (load + warm, switch, drain old, free), request dedup
and the finished-generation cache. It talks to engines only through the contract in serving/engines/base.py."""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

import torch
from cachetools import TTLCache

from textmill.serving import result_cache
from textmill.serving.engines import engine_class
from textmill.serving.engines.base import EngineHealth, EngineSpec, LoadError, ModelEngine, QueueFull, Retired
from textmill.serving.generation import Generation, probe_generation
from textmill.serving.loading import resolve_device
from textmill.serving.precision import DEFAULT_TOLERANCE
from textmill.serving.sampling import SamplingParams
from textmill.system import available_cpus, configure_allocator, release_memory

log = logging.getLogger(__name__)

__all__ = ["Engine", "EngineOptions", "LoadError", "QueueFull", "Retired", "UnknownModel", "resolve_device"]


class UnknownModel(KeyError):
    pass


@dataclass
class EngineOptions:
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    max_prefill_tokens: int = 64
    max_queue: int = 64
    cache_size: int = 256
    cache_ttl: float = 300.0
    cpu_threads: int = 0
    engine: str = "batching"      # a key of serving.engines.ENGINES
    cache_url: str = ""          # '' = node-local LRU; redis://... = shared by the fleet
    precision_tolerance: float = DEFAULT_TOLERANCE  # reduced precision may cost at most this much val loss


def configure_cpu_threads(requested: int) -> int:
    """torch intra-op threads for CPU inference: `requested`, or by default every CPU this process may use
    (`available_cpus`). Returns the number set.

    Measured on the 2-core bench machine (bench/RESULTS.md), serving GPT-2-medium int8 while the event loop streams:
    2 threads beat 1 (44 vs 37 tok/s one stream; 85-111 vs 68-82 tok/s with 8 clients), and with a CPU-bound
    neighbour process both fall alike (14 vs 13 tok/s one stream). Earlier, 2 threads collapsed 7-13x when models were
    loaded on the main thread (see `off_main_thread`), which is why an older default left one core free. A node that
    shares its cores with other work should set `serving.cpu_threads` to its share; more than `available_cpus()` is
    capped there (logged)."""
    available = available_cpus()
    threads = requested or available
    if threads > available:   # 100,000 threads failed thread creation in OpenBLAS and then model loading (segfault)
        log.warning("serving.cpu_threads=%d is more than the %d CPU(s) this process may use; using %d",
                    threads, available, available)
        threads = available
    torch.set_num_threads(threads)
    from .kernels import set_threads

    set_threads(threads)   # the native int8/attention kernels' own pool
    return threads


def off_main_thread(fn: Any, *args: Any) -> Any:
    """`fn(*args)`, run on a helper thread (and waited for) when called on the main thread; directly otherwise.
    Exceptions propagate.

    Why: once the main thread has run a parallel torch op, the engine workers' (other threads') OpenMP parallel
    regions lost most of their speed-up on the 2-core bench machine: a GPT-2-medium int8 prefill took 160 ms on a
    worker thread instead of 85 ms, a batch-8 decode step 60 instead of 40 (libgomp keeps a thread team per calling
    thread; measured in bench/RESULTS.md). `textmill serve` loads its first versions on the main thread before the
    event loop starts, so model loading (the quality check runs forward passes) is kept off it."""
    if threading.current_thread() is not threading.main_thread():
        return fn(*args)
    result: dict[str, Any] = {}

    def run() -> None:
        try:
            result["value"] = fn(*args)
        except BaseException as e:   # handed to the caller, re-raised there
            result["error"] = e

    helper = threading.Thread(target=run, name="textmill-load", daemon=True)
    helper.start()
    helper.join()
    if "error" in result:
        raise result["error"]
    return result["value"]


def load_engine(name: str, version: str, folder: Path, manifest: dict, opts: EngineOptions,
                metrics: Any) -> ModelEngine:
    """Load a verified cache folder with the configured engine and warm it; raises LoadError on any failure."""
    started = time.monotonic()
    spec = EngineSpec(name, version, Path(folder), manifest, device=opts.device, dtype=opts.dtype,
                      max_batch_size=opts.max_batch_size, max_queue=opts.max_queue,
                      max_prefill_tokens=opts.max_prefill_tokens,
                      precision_tolerance=opts.precision_tolerance)
    try:
        engine = engine_class(opts.engine).load(spec, metrics)
        engine.warm_up()
        if metrics is not None and engine.precision_report is not None:
            metrics.set_precision(name, engine.precision_report)
    except LoadError:
        raise
    except Exception as e:  # an engine bug or resource failure while loading keeps the old version serving
        raise LoadError(f"{type(e).__name__}: {e}") from e
    log.info("model %s version %s loaded (%s) and warmed in %.2fs", name, version, engine.stats(),
             time.monotonic() - started)
    return engine


class Engine:
    """Routes sequences to the live engine of each model; identical in-flight sequences share one Generation."""

    def __init__(self, opts: EngineOptions, metrics: Any = None) -> None:
        engine_class(opts.engine)  # an unknown engine name fails here, before anything loads
        self.opts, self.metrics = opts, metrics
        if resolve_device(opts.device).type == "cpu":
            log.info("CPU inference with %d torch thread(s)%s", configure_cpu_threads(opts.cpu_threads),
                     "" if configure_allocator() else " (allocator thresholds unchanged: not glibc)")
        self.live: dict[str, ModelEngine] = {}
        self.failed: dict[str, str] = {}             # model -> "version: reason" of the last failed load
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._inflight: dict[Hashable, Generation] = {}
        self._done = result_cache.from_url(opts.cache_url, opts.cache_size, opts.cache_ttl)

    def worker(self, model: str) -> ModelEngine:
        """The live engine of `model`; UnknownModel when none is loaded."""
        with self._lock:
            if model not in self.live:
                raise UnknownModel(model)
            return self.live[model]

    def models(self) -> dict[str, ModelEngine]:
        with self._lock:
            return dict(self.live)

    def health(self) -> dict[str, EngineHealth]:
        """Each live model's engine health (is its worker alive, when did it last run a forward pass)."""
        return {name: e.health() for name, e in self.models().items()}

    # hot swap
    def swap(self, name: str, version: str, folder: Path, manifest: dict) -> bool:
        """Load + warm `version`, then route new requests to it; the old version finishes its work and is freed.

        Returns False (old version stays) when loading or warm-up fails."""
        with self._swap_lock:  # the start-up fallback and the sync loop may race to swap the same model
            return self._swap(name, version, folder, manifest)

    def _swap(self, name: str, version: str, folder: Path, manifest: dict) -> bool:
        current = self.live.get(name)
        if current is not None and current.version == version:
            return True
        try:
            engine = off_main_thread(load_engine, name, version, folder, manifest, self.opts, self.metrics)
        except LoadError as e:
            release_memory()
            log.error("model %s: version %s failed to load, keeping %s: %s", name, version,
                      current.version if current else "nothing", e)
            self.failed[name] = f"{version}: {e}"
            if self.metrics is not None:
                self.metrics.load_failures.labels(name).inc()
            return False
        release_memory()   # what loading left behind (the fp32 copy, the quality check's activations)
        engine.start()
        with self._lock:
            old, self.live[name] = self.live.get(name), engine
        if self.failed.get(name, "").split(":")[0] <= version:  # ids sort by time: a newer load clears the failure
            self.failed.pop(name, None)
        if self.metrics is not None:
            self.metrics.set_version(name, version, old.version if old else None)
        if old is not None:
            old.close()
            log.info("model %s: switched %s -> %s; draining the old version", name, old.version, version)
        return True

    def close(self) -> None:
        with self._lock:
            engines, self.live = list(self.live.values()), {}
        for e in engines:
            e.close()
        for e in engines:
            e.join(timeout=30)

    # requests
    def submit(self, engine: ModelEngine, prompt: str, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """The Generation for this exact sequence on `engine`'s version: a finished one from the cache (this node's, then
        the fleet's when `cache_url` is set), an identical in-flight one, or a new one queued on the engine (QueueFull
        when its queue is full, Retired after a swap)."""
        model = engine.name
        key = (model, engine.version, tuple(prompt_ids), params)
        with self._lock:
            gen = self._reuse(key)
        if gen is not None:
            return gen

        # network I/O, outside the lock; a result from the fleet arrives finished, so it needs no engine callbacks
        shared = self._done.fetch(key, lambda: Generation(key, model, engine.version, prompt, prompt_ids, params,
                                                          engine.tokenizer))
        with self._lock:
            gen = self._reuse(key)
            if gen is not None:
                return gen
            if shared is not None:
                self._done.remember(shared)
                self._count(model, "shared")
                return shared
            gen = Generation(key, model, engine.version, prompt, prompt_ids, params, engine.tokenizer,
                             on_abandon=self._abandon, on_finish=self._finished)
            engine.submit(gen)  # raises QueueFull before the generation is registered
            self._inflight[key] = gen
        return gen

    def _reuse(self, key: Hashable) -> Generation | None:
        """A finished (local cache) or in-flight generation for `key`; call under self._lock."""
        for kind, gen in (("cache", self._done.get(key)), ("inflight", self._inflight.get(key))):
            if gen is not None and not gen.cancelled:
                self._count(key[0], kind)
                return gen
        return None

    def _count(self, model: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.dedup.labels(model, kind).inc()

    def _finished(self, gen: Generation) -> None:
        with self._lock:
            if self._inflight.get(gen.key) is gen:
                del self._inflight[gen.key]
            complete = gen.error is None and gen.finish_reason in ("stop", "length")
            if complete:
                self._done.remember(gen)
        if complete:
            self._done.share(gen)   # may write to redis: outside the lock

    def _abandon(self, gen: Generation) -> None:
        with self._lock:
            if self._inflight.get(gen.key) is gen:
                del self._inflight[gen.key]
        if self.metrics is not None:
            self.metrics.cancelled.labels(gen.model).inc()

    def probe(self, model: str, timeout: float = 5.0) -> bool:
        """A real one-token forward pass through the model's queue (readiness)."""
        engine = self.worker(model)
        gen = probe_generation(engine)
        try:
            engine.submit(gen)
        except (QueueFull, Retired):
            return False
        return gen.wait(timeout) and gen.error is None
