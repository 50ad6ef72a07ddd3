"""A serving node's start-up checks: a misconfigured `textmill serve` (unknown --models name, port in use, address it
cannot bind) fails at once with one line and exit 2, before any sync or model load."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from tests.fixtures.server import free_port
from tests.test_registry import make_export
from textmill.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def serve(root: str, tmp: Path, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "textmill.cli", "serve", "--root", root, "--cache", str(tmp / "cache"), *args]
    return subprocess.run(cmd, cwd=tmp, capture_output=True, text=True, timeout=180,
                          env={**os.environ, "PYTHONPATH": str(REPO), "TEXTMILL_LOG_LEVEL": "WARNING"})


def error_line(proc: subprocess.CompletedProcess) -> str:
    """The single line a user mistake prints (exit 2, no traceback)."""
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    return lines[0]


@pytest.fixture
def registry(registry_root, tmp_path) -> str:
    reg = Registry(registry_root)
    for i, model in enumerate(("abstracts", "legal")):
        reg.publish(model, make_export(tmp_path / model, seed=i), metrics={"val_loss": 2.0}, provenance={}, progress=False)
    return registry_root


def test_unknown_models_fail_at_start_naming_the_available_ones(registry, tmp_path):
    # Two instances in one start (each start costs a torch import): a misspelt name and a near-miss plural.
    line = error_line(serve(registry, tmp_path, "--models", "legall,abstrcts", "--port", str(free_port())))
    assert "unknown model(s) legall, abstrcts" in line and "available: abstracts, legal" in line
    assert not (tmp_path / "cache" / "abstrcts").exists() and not (tmp_path / "cache" / "legall").exists()


def test_model_name_that_is_not_a_name_fails_at_start(tmp_path):
    line = error_line(serve(str(tmp_path / "bucket"), tmp_path, "--models", "../../etc", "--port", str(free_port())))
    assert "'../../etc' is not a valid model name" in line
    assert not (tmp_path / "cache").exists() and not (tmp_path / "bucket").exists()


def test_port_in_use_is_one_line_exit_2(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        line = error_line(serve(str(tmp_path / "bucket"), tmp_path, "--host", "127.0.0.1", "--port", str(port)))
    assert f"cannot listen on 127.0.0.1:{port}" in line and "--port" in line
    assert not (tmp_path / "cache").exists()  # failed before the first sync


def test_address_not_on_this_machine_is_one_line_exit_2(tmp_path):
    # 192.0.2.1 is TEST-NET-1 (RFC 5737): never assigned to a local interface, so bind() fails with EADDRNOTAVAIL.
    line = error_line(serve(str(tmp_path / "bucket"), tmp_path, "--host", "192.0.2.1", "--port", str(free_port())))
    assert "cannot listen on 192.0.2.1" in line and "--host" in line
    assert not (tmp_path / "cache").exists()
