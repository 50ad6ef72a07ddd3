"""`serving.sync` against a local folder and the GCS emulator: verified downloads, reuse, pruning, corruption, CLI."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from textmill.serving import settings as node_settings
from textmill.serving.sync import Syncer
from textmill.config import ServingConfig
from textmill.registry import MANIFEST, Registry

REPO = Path(__file__).resolve().parent.parent
MODEL = "tiny"


def variant(base: Path, dest: Path, note: str) -> Path:
    """A copy of an export folder that differs only in textmill.json (a new version sharing the weights)."""
    shutil.copytree(base, dest)
    (dest / "textmill.json").write_text(f'{{"note": "{note}"}}\n', encoding="utf-8")
    return dest


def publish(root: str, folder: Path, loss: float = 5.0, **kw) -> str:
    return Registry(root).publish(MODEL, folder, metrics={"val_loss": loss}, provenance={}, progress=False,
                                  force=True, **kw).version


def test_sync_downloads_latest_then_only_changed_files(registry_root, tiny_export, tmp_path):
    v1 = publish(registry_root, tiny_export)
    syncer = Syncer(ServingConfig(root=registry_root, cache_dir=str(tmp_path / "cache")))
    [r1] = syncer.sync_once()
    assert (r1.latest, r1.downloaded, r1.error) == (v1, True, None)
    folder1 = tmp_path / "cache" / MODEL / v1
    assert (folder1 / MANIFEST).is_file() and (folder1 / "model.safetensors").is_file()
    assert syncer.sync_once()[0].downloaded is False  # up to date: nothing fetched

    v2 = publish(registry_root, variant(tiny_export, tmp_path / "v2", "second"))
    [r2] = syncer.sync_once()
    folder2 = tmp_path / "cache" / MODEL / v2
    assert r2.downloaded and r2.latest == v2
    # unchanged weights came from the cached v1 (hardlinked), not over the network
    assert os.stat(folder2 / "model.safetensors").st_ino == os.stat(folder1 / "model.safetensors").st_ino
    assert (folder2 / "textmill.json").read_text() == '{"note": "second"}\n'
    assert [c.version for c in syncer.cached(MODEL)] == [v1, v2]


def test_sync_keeps_n_old_versions(registry_root, tiny_export, tmp_path):
    syncer = Syncer(ServingConfig(root=registry_root, cache_dir=str(tmp_path / "cache"), keep_versions=1))
    versions = []
    for i in range(3):
        versions.append(publish(registry_root, variant(tiny_export, tmp_path / f"v{i}", f"n{i}")))
        syncer.sync_once()
    assert [c.version for c in syncer.cached(MODEL)] == versions[-2:]  # live + 1 for rollback


def test_corrupted_download_never_lands(registry_root, tiny_export, tiny_export_factory, tmp_path):
    v1 = publish(registry_root, tiny_export)
    syncer = Syncer(ServingConfig(root=registry_root, cache_dir=str(tmp_path / "cache")))
    syncer.sync_once()
    reg = Registry(registry_root)

    def corrupt(path: str) -> None:
        # after MANIFEST, before LATEST moves: the version readers will see has bad weights in the bucket
        if path == MANIFEST:
            newest = reg.versions(MODEL)[-1]
            reg.fs.pipe_file(reg._path(MODEL, newest, "model.safetensors"), b"not the weights")

    # new weights (seed 1): nothing reusable from the cache, so the corrupted bytes must be fetched
    result = reg.publish(MODEL, tiny_export_factory(1), metrics={"val_loss": 5.0},
                         provenance={}, progress=False, force=True, on_uploaded=corrupt)
    assert Registry(registry_root).latest(MODEL) == result.version
    [r] = syncer.sync_once()
    assert r.error and "model.safetensors" in r.error and r.cached is None
    cache = tmp_path / "cache" / MODEL
    assert sorted(p.name for p in cache.iterdir()) == [v1]  # no partial folder, no temp left behind
    assert syncer.newest_cached(MODEL).version == v1


def test_settings_precedence(tmp_path):
    params = tmp_path / "params.yaml"
    shutil.copy(REPO / "params.yaml", params)
    p = __import__("argparse").ArgumentParser()
    node_settings.add_arguments(p, server=True)
    args = p.parse_args(["--params", str(params), "--set", "serving.keep_versions=5", "--models", "a,b",
                         "--port", "9001"])
    cfg = node_settings.load(args, env={"TEXTMILL_PORT": "9000", "TEXTMILL_API_KEYS": "k1,k2",
                                        "TEXTMILL_POLL_INTERVAL": "2.5"})
    assert cfg.port == 9001 and cfg.models == ["a", "b"] and cfg.keep_versions == 5
    assert cfg.api_keys == ["k1", "k2"] and cfg.poll_interval == 2.5
    with pytest.raises(Exception, match="TEXTMILL_MAX_QUEUE"):
        node_settings.load(p.parse_args([]), env={"TEXTMILL_MAX_QUEUE": "many"})
    with pytest.raises(Exception, match="serving.device"):
        node_settings.load(p.parse_args(["--device", "tpu"]), env={})


def run_cli(*args: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textmill.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})}, timeout=120)


def test_sync_cli_one_pass(registry_root, tiny_export, tmp_path):
    empty = run_cli("sync", "--root", registry_root, "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert empty.returncode == 2 and "no models" in empty.stderr and "Traceback" not in empty.stderr
    v1 = publish(registry_root, tiny_export)
    done = run_cli("sync", "--root", registry_root, "--models", MODEL, "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert f"{MODEL}: {v1} downloaded" in done.stdout
    assert (tmp_path / "cache" / MODEL / v1 / MANIFEST).is_file()


def test_set_overrides_beat_the_environment(tmp_path):
    p = __import__("argparse").ArgumentParser()
    node_settings.add_arguments(p, server=True)
    args = p.parse_args(["--root", str(tmp_path), "--set", "serving.max_queue=5"])
    assert node_settings.load(args, env={"TEXTMILL_MAX_QUEUE": "99"}).max_queue == 5
    assert node_settings.load(p.parse_args(["--root", str(tmp_path)]), env={"TEXTMILL_MAX_QUEUE": "99"}).max_queue == 99


def test_sync_cli_unknown_model_names_the_available_ones(registry_root, tiny_export, tmp_path):
    publish(registry_root, tiny_export)
    typo = run_cli("sync", "--root", registry_root, "--models", "tinny", "--cache", str(tmp_path / "cache"), cwd=tmp_path)
    assert typo.returncode == 2 and "Traceback" not in typo.stderr
    assert f"unknown model(s) tinny in {registry_root}; available: {MODEL}" in typo.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "cache" / "tinny").exists()
