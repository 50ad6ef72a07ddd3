"""An honest /live: 200 while every live model's batching thread runs and its device computes, 503 (and the
`textmill_worker_alive` gauge at 0) once a worker thread died, so an orchestrator restarts the node.

The app runs under real uvicorn on 127.0.0.1 in this process, so the test can reach the engine's worker thread and end
it the two ways a thread really ends: an exception the batch loop does not catch (SystemExit delivered into the thread)
and the loop returning while the worker is still the live one.
"""

from __future__ import annotations

import ctypes
import threading
import time

import httpx
import pytest
import torch
import uvicorn

from textmill.serving import liveness
from textmill.serving.app import ServingState, create_app
from textmill.serving.engine import Engine, EngineOptions
from textmill.serving.metrics import Metrics
from textmill.config import ServingConfig
from tests.fixtures.server import free_port

MODEL = "tiny"


@pytest.fixture
def node(tiny_export):
    """Engine with the tiny model live, behind the real app under uvicorn in a background thread."""
    metrics = Metrics()
    engine = Engine(EngineOptions(device="cpu", dtype="float32", cpu_threads=1), metrics)
    assert engine.swap(MODEL, "v1", tiny_export, {"files": []})
    state = ServingState(engine, ServingConfig(), metrics, expected=[MODEL])
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(state), host="127.0.0.1", port=port, lifespan="off",
                                           log_config=None, access_log=False))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    try:
        yield url, engine
    finally:
        server.should_exit = True
        thread.join(10)
        engine.close()


def worker_alive_gauge(url: str) -> float:
    for line in httpx.get(url + "/metrics", timeout=10).text.splitlines():
        if line.startswith(f'textmill_worker_alive{{model="{MODEL}"}}'):
            return float(line.split()[-1])
    raise AssertionError("textmill_worker_alive not exported")


def wait_dead(worker, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while worker.health().alive and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not worker.health().alive


@pytest.mark.filterwarnings("ignore::pytest.PytestUnhandledThreadExceptionWarning")  # the death is the point
def test_live_fails_when_worker_thread_died_of_uncaught_exception(node):
    url, engine = node
    live = httpx.get(url + "/live", timeout=10)
    assert live.status_code == 200 and live.json()["models"][MODEL] == {"version": "v1", "worker_alive": True}
    assert worker_alive_gauge(url) == 1
    worker = engine.worker(MODEL)
    # SystemExit is a BaseException: run_batch's `except Exception` lets it through and the thread ends.
    hit = ctypes.pythonapi.PyThreadState_SetAsyncExc(ctypes.c_ulong(worker._thread.ident), ctypes.py_object(SystemExit))
    assert hit == 1
    engine.probe(MODEL, timeout=0.5)  # wakes the thread from its blocking queue.get so the exception is raised
    wait_dead(worker)
    live = httpx.get(url + "/live", timeout=10)
    assert live.status_code == 503
    assert live.json()["status"] == "dead" and live.json()["models"][MODEL]["worker_alive"] is False
    assert worker_alive_gauge(url) == 0


def test_live_fails_when_worker_loop_returned_while_still_live(node):
    url, engine = node
    worker = engine.worker(MODEL)
    worker.close()   # the loop exits and frees the model, but nothing replaced it: requests would wait forever
    wait_dead(worker)
    assert httpx.get(url + "/live", timeout=10).status_code == 503
    assert worker_alive_gauge(url) == 0


def test_device_check_reports_an_unusable_device():
    assert liveness.device_ok(torch.device("cpu")) == "ok"
    # One past the last CUDA device: "Torch not compiled with CUDA" on CPU hosts, "invalid device ordinal" on GPU ones.
    missing = liveness.device_ok(torch.device("cuda", torch.cuda.device_count()))
    assert missing != "ok" and "\n" not in missing


def test_liveness_verdict_needs_every_worker_and_device():
    ok = liveness.Liveness({"a": {"version": "v", "worker_alive": True}}, {"cpu": "ok"})
    assert ok.alive and ok.body()["status"] == "ok"
    assert not liveness.Liveness({"a": {"version": "v", "worker_alive": True}}, {"cuda:0": "RuntimeError: CUDA error"}).alive
    assert not liveness.Liveness({"a": {"version": "v", "worker_alive": False}}, {"cpu": "ok"}).alive
