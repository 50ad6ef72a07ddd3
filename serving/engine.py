"""The generation engine: live model versions, hot swap (load + warm, switch, drain old, free), request dedup and cache."""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Hashable

import torch
from cachetools import TTLCache

from serving import precision
from serving.batcher import ModelWorker, QueueFull, Retired
from serving.generation import Generation
from serving.sampling import SamplingParams

log = logging.getLogger(__name__)

__all__ = ["Engine", "LoadError", "QueueFull", "UnknownModel", "resolve_device", "resolve_dtype"]


class UnknownModel(KeyError):
    pass


class LoadError(Exception):
    """A version could not be loaded or failed its warm-up; the previous version keeps serving."""


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        if device.type != "cuda":
            return torch.float32
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


@dataclass
class EngineOptions:
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    max_queue: int = 64
    cache_size: int = 256
    cache_ttl: float = 300.0
    cpu_threads: int = 0
    precision_tolerance: float = precision.DEFAULT_TOLERANCE


def configure_cpu_threads(requested: int) -> int:
    """torch intra-op threads for CPU inference. By default one core is left to the HTTP event loop: when torch's
    threads take every core, the loop thread (which holds the GIL while it writes a stream chunk) waits for a core and
    the worker waits for the GIL; streaming was >10x slower that way on a 2-core machine."""
    threads = requested or max(1, (os.cpu_count() or 1) - 1)
    torch.set_num_threads(threads)
    return threads


def load_worker(name: str, version: str, folder: Path, manifest: dict, opts: EngineOptions, metrics: Any) -> ModelWorker:
    """Load a verified cache folder and warm it with a real prefill + decode step; raises LoadError on any failure."""
    from transformers import AutoTokenizer

    device = resolve_device(opts.device)
    started = time.monotonic()
    try:
        # The Rust tokenizer underneath: encode (API threads) and decode (worker) share it without locks.
        tok = AutoTokenizer.from_pretrained(folder).backend_tokenizer
        model, chosen = precision.load_model(folder, opts.dtype, device, tok, tolerance=opts.precision_tolerance)
        worker = ModelWorker(name, version, str(folder), model, tok, manifest, max_batch_size=opts.max_batch_size,
                             max_queue=opts.max_queue, metrics=metrics)
        worker.precision = chosen.as_dict()  # shown in /info; see serving/precision.py
        probe = probe_generation(worker, max_tokens=2)
        worker.run_batch([probe])
        if probe.error is not None or probe.finish_reason is None:
            raise LoadError(f"warm-up generation failed: {probe.error}")
        if metrics is not None:
            metrics.set_precision(name, chosen)
    except LoadError:
        raise
    except Exception as e:  # any failure to load (bad weights, bad tokenizer, OOM) keeps the old version serving
        raise LoadError(f"{type(e).__name__}: {e}") from e
    log.info("model %s version %s loaded on %s and warmed in %.2fs", name, version, device, time.monotonic() - started)
    return worker


def probe_generation(worker: ModelWorker, max_tokens: int = 1) -> Generation:
    """A greedy generation from the EOT token: a real forward pass, used for warm-up and readiness."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Generation(("probe", time.monotonic()), worker.name, worker.version, "", [worker.eot_id], params)


class Engine:
    """Routes sequences to the live worker of each model; identical in-flight sequences share one Generation."""

    def __init__(self, opts: EngineOptions, metrics: Any = None) -> None:
        self.opts, self.metrics = opts, metrics
        if resolve_device(opts.device).type == "cpu":
            log.info("CPU inference with %d torch thread(s)", configure_cpu_threads(opts.cpu_threads))
        self.live: dict[str, ModelWorker] = {}
        self.failed: dict[str, str] = {}             # model -> "version: reason" of the last failed load
        self._lock = threading.Lock()
        self._swap_lock = threading.Lock()
        self._inflight: dict[Hashable, Generation] = {}
        self._done: TTLCache = TTLCache(maxsize=max(1, opts.cache_size), ttl=opts.cache_ttl)

    def worker(self, model: str) -> ModelWorker:
        with self._lock:
            if model not in self.live:
                raise UnknownModel(model)
            return self.live[model]

    def models(self) -> dict[str, ModelWorker]:
        with self._lock:
            return dict(self.live)

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
            worker = load_worker(name, version, folder, manifest, self.opts, self.metrics)
        except LoadError as e:
            log.error("model %s: version %s failed to load, keeping %s: %s", name, version,
                      current.version if current else "nothing", e)
            self.failed[name] = f"{version}: {e}"
            if self.metrics is not None:
                self.metrics.load_failures.labels(name).inc()
            return False
        worker.start()
        with self._lock:
            old, self.live[name] = self.live.get(name), worker
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
            workers, self.live = list(self.live.values()), {}
        for w in workers:
            w.close()
        for w in workers:
            w.join(timeout=30)

    # requests
    def submit(self, worker: ModelWorker, prompt: str, prompt_ids: list[int], params: SamplingParams) -> Generation:
        """The Generation for this exact sequence on `worker`'s version: a finished one from the cache, an identical
        in-flight one, or a new one queued on the worker (QueueFull when its queue is full)."""
        model = worker.name
        key = (model, worker.version, tuple(prompt_ids), params)
        with self._lock:
            gen = self._done.get(key)
            kind = "cache"
            if gen is None:
                gen, kind = self._inflight.get(key), "inflight"
            if gen is not None and not gen.cancelled:
                if self.metrics is not None:
                    self.metrics.dedup.labels(model, kind).inc()
                return gen
            gen = Generation(key, model, worker.version, prompt, prompt_ids, params, on_abandon=self._abandon,
                             on_finish=self._finished)
            worker.submit(gen)  # raises QueueFull before the generation is registered
            self._inflight[key] = gen
        return gen

    def _finished(self, gen: Generation) -> None:
        with self._lock:
            if self._inflight.get(gen.key) is gen:
                del self._inflight[gen.key]
            if gen.error is None and gen.finish_reason in ("stop", "length"):
                self._done[gen.key] = gen

    def _abandon(self, gen: Generation) -> None:
        with self._lock:
            if self._inflight.get(gen.key) is gen:
                del self._inflight[gen.key]
        if self.metrics is not None:
            self.metrics.cancelled.labels(gen.model).inc()

    def probe(self, model: str, timeout: float = 5.0) -> bool:
        """A real one-token forward pass through the model's queue (readiness)."""
        worker = self.worker(model)
        gen = probe_generation(worker)
        try:
            worker.submit(gen)
        except (QueueFull, Retired):
            return False
        return gen.wait(timeout) and gen.error is None
