"""`textmill retrain`'s pull step: `dvc update` of `dvc import-url` sources on the GCS emulator and on a local HTTP
server, Kaggle through the official client with one-line errors when unauthenticated or offline, and the
push/commit step after publishing."""

from __future__ import annotations

import functools
import http.server
import os
import subprocess
import threading
from pathlib import Path

import gcsfs
import pytest

from textmill import retrain
from textmill.errors import UserError

GIT = ["git", "-c", "user.name=textmill-test", "-c", "user.email=test@textmill.invalid"]


def run(cwd: Path, *cmd: str) -> str:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "NO_PROXY": "127.0.0.1,localhost"}
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{' '.join(cmd)} failed:\n{proc.stdout}\n{proc.stderr}"
    return proc.stdout


@pytest.fixture
def repo(tmp_path, monkeypatch):
    path = tmp_path / "repo"
    (path / "data" / "raw" / "web").mkdir(parents=True)
    run(path, *GIT, "init", "-q", "-b", "main")
    run(path, "dvc", "init", "-q")
    run(path, *GIT, "commit", "-q", "-m", "init")
    return path


@pytest.fixture
def http_folder(tmp_path):
    """A folder served by a real HTTP server on 127.0.0.1 (Last-Modified + Content-Length, as a static host sends)."""
    folder = tmp_path / "site"
    folder.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(folder))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield folder, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


def test_update_imports_from_gcs_and_http(repo, gcs_bucket, http_folder):
    fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    fs.pipe(f"{gcs_bucket}/corpus/a.jsonl", b'{"text": "first night"}\n')
    folder, base = http_folder
    (folder / "b.txt").write_text("first page\n")
    run(repo, "dvc", "import-url", f"{gcs_bucket}/corpus/a.jsonl", "data/raw/web/a.jsonl")
    run(repo, "dvc", "import-url", f"{base}/b.txt", "data/raw/web/b.txt")
    assert [p.name for p in retrain.import_stages(repo)] == ["a.jsonl.dvc", "b.txt.dvc"]
    run(repo, *GIT, "add", "-A")
    run(repo, *GIT, "commit", "-q", "-m", "imports")

    fs.pipe(f"{gcs_bucket}/corpus/a.jsonl", b'{"text": "first night"}\n{"text": "second night"}\n')
    (folder / "b.txt").write_text("first page\nsecond page\n")
    pulled = retrain.pull_new_data(repo, update=True, kaggle=[])
    assert {r["stage"]: r["changed"] for r in pulled["imports"]} == {"data/raw/web/a.jsonl.dvc": True,
                                                                  "data/raw/web/b.txt.dvc": True}
    assert "second night" in (repo / "data/raw/web/a.jsonl").read_text()
    assert "second page" in (repo / "data/raw/web/b.txt").read_text()
    # the commit step records the updated .dvc files
    for key, value in (("user.name", "textmill-test"), ("user.email", "test@textmill.invalid")):
        run(repo, "git", "config", key, value)
    assert retrain.publish_results(repo, push=False, commit_lock=True, message="retrain: test") == ["committed dvc.lock"]
    committed = run(repo, "git", "show", "--name-only", "--format=%s", "HEAD")
    assert "retrain: test" in committed and "data/raw/web/a.jsonl.dvc" in committed and "data/raw/web/b.txt.dvc" in committed
    again = retrain.pull_new_data(repo, update=True, kaggle=[])   # nothing new at the sources
    assert [r["changed"] for r in again["imports"]] == [False, False]


def test_update_of_a_vanished_source_is_one_line(repo, http_folder):
    folder, base = http_folder
    (folder / "c.txt").write_text("here today\n")
    run(repo, "dvc", "import-url", f"{base}/c.txt", "data/raw/web/c.txt")
    (folder / "c.txt").unlink()
    with pytest.raises(UserError) as e:
        retrain.update_imports(repo)
    assert "data/raw/web/c.txt.dvc" in str(e.value) and f"{base}/c.txt" in str(e.value) and "\n" not in str(e.value)


def test_unreadable_dvc_file_is_named(repo):
    (repo / "data" / "raw" / "broken.dvc").write_text("deps: [unclosed\n")
    with pytest.raises(UserError, match="broken.dvc"):
        retrain.import_stages(repo)


@pytest.fixture
def no_kaggle_credentials(tmp_path, monkeypatch):
    for var in ("KAGGLE_USERNAME", "KAGGLE_KEY", "KAGGLE_API_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "kaggle-config"))
    monkeypatch.setenv("HOME", str(tmp_path / "home"))


@pytest.fixture
def folder_repo(tmp_path):
    """A plain project folder: the Kaggle checks below fail before git or DVC are involved."""
    (tmp_path / "proj" / "data" / "raw").mkdir(parents=True)
    return tmp_path / "proj"


def test_kaggle_without_credentials_is_one_line(folder_repo, no_kaggle_credentials):
    repo = folder_repo
    with pytest.raises(UserError) as e:
        retrain.pull_new_data(repo, update=False, kaggle=["someone/abstracts=data/raw/abstracts"])
    assert "KAGGLE_USERNAME" in str(e.value) and "kaggle.json" in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("setup", ["env", "file"])
def test_kaggle_offline_is_one_line(folder_repo, no_kaggle_credentials, monkeypatch, tmp_path, setup):
    repo = folder_repo
    if setup == "env":
        monkeypatch.setenv("KAGGLE_USERNAME", "nobody")
        monkeypatch.setenv("KAGGLE_KEY", "0123456789abcdef0123456789abcdef")
    else:
        config = tmp_path / "kaggle-config"
        config.mkdir()
        (config / "kaggle.json").write_text('{"username": "nobody", "key": "0123456789abcdef0123456789abcdef"}')
        (config / "kaggle.json").chmod(0o600)
    # offline: every connection goes to a proxy port where nothing listens
    for var in ("HTTPS_PROXY", "https_proxy", "HTTP_PROXY", "http_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    monkeypatch.delenv("NO_PROXY", raising=False)
    monkeypatch.delenv("no_proxy", raising=False)
    with pytest.raises(UserError) as e:
        retrain.pull_kaggle("someone/abstracts=data/raw/abstracts", repo)
    assert "cannot reach Kaggle" in str(e.value) and "someone/abstracts" in str(e.value)
    assert not any((repo / "data" / "raw").glob(".abstracts-kaggle-*"))   # the temp download folder is gone


@pytest.mark.parametrize("spec", ["abstracts", "someone/abstracts", "someone/abstracts=../outside"])
def test_kaggle_spec_is_checked(folder_repo, spec):
    with pytest.raises(UserError, match="--kaggle"):
        retrain.pull_kaggle(spec, folder_repo)
