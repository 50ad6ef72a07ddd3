"""A fleet: three `textmill serve` nodes on 127.0.0.1 syncing from one bucket on the GCS emulator, eight clients
streaming across them. `textmill publish` of v2, then `textmill rollback` to v1: every node serves the new LATEST
within one poll interval plus jitter (plus the time to download, verify, load and warm the tiny model), and no
request fails. Convergence times are printed as JSON (recorded in bench/RESULTS.md)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

import openai
import pytest

from tests.fixtures.models import make_tiny_export
from tests.fixtures.server import API_KEY, REPO, ServeProcess
from textmill.registry import Registry, export_identity

MODEL = "abstracts"            # a model the committed params.yaml configures, so `textmill publish` accepts it
NODES, CLIENTS = 3, 8
POLL_S, JITTER = 3.0, 0.2
SWAP_ALLOWANCE_S = 12.0        # sync (download + sha256) + load + warm-up of the tiny model on a shared 2-core VM
TEXTMILL = str(Path(sys.executable).parent / "textmill")


class StreamingClient(threading.Thread):
    """Streams completions back to back, each to the next node in turn; records versions and failures."""

    def __init__(self, urls: list[str], index: int, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.apis = [openai.OpenAI(base_url=u + "/v1", api_key=API_KEY, max_retries=0, timeout=30) for u in urls]
        self.index, self.stop = index, stop
        self.done: list[tuple[float, int, str]] = []     # (finish time, node, version)
        self.errors: list[str] = []

    def run(self) -> None:
        n = 0
        while not self.stop.is_set():
            node = (self.index + n) % len(self.apis)
            try:
                chunks = list(self.apis[node].completions.create(model=MODEL, prompt=f"client {self.index}", seed=n,
                                                                 max_tokens=8, stream=True))
                versions = {c.model_extra["model_version"] for c in chunks}
                assert len(versions) == 1, f"one stream mixed versions {versions}"
                assert chunks[-1].choices[0].finish_reason in ("length", "stop")
                self.done.append((time.monotonic(), node, versions.pop()))
            except Exception as e:  # recorded, asserted empty by the test
                self.errors.append(f"node {node}: {type(e).__name__}: {e}")
            n += 1
            self.stop.wait(0.05)   # a short think time: eight clients must not starve three nodes of two cores


def textmill(cwd: Path, *args: str) -> str:
    proc = subprocess.run([TEXTMILL, *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={"PATH": str(Path(sys.executable).parent), "PYTHONPATH": str(REPO),
                               **{k: v for k, v in os.environ.items() if k.startswith(("STORAGE_", "GCSFS_", "HOME"))}})
    assert proc.returncode == 0, f"textmill {' '.join(args)}:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def stage_export(project: Path, seed: int, val_loss: float) -> None:
    """models/export/<MODEL> and its eval report, as `dvc repro` would leave them before `textmill publish`."""
    export = project / "models" / "export" / MODEL
    shutil.rmtree(export, ignore_errors=True)
    make_tiny_export(export, seed=seed)
    (project / "reports" / "eval").mkdir(parents=True, exist_ok=True)
    (project / "reports" / "eval" / f"{MODEL}.json").write_text(json.dumps({"val_loss": val_loss,
                                                                               "export": export_identity(export)}))


def converge(nodes: list[ServeProcess], version: str, started: float, timeout: float) -> list[float]:
    """Seconds from `started` until each node's /v1/models names `version`."""
    seen: dict[int, float] = {}
    deadline = started + timeout
    while len(seen) < len(nodes) and time.monotonic() < deadline:
        for i, node in enumerate(nodes):
            if i not in seen and node.version(MODEL) == version:
                seen[i] = time.monotonic() - started
        time.sleep(0.05)
    assert len(seen) == len(nodes), f"nodes {sorted(set(range(len(nodes))) - set(seen))} never served {version}"
    return [round(seen[i], 2) for i in range(len(nodes))]


@pytest.mark.slow
def test_fleet_publish_and_rollback_converge_without_failed_requests(gcs_bucket, tmp_path):
    root = f"{gcs_bucket}/models"
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy(REPO / "params.yaml", project / "params.yaml")
    stage_export(project, seed=0, val_loss=5.0)
    textmill(project, "publish", MODEL, "--root", root, "--no-progress")
    v1 = Registry(root).latest(MODEL)

    args = ["--poll-interval", str(POLL_S)]
    nodes = [ServeProcess(root, tmp_path / f"node{i}", models=MODEL, args=args,
                          env={"TEXTMILL_POLL_JITTER": str(JITTER), "TEXTMILL_TEST_STEP_DELAY": "0.005"})
             for i in range(NODES)]
    stop = threading.Event()
    clients = [StreamingClient([n.url for n in nodes], i, stop) for i in range(CLIENTS)]
    try:
        for node in nodes:
            node.wait_ready(120)
        assert [n.version(MODEL) for n in nodes] == [v1] * NODES
        stage_export(project, seed=1, val_loss=4.0)   # better loss: the gate lets it through
        for c in clients:
            c.start()
        bound = POLL_S * (1 + JITTER) + SWAP_ALLOWANCE_S

        textmill(project, "publish", MODEL, "--root", root, "--no-progress")
        started = time.monotonic()   # LATEST is written last: it moved just before the command returned
        v2 = Registry(root).latest(MODEL)
        assert v2 != v1
        to_v2 = converge(nodes, v2, started, timeout=bound + 30)

        textmill(project, "rollback", MODEL, v1, "--root", root)
        started = time.monotonic()
        back = converge(nodes, v1, started, timeout=bound + 30)
        settled = time.monotonic()
        while any(not [d for d in c.done if d[0] > settled] for c in clients) and time.monotonic() < settled + 30:
            time.sleep(0.1)   # every client completes a request on the rolled-back fleet
    finally:
        stop.set()
        for c in clients:
            c.join(30)
        codes = [n.terminate() for n in nodes]
    report = {"nodes": NODES, "clients": CLIENTS, "poll_interval_s": POLL_S, "poll_jitter": JITTER,
              "bound_s": bound, "publish_to_all_nodes_s": to_v2, "rollback_to_all_nodes_s": back,
              "requests": sum(len(c.done) for c in clients), "failed": sum(len(c.errors) for c in clients)}
    print("FLEET", json.dumps(report))
    assert codes == [0] * NODES, [n.log() for n in nodes]
    assert [e for c in clients for e in c.errors] == []
    assert max(to_v2) <= bound and max(back) <= bound, report
    served = {(node, version) for c in clients for _, node, version in c.done}
    assert {(i, v2) for i in range(NODES)} <= served, "every node answered clients with v2"
    for c in clients:   # each client's sequence went v1 ... v2 ... v1, never back and forth within a phase
        versions = [v for _, _, v in c.done]
        assert versions[-1] == v1 and v2 in versions, versions
