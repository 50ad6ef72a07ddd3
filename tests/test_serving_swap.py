"""A serving node following its registry (local folder and GCS emulator): hot swap under load, a corrupted download and an
unloadable version leave the old one serving; an unreachable bucket at start serves the cache; SIGTERM drains."""

from __future__ import annotations

import shutil
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai

from textmill.serving.sync import Syncer
from tests.fixtures.server import API_KEY, ServeProcess, free_port
from textmill.config import ServingConfig
from textmill.registry import MANIFEST, Registry

MODEL = "tiny"
CLIENTS = 8


def publish(root: str, folder: Path, **kw) -> str:
    return Registry(root).publish(MODEL, folder, metrics={"val_loss": 5.0}, provenance={}, progress=False, force=True,
                                  **kw).version


def publish_corrupted(root: str, folder: Path) -> str:
    """Publish, but overwrite the weights in the bucket after MANIFEST is written and before LATEST moves."""
    reg = Registry(root)

    def corrupt(path: str) -> None:
        if path == MANIFEST:
            reg.fs.pipe_file(reg._path(MODEL, reg.versions(MODEL)[-1], "model.safetensors"), b"garbage")

    return publish(root, folder, on_uploaded=corrupt)


def wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.1)


class Client(threading.Thread):
    """Streams completions back to back, recording the version of each and any failure."""

    def __init__(self, url: str, index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.api = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0, timeout=30)
        self.index, self.stop = index, stop
        self.versions: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                chunks = list(self.api.completions.create(model=MODEL, prompt=f"client {self.index}", max_tokens=16,
                                                          seed=len(self.versions), stream=True))
                seen = {c.model_extra["model_version"] for c in chunks}
                assert len(seen) == 1, f"one stream mixed versions {seen}"
                assert chunks[-1].choices[0].finish_reason in ("length", "stop")
                self.versions.append(seen.pop())
            except Exception as e:  # recorded, asserted empty by the test
                self.errors.append(f"{type(e).__name__}: {e}")


def test_hot_swap_under_load_and_bad_versions(registry_root, tiny_export, tiny_export_factory, tmp_path):
    v1 = publish(registry_root, tiny_export)
    node = ServeProcess(registry_root, tmp_path / "node", models=MODEL, args=["--poll-interval", "0.3"],
                        hooks={"HOOK_STEP_DELAY": "0.005"})
    try:
        node.wait_ready()
        assert node.version(MODEL) == v1
        stop = threading.Event()
        clients = [Client(node.url, i, stop) for i in range(CLIENTS)]
        for c in clients:
            c.start()
        wait_for(lambda: all(c.versions for c in clients), 30, "every client to finish a request on v1")
        v2 = publish(registry_root, tiny_export_factory(1))
        wait_for(lambda: all(c.versions.count(v2) >= 2 for c in clients), 60, "every client to get v2 twice")
        stop.set()
        for c in clients:
            c.join(30)
        assert [e for c in clients for e in c.errors] == []
        for c in clients:
            first_new = c.versions.index(v2)
            assert set(c.versions[:first_new]) == {v1} and set(c.versions[first_new:]) == {v2}, c.versions

        # A version whose bytes in the bucket do not match its MANIFEST is never loaded.
        failures = node.metric("textmill_sync_failures_total")
        v3 = publish_corrupted(registry_root, tiny_export_factory(2))
        wait_for(lambda: node.metric("textmill_sync_failures_total") > failures, 30, "the sync to reject v3")
        assert node.version(MODEL) == v2
        assert not (node.cache / MODEL / v3).exists()
        ok = httpx.post(node.url + "/v1/completions", headers=node.headers(), timeout=30,
                        json={"model": MODEL, "prompt": "still there?", "max_tokens": 4})
        assert ok.status_code == 200 and ok.headers["x-textmill-model-version"] == v2

        # A verified version that fails to load keeps the old one serving, visibly.
        broken = tmp_path / "broken"
        shutil.copytree(tiny_export, broken)
        (broken / "model.safetensors").write_bytes(b"verified, but not a safetensors file")
        v4 = publish(registry_root, broken)
        wait_for(lambda: node.metric("textmill_model_load_failures_total") >= 1, 30, "the load of v4 to fail")
        assert node.version(MODEL) == v2
        assert v4 in httpx.get(node.url + "/info", headers=node.headers()).json()["failed_loads"][MODEL]
        assert httpx.get(node.url + "/ready").status_code == 200
    finally:
        assert node.terminate() == 0, node.log()


def test_unreachable_bucket_serves_cache_then_sigterm_drains(tiny_export, tmp_path):
    local_root = str(tmp_path / "bucket")
    v1 = publish(local_root, tiny_export)
    workdir = tmp_path / "node"
    Syncer(ServingConfig(root=local_root, cache_dir=str(workdir / "cache"))).sync_once()  # e.g. an earlier boot
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    node = ServeProcess("gs://unreachable-bucket/registry", workdir, models=MODEL,
                        env={"STORAGE_EMULATOR_HOST": dead}, hooks={"HOOK_STEP_DELAY": "0.02"})
    try:
        node.wait_ready(timeout=60)
        assert node.version(MODEL) == v1
        with ThreadPoolExecutor(1) as pool:
            inflight = pool.submit(httpx.post, node.url + "/v1/completions", headers=node.headers(), timeout=60,
                                   json={"model": MODEL, "prompt": "finish me", "max_tokens": 100})
            time.sleep(0.5)
            node.proc.send_signal(signal.SIGTERM)
            wait_for(lambda: httpx.get(node.url + "/ready").status_code == 503, 5, "/ready to turn 503")
            refused = httpx.post(node.url + "/v1/completions", headers=node.headers(),
                                 json={"model": MODEL, "prompt": "too late", "max_tokens": 2})
            assert refused.status_code == 503 and refused.json()["error"]["code"] == "draining"
            done = inflight.result()
        assert done.status_code == 200 and done.json()["usage"]["completion_tokens"] == 100
        assert node.proc.wait(30) == 0
    finally:
        node.terminate()
    assert "serving cached versions" in node.log()
