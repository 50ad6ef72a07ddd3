"""A DVC remote on GCS (dvc-gs) against the real emulator: dvc add + push from one clone, pull into a fresh clone."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import gcsfs

GIT = ["git", "-c", "user.name=textmill-test", "-c", "user.email=test@textmill.invalid", "-c", "init.defaultBranch=main"]


def run(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "NO_PROXY": "127.0.0.1,localhost", "GIT_TERMINAL_PROMPT": "0"}
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


def test_dvc_push_pull_through_gcs_emulator(gcs_emulator, gcs_bucket, tmp_path):
    origin = tmp_path / "origin"
    (origin / "data" / "raw" / "tiny").mkdir(parents=True)
    payload = {"data/raw/tiny/a.jsonl": '{"text": "héllo wörld"}\n' * 50, "data/raw/tiny/b.txt": "second file\n"}
    for rel, text in payload.items():
        (origin / rel).write_text(text, encoding="utf-8")

    run(origin, *GIT, "init", "-q")
    run(origin, "dvc", "init", "-q")
    run(origin, "dvc", "remote", "add", "-d", "gcs", f"{gcs_bucket}/dvc")
    run(origin, "dvc", "remote", "modify", "gcs", "endpointurl", gcs_emulator)
    run(origin, "dvc", "remote", "modify", "gcs", "allow_anonymous_login", "true")
    run(origin, "dvc", "add", "data/raw/tiny")
    run(origin, "dvc", "push")
    run(origin, *GIT, "add", "-A")
    run(origin, *GIT, "commit", "-q", "-m", "data")

    # The objects really are in the bucket, content-addressed under files/md5/.
    pushed = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True).find(f"{gcs_bucket}/dvc/files/md5")
    assert len(pushed) == 3  # two files + the directory listing (.dir)

    clone = tmp_path / "clone"
    run(tmp_path, *GIT, "clone", "-q", str(origin), str(clone))
    assert not (clone / "data" / "raw" / "tiny").exists()
    run(clone, "dvc", "pull")
    for rel, text in payload.items():
        assert (clone / rel).read_bytes() == text.encode("utf-8")
    assert "Cache and remote 'gcs' are in sync" in run(clone, "dvc", "status", "-c")
