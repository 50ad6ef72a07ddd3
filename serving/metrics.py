"""Prometheus metrics of one serving process (own registry), plus GPU memory/utilisation read at scrape time via NVML."""

from __future__ import annotations

import logging

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily

log = logging.getLogger(__name__)

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)


class GpuCollector:
    """Memory from torch's allocator and utilisation from NVML, per visible GPU; registered only when CUDA is present."""

    def __init__(self) -> None:
        import pynvml  # nvidia-ml-py: only imported on GPU hosts

        pynvml.nvmlInit()
        self.nvml = pynvml

    def collect(self):
        import torch

        mem = GaugeMetricFamily("textmill_gpu_memory_bytes", "GPU memory", labels=["gpu", "kind"])
        util = GaugeMetricFamily("textmill_gpu_utilization_ratio", "GPU utilisation (NVML, 0-1)", labels=["gpu"])
        for i in range(torch.cuda.device_count()):
            handle = self.nvml.nvmlDeviceGetHandleByIndex(i)
            info = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            mem.add_metric([str(i), "allocated"], torch.cuda.memory_allocated(i))
            mem.add_metric([str(i), "reserved"], torch.cuda.memory_reserved(i))
            mem.add_metric([str(i), "used"], info.used)
            mem.add_metric([str(i), "total"], info.total)
            util.add_metric([str(i)], self.nvml.nvmlDeviceGetUtilizationRates(handle).gpu / 100.0)
        yield mem
        yield util


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self.requests = Counter("textmill_requests", "HTTP/WebSocket requests by outcome", ["endpoint", "status"], registry=r)
        self.latency = Histogram("textmill_request_seconds", "request latency", ["endpoint"], buckets=LATENCY_BUCKETS,
                                 registry=r)
        self.ttft = Histogram("textmill_time_to_first_token_seconds", "time to first token", ["model"],
                              buckets=LATENCY_BUCKETS, registry=r)
        self.tokens = Counter("textmill_tokens_generated", "tokens generated", ["model"], registry=r)
        self.queue_depth = Gauge("textmill_queue_depth", "sequences waiting for a batch", ["model"], registry=r)
        self.inflight = Gauge("textmill_inflight_requests", "requests being served", registry=r)
        self.batch_size = Histogram("textmill_batch_size", "sequences per decode step", ["model"],
                                    buckets=(1, 2, 4, 8, 16, 32, 64), registry=r)
        self.batch_seconds = Histogram("textmill_batch_seconds", "time from a batch's start until its last sequence ended", ["model"],
                                       buckets=LATENCY_BUCKETS, registry=r)
        self.model_version = Gauge("textmill_model_version_info", "1 for the live version of each model",
                                   ["model", "version"], registry=r)
        self.load_failures = Counter("textmill_model_load_failures", "versions that failed to load or warm up", ["model"],
                                     registry=r)
        self.sync_failures = Counter("textmill_sync_failures", "sync passes that failed (unreachable, verification)",
                                     ["model"], registry=r)
        self.sync_rejected = Counter("textmill_sync_rejected", "values read from the registry that were refused as "
                                     "untrusted (bad model name, LATEST, version id, manifest, file path, symlink); the "
                                     "live version keeps serving", ["model", "kind"], registry=r)
        self.dedup = Counter("textmill_dedup_hits", "requests answered by an identical in-flight or cached generation",
                             ["model", "kind"], registry=r)
        self.cancelled = Counter("textmill_cancelled", "generations cancelled because every client left", ["model"],
                                 registry=r)
        self.worker_alive = Gauge("textmill_worker_alive", "1 while the live version's batching thread runs (0: /live fails)",
                                  ["model"], registry=r)
        self.precision = Gauge("textmill_model_precision_info", "1 for the precision each model's live version runs in",
                               ["model", "precision", "requested"], registry=r)
        self.precision_loss_delta = Gauge("textmill_model_precision_loss_delta", "relative validation-loss change of "
                                          "the chosen precision versus fp32 (0.001 = +0.1 %)", ["model"], registry=r)
        self._precision_labels: dict[str, tuple[str, str, str]] = {}
        self.oom_total = Counter("textmill_out_of_memory", "batches that ran out of memory", ["model"], registry=r)
        self.internal_errors = Counter("textmill_internal_errors", "unexpected exceptions answered with a 500 "
                                       "(traceback logged with the request id)", ["endpoint"], registry=r)
        self.limit_hits = Counter("textmill_limit_hits", "requests or sockets refused or closed by a limit of "
                                  "docs/serving.md 'Security and limits'", ["limit"], registry=r)
        self.websockets = Gauge("textmill_websockets_open", "open WebSocket sessions", registry=r)
        self._register_gpu()

    def _register_gpu(self) -> None:
        import torch

        if not torch.cuda.is_available():
            return
        try:
            self.registry.register(GpuCollector())
        except Exception as e:  # no NVML library/driver in the image: keep serving, say why GPU gauges are absent
            log.warning("GPU metrics disabled (NVML unavailable): %s", e)

    def set_version(self, model: str, version: str, old: str | None) -> None:
        if old is not None:
            try:
                self.model_version.remove(model, old)
            except KeyError:
                pass  # never set (first load after a failed one)
        self.model_version.labels(model, version).set(1)

    def set_precision(self, model: str, report) -> None:
        """Gauges for the precision a model's new live version chose (a `serving.precision.PrecisionReport`)."""
        old = self._precision_labels.pop(model, None)
        if old is not None:  # the previous version's choice
            self.precision.remove(*old)
        self._precision_labels[model] = (model, report.chosen, report.requested)
        self.precision.labels(model, report.chosen, report.requested).set(1)
        self.precision_loss_delta.labels(model).set(report.loss_delta if report.loss_delta is not None else float("nan"))
