"""Network and credential failures are one line naming the URI and what to do (issue 10 kind 8), for every verb that
opens storage through `textmill.storage.filesystem`: base fetch, publish/sync/models (the registry), and clean."""

from __future__ import annotations

import os
import socket
import subprocess
from pathlib import Path

import pytest

from textmill.pipelines.clean import main as clean_main
from tests.fixtures.clean_corpora import make_config
from textmill import storage
from textmill.errors import UserError
from textmill.registry import Registry

REPO = Path(__file__).resolve().parent.parent


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # closed again when the socket is: nothing listens there


def one_line(e: pytest.ExceptionInfo, *needles: str) -> None:
    msg = str(e.value)
    assert "\n" not in msg and isinstance(e.value, UserError), msg
    for needle in needles:
        assert needle in msg, msg


def test_unreachable_http_hosts_are_one_line(tmp_path):
    for uri in (f"http://127.0.0.1:{closed_port()}/gpt2/124M", "https://no-such-host.invalid/gpt2/124M"):
        fs, path = storage.filesystem(uri)
        with pytest.raises(storage.RemoteUnavailable) as e:
            fs.cat_file(path + "/hparams.json")
        one_line(e, uri, "cannot reach the server", "check the network")
        assert isinstance(e.value, ConnectionError)  # still retried by callers that retry transient errors


def test_base_fetch_from_an_unreachable_host(tmp_path):
    from textmill.training.base import fetch

    uri = f"http://127.0.0.1:{closed_port()}/gpt2/124M"
    cfg = make_config(tmp_path, {"m": ["c"]})
    with pytest.raises(UserError) as e:
        fetch(cfg, uri, tmp_path / "base")
    one_line(e, uri, "cannot reach the server")


def test_credentials_file_missing_is_one_line(monkeypatch):
    monkeypatch.delenv("STORAGE_EMULATOR_HOST", raising=False)
    monkeypatch.setenv("GOOGLE_APPLICATION_CREDENTIALS", "/nonexistent/key.json")
    with pytest.raises(storage.RemoteAccessDenied) as e:
        Registry("gs://bucket/models")
    one_line(e, "gs://bucket/models", "GOOGLE_APPLICATION_CREDENTIALS=/nonexistent/key.json is not a file")


def test_clean_on_remote_uris_says_how_to_bring_the_files_here(tmp_path):
    for uri in ("gs://bucket/raw/train.csv", "https://example.org/train.csv.gz"):
        with pytest.raises(UserError) as e:
            clean_main(["--raw", uri, "--out", str(tmp_path / "out")])
        one_line(e, uri, "clean reads local files", "copy it here first")


@pytest.mark.slow
def test_registry_cli_with_the_emulator_unreachable(tmp_path):
    """gcsfs retries 6 times with backoff (~35 s) before it gives up; then one line and exit 2, no traceback."""
    env = {**os.environ, "STORAGE_EMULATOR_HOST": f"http://127.0.0.1:{closed_port()}"}
    proc = subprocess.run(["textmill", "models", "ls", "gs://bucket/models"], capture_output=True, text=True, cwd=REPO,
                          env=env, timeout=300)
    assert proc.returncode == 2, proc.stderr
    # log lines (gcsfs' own "out of retries" note) aside, the error is one line
    err = [line for line in proc.stderr.splitlines() if not any(f" {lvl} " in line for lvl in ("WARNING", "ERROR"))]
    assert len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert "gs://bucket/models" in err[0] and "cannot reach the server" in err[0]
