"""What `/live` checks: every live model's batching thread is running and each device it uses still computes.

A node whose worker thread died (an error that escaped the batch loop) or whose CUDA context is broken (a device-side
assert, an Xid error: every later kernel launch fails) cannot recover by itself; `/live` then answers 503 so the
orchestrator (Kubernetes livenessProbe, Docker HEALTHCHECK, a MIG autohealing check) restarts the process.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

DEVICE_CHECK_TIMEOUT_S = 5.0   # a device op that has not returned by then counts as a hung context


@dataclass
class Liveness:
    """`workers`: model -> {"version", "worker_alive"}; `devices`: device -> "ok" or the error; `alive` is the verdict."""

    workers: dict[str, dict[str, Any]] = field(default_factory=dict)
    devices: dict[str, str] = field(default_factory=dict)

    @property
    def alive(self) -> bool:
        return all(w["worker_alive"] for w in self.workers.values()) and all(v == "ok" for v in self.devices.values())

    def body(self) -> dict[str, Any]:
        return {"status": "ok" if self.alive else "dead", "models": self.workers, "devices": self.devices}


def device_ok(device: torch.device) -> str:
    """Run one tiny kernel on `device` and wait for it: "ok", or the error's one-line text (a broken CUDA context raises
    `RuntimeError: CUDA error: ...` on every launch or synchronize after the fault)."""
    try:
        x = torch.ones(1, device=device)
        value = float((x + x).sum().item())   # .item() synchronizes with the device
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return "ok" if value == 2.0 else f"wrong result {value} from a test kernel"
    except Exception as e:  # any failure here means the device cannot serve
        return f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


def check(engine: Any, metrics: Any = None) -> Liveness:
    """Liveness of `engine`'s live models through the engine contract (`engine.models()` -> {name: ModelEngine}: its
    `health().alive` and the device its `stats()` names); sets `metrics.worker_alive{model}` when given."""
    report = Liveness()
    devices: set[torch.device] = set()
    for name, worker in sorted(engine.models().items()):
        alive = worker.health().alive
        report.workers[name] = {"version": worker.version, "worker_alive": alive}
        if metrics is not None:
            metrics.worker_alive.labels(name).set(1 if alive else 0)
        devices.add(torch.device(worker.stats()["device"]))
    for device in sorted(devices, key=str):
        report.devices[str(device)] = device_ok(device)
    return report
