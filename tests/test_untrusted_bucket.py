"""A hostile bucket (local folder and GCS emulator): whatever LATEST, MANIFEST.json or a folder name says, sync refuses it
as a counted error, the old version stays cached and served, and nothing outside the cache is created, changed or
deleted. Each hostile form is one parametrized case, run against both roots."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from textmill.serving.sync import Syncer
from tests.test_registry import make_export
from textmill.config import ServingConfig
from textmill.registry import LATEST, MANIFEST, Registry, UntrustedData, check_file_path, make_version

REPO = Path(__file__).resolve().parent.parent
MODEL = "m"


def tree(folder: Path) -> dict[str, bytes | None]:
    """Every entry under `folder` (relative path -> file bytes, None for folders): to prove it was left untouched."""
    return {p.relative_to(folder).as_posix(): (None if p.is_dir() else p.read_bytes()) for p in sorted(folder.rglob("*"))}


def set_latest(reg: Registry, model: str, raw: bytes) -> None:
    reg.fs.pipe_file(reg._path(model, LATEST), raw)


def plant_manifest(reg: Registry, model: str, version: str, raw: bytes) -> None:
    """`raw` as the MANIFEST.json of `model@version` (a folder holding nothing else), and LATEST pointing at it."""
    reg.fs.makedirs(reg._path(model, version), exist_ok=True)
    reg.fs.pipe_file(reg._path(model, version, MANIFEST), raw)
    set_latest(reg, model, f"{version}\n".encode())


def plant_version(reg: Registry, name: str, files: list[dict], **fields) -> str:
    """A crafted MANIFEST.json listing `files`, under a version id that matches them (so only the files are wrong)."""
    version = make_version(datetime(2030, 1, 1, tzinfo=timezone.utc), files)
    manifest = {"model": name, "version": version, "created": "2030-01-01T00:00:00Z", "files": files,
                "metrics": {"val_loss": 1.0}, "provenance": {}, **fields}
    plant_manifest(reg, name, version, json.dumps(manifest).encode())
    return version


class Node:
    """A registry with one good version of MODEL synced into a cache, and a sentinel folder beside the cache."""

    def __init__(self, root: str, tmp: Path) -> None:
        self.reg = Registry(root)
        self.tmp = tmp
        self.sentinel = tmp / "sentinel"
        (self.sentinel / "inner").mkdir(parents=True)
        (self.sentinel / "keep.txt").write_text("precious")
        (self.sentinel / "inner" / "config.json").write_text("{}")
        self.v1 = self.reg.publish(MODEL, make_export(tmp / "export1", seed=1), metrics={"val_loss": 2.0},
                                   provenance={}, progress=False).version
        self.cache = tmp / "cache"  # so `<cache>/<model>/../../sentinel` is the sentinel
        self.syncer = Syncer(ServingConfig(root=root, cache_dir=str(self.cache), models=[MODEL], keep_versions=0))
        [first] = self.syncer.sync_once()
        assert first.error is None and first.latest == self.v1
        self.before = tree(self.sentinel)
        self.top = sorted(p.name for p in tmp.iterdir())

    def set_latest(self, raw: bytes) -> None:
        set_latest(self.reg, MODEL, raw)

    def plant_version(self, files: list[dict], **fields) -> str:
        return plant_version(self.reg, MODEL, files, **fields)

    def plant_manifest(self, version: str, raw: bytes) -> None:
        plant_manifest(self.reg, MODEL, version, raw)

    def assert_refused(self, kind: str) -> None:
        """One sync pass refuses the value (kind counted), the old version stays, nothing outside the cache changed."""
        [result] = self.syncer.sync_once()
        assert result.error and result.rejected == kind, (result.rejected, result.error)
        assert result.cached is None
        assert [c.version for c in self.syncer.cached(MODEL)] == [self.v1]   # still cached: the node keeps serving it
        assert self.syncer.cached(MODEL)[0].manifest()["version"] == self.v1
        assert sorted(p.name for p in (self.cache / MODEL).iterdir()) == [self.v1]  # no temp folder, nothing planted
        assert tree(self.sentinel) == self.before
        assert sorted(p.name for p in self.tmp.iterdir()) == self.top


@pytest.fixture
def node(registry_root, tmp_path) -> Node:
    return Node(registry_root, tmp_path)


# --------------------------------------------------------------------------------------------------------------- LATEST

LATEST_FORMS = {
    "absolute": lambda n: str(n.sentinel).encode(),
    "dotdot": lambda n: b"../../sentinel",
    "backslash": lambda n: b"..\\..\\sentinel",
    "drive": lambda n: b"C:sentinel",
    "nul": lambda n: n.v1.encode() + b"\0",
    "newline_garbage": lambda n: n.v1.encode() + b"\n../../sentinel\n",
    "whitespace": lambda n: b"  " + n.v1.encode() + b" \n",
    "crlf": lambda n: n.v1.encode() + b"\r\n",
    "very_long": lambda n: b"2" * 200_000,
    "lookalike_digits": lambda n: n.v1.replace("2", "\uff12").encode(),      # fullwidth digit two
    "lookalike_hyphen": lambda n: n.v1.replace("-", "\u2010").encode(),      # unicode hyphen
    "trailing_slash": lambda n: n.v1.encode() + b"/",
    "not_utf8": lambda n: b"\xff\xfe" + n.v1.encode(),
    "impossible_date": lambda n: b"20261399T999999Z-0123456789ab",
    "empty": lambda n: b"",
}


@pytest.mark.parametrize("form", sorted(LATEST_FORMS))
def test_hostile_latest_is_refused(node, form):
    node.set_latest(LATEST_FORMS[form](node))
    node.assert_refused("latest")


def test_latest_naming_a_symlink_in_the_cache_replaces_the_link_not_its_target(node, tmp_path):
    # A cached folder with an odd origin: `<cache>/m/<new version>` is a symlink to a folder outside the cache.
    v2 = node.reg.publish(MODEL, make_export(tmp_path / "export2", seed=2), metrics={"val_loss": 1.9},
                          provenance={}, progress=False).version
    os.symlink(node.sentinel, node.cache / MODEL / v2)
    [result] = node.syncer.sync_once()
    assert result.error is None and result.latest == v2 and result.downloaded
    assert not (node.cache / MODEL / v2).is_symlink() and (node.cache / MODEL / v2 / MANIFEST).is_file()
    assert tree(node.sentinel) == node.before


def test_odd_cached_names_are_never_followed_out_of_the_cache(node):
    folder = node.cache / MODEL
    (node.sentinel / MANIFEST).write_text("{}")  # looks like a cached version from inside the cache
    node.before = tree(node.sentinel)
    os.symlink(node.sentinel, folder / "20000101T000000Z-0123456789ab")      # version-like name, symlinked out
    os.symlink(node.sentinel, folder / ".20000101T000000Z-x.abc123.tmp")   # temp-like name, symlinked out
    old = time.time() - 3600
    os.utime(folder / ".20000101T000000Z-x.abc123.tmp", (old, old), follow_symlinks=False)
    (folder / "not-a-version").mkdir()
    assert [c.version for c in node.syncer.cached(MODEL)] == [node.v1]  # the symlink is not a cached version
    node.syncer.prune(MODEL)
    assert tree(node.sentinel) == node.before
    assert not os.path.lexists(folder / ".20000101T000000Z-x.abc123.tmp")  # the stale temp link itself is gone
    # A model folder that is a symlink is refused before anything is written through it.
    os.symlink(node.sentinel, node.cache / "linked")
    syncer = Syncer(ServingConfig(root=node.reg.root, cache_dir=str(node.cache), models=["linked"]))
    [result] = syncer.sync_once()
    assert result.rejected == "symlink" and tree(node.sentinel) == node.before


def test_a_cached_file_symlinked_out_of_the_cache_is_not_reused(node, tmp_path):
    # A cached v1 file replaced by a symlink to a file outside the cache with the same bytes: the next version must not
    # hardlink (through the symlink) to that outside file; it downloads its own copy.
    cached_config = node.cache / MODEL / node.v1 / "config.json"
    outside = node.sentinel / "same-bytes.json"
    outside.write_bytes(cached_config.read_bytes())
    node.before = tree(node.sentinel)
    cached_config.unlink()
    cached_config.symlink_to(outside)
    export2 = make_export(tmp_path / "export2", seed=1)
    (export2 / "textmill.json").write_text('{"note": "v2 shares config.json with v1"}')
    v2 = node.reg.publish(MODEL, export2, metrics={"val_loss": 1.9}, provenance={}, progress=False).version
    [result] = node.syncer.sync_once()
    assert result.error is None and result.latest == v2
    new_config = node.cache / MODEL / v2 / "config.json"
    assert not new_config.is_symlink() and os.stat(new_config).st_ino != os.stat(outside).st_ino
    assert tree(node.sentinel) == node.before


# -------------------------------------------------------------------------------------------------------- MANIFEST paths

def entry(path, data: bytes = b"x") -> dict:
    import hashlib

    return {"path": path, "size": len(data), "sha256": hashlib.sha256(data).hexdigest()}


PATH_FORMS = {
    "absolute": lambda n: [entry(str(n.sentinel / "keep.txt"))],
    "dotdot": lambda n: [entry("../../sentinel/keep.txt")],
    "dotdot_inner": lambda n: [entry("inner/../../x")],
    "backslash": lambda n: [entry("..\\x")],
    "drive": lambda n: [entry("C:x")],
    "nul": lambda n: [entry("config.json\0.txt")],
    "newline": lambda n: [entry("config\n.json")],
    "very_long": lambda n: [entry("a" * 300)],
    "very_deep": lambda n: [entry("/".join(["d"] * 20) + "/f")],
    "lookalike_dots": lambda n: [entry("\u2024\u2024/x")],                   # one-dot leaders
    "lookalike_slash": lambda n: [entry("..\u2215x")],                       # division slash
    "trailing_slash": lambda n: [entry("config.json/")],
    "empty_segment": lambda n: [entry("a//b")],
    "dot_segment": lambda n: [entry("./config.json")],
    "empty": lambda n: [entry("")],
    "hidden": lambda n: [entry(".config.json")],
    "manifest_itself": lambda n: [entry(MANIFEST)],
    "not_a_string": lambda n: [entry(["config.json"])],
    "duplicate": lambda n: [entry("config.json"), entry("config.json", b"y")],
    "duplicate_case": lambda n: [entry("config.json"), entry("Config.json", b"y")],
    "file_and_folder": lambda n: [entry("a"), entry("a/b", b"y")],
}


@pytest.mark.parametrize("form", sorted(PATH_FORMS))
def test_hostile_manifest_path_is_refused(node, form):
    node.plant_version(PATH_FORMS[form](node))
    node.assert_refused("manifest_path")


MANIFEST_FORMS = {
    "model_disagrees": lambda n: n.plant_version([entry("config.json")], model="other"),
    "version_disagrees": lambda n: n.plant_version([entry("config.json")], version="20300101T000000Z-0123456789ab"),
    "hash_disagrees": lambda n: n.plant_manifest("20300101T000000Z-0123456789ab", json.dumps(
        {"model": MODEL, "version": "20300101T000000Z-0123456789ab", "files": [entry("config.json")]}).encode()),
    "negative_size": lambda n: n.plant_version([{**entry("config.json"), "size": -1}]),
    "bad_sha256": lambda n: n.plant_version([{**entry("config.json"), "sha256": "../../x"}]),
    "no_files": lambda n: n.plant_version([]),
    "not_json": lambda n: n.plant_manifest("20300101T000000Z-0123456789ab", b"{not json"),
    "deeply_nested": lambda n: n.plant_manifest("20300101T000000Z-0123456789ab", b"[" * 100_000),
    "not_an_object": lambda n: n.plant_manifest("20300101T000000Z-0123456789ab", b"[1, 2]"),
}


@pytest.mark.parametrize("form", sorted(MANIFEST_FORMS))
def test_malformed_manifest_is_refused(node, form):
    MANIFEST_FORMS[form](node)
    node.assert_refused("manifest")


def test_manifest_path_symlinked_in_a_local_registry_is_refused(tmp_path):
    node = Node(str(tmp_path / "bucket"), tmp_path)
    v2 = node.reg.publish(MODEL, make_export(tmp_path / "export2", seed=2), metrics={"val_loss": 1.9},
                          provenance={}, progress=False).version
    weights = Path(node.reg._path(MODEL, v2, "config.json"))
    weights.unlink()
    weights.symlink_to(node.sentinel / "keep.txt")
    node.top = sorted(p.name for p in tmp_path.iterdir())
    node.assert_refused("symlink")


# ----------------------------------------------------------------------------------------------------------- model names

def test_hostile_model_folder_is_skipped_and_the_good_one_syncs(registry_root, tmp_path):
    node = Node(registry_root, tmp_path)
    for name in ("bad model", "-dash", "x" * 100):
        node.reg.fs.makedirs(node.reg._path(name), exist_ok=True)
        node.reg.fs.pipe_file(node.reg._path(name, LATEST), f"{node.v1}\n".encode())
    syncer = Syncer(ServingConfig(root=registry_root, cache_dir=str(node.cache)))  # every model in the registry
    results = {r.model: r for r in syncer.sync_once()}
    assert results[MODEL].error is None and results[MODEL].latest == node.v1
    bad = [r for r in results.values() if r.model != MODEL]
    assert len(bad) == 3 and all(r.rejected == "model_name" for r in bad)
    assert sorted(p.name for p in node.cache.iterdir()) == [MODEL]
    assert Registry(registry_root).models() == [MODEL]


@pytest.mark.parametrize("name", ["../x", "/abs", "a\nb", "C:x", "..", ".hidden", "caf\u00e9"])
def test_model_names_from_the_cli_are_validated(tmp_path, name):
    with pytest.raises(UntrustedData, match="not a valid model name"):
        Syncer(ServingConfig(root=str(tmp_path / "b"), cache_dir=str(tmp_path / "c"), models=[name]))
    with pytest.raises(UntrustedData, match="not a valid model name"):
        Registry(str(tmp_path / "b")).publish(name, make_export(tmp_path / "e", seed=1), metrics={"val_loss": 1.0},
                                              provenance={}, progress=False)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


def test_export_file_with_an_unsafe_name_is_refused_at_publish(tmp_path):
    export = make_export(tmp_path / "e", seed=1)
    (export / "bad name.json").write_text("{}")
    with pytest.raises(UntrustedData, match="bad name.json"):
        Registry(str(tmp_path / "b")).publish(MODEL, export, metrics={"val_loss": 1.0}, provenance={}, progress=False)
    assert check_file_path("sub/model-00001-of-00002.safetensors") == "sub/model-00001-of-00002.safetensors"


def run_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "textmill.cli", *args], cwd=cwd, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(REPO)}, timeout=120)


def test_cli_readers_refuse_hostile_values_in_one_line(tmp_path):
    """sync, models show, rollback and gc against a bucket whose LATEST holds a path: one line, exit 2 (sync: 1), the
    sentinel intact; rollback repairs LATEST."""
    node = Node(str(tmp_path / "bucket"), tmp_path)
    root = node.reg.root
    node.set_latest(str(node.sentinel).encode())
    sync = run_cli("sync", "--root", root, "--cache", str(node.cache), "--models", MODEL, cwd=tmp_path)
    assert sync.returncode == 1 and "not a version id" in sync.stdout and "Traceback" not in sync.stderr
    gc = run_cli("gc", MODEL, "--keep", "0", "--root", root, cwd=tmp_path)
    assert gc.returncode == 2 and "not a version id" in gc.stderr and len(gc.stderr.strip().splitlines()) == 1
    show = run_cli("models", "show", "../../sentinel", "--root", root, cwd=tmp_path)
    assert show.returncode == 2 and "not a valid model name" in show.stderr
    roll = run_cli("rollback", MODEL, node.v1, "--root", root, cwd=tmp_path)
    assert roll.returncode == 0, roll.stderr
    assert node.reg.latest(MODEL) == node.v1 and tree(node.sentinel) == node.before


# ------------------------------------------------------------------------------------------------------ a serving node

def test_serving_node_keeps_serving_and_counts_rejections(tiny_export, tmp_path):
    """A real `textmill serve` following a bucket that turns hostile: /metrics counts each refusal by kind, the old
    version keeps answering, the sentinel beside the cache is untouched. (The node's wiring does not depend on the
    root: every hostile form runs against both roots above; one node start here keeps the suite fast.)"""
    import httpx

    from tests.fixtures.server import ServeProcess

    registry_root = str(tmp_path / "bucket")
    reg = Registry(registry_root)
    v1 = reg.publish("tiny", tiny_export, metrics={"val_loss": 5.0}, provenance={}, progress=False).version
    node = ServeProcess(registry_root, tmp_path / "node", models="tiny", args=["--poll-interval", "0.2"])
    sentinel = tmp_path / "node" / "sentinel"   # `<cache>/tiny/../../sentinel`
    sentinel.mkdir(parents=True)
    (sentinel / "keep.txt").write_text("precious")
    try:
        node.wait_ready()
        for kind, plant in (("latest", lambda: set_latest(reg, "tiny", b"../../sentinel\n")),
                            ("manifest_path", lambda: plant_version(reg, "tiny", [entry("../../sentinel/keep.txt")]))):
            before = node.metric("textmill_sync_rejected_total", model="tiny", kind=kind)
            plant()
            deadline = time.monotonic() + 30
            while node.metric("textmill_sync_rejected_total", model="tiny", kind=kind) <= before:
                assert time.monotonic() < deadline, node.log()
                time.sleep(0.2)
            answer = httpx.post(node.url + "/v1/completions", headers=node.headers(), timeout=30,
                                json={"model": "tiny", "prompt": "hello", "max_tokens": 4})
            assert answer.status_code == 200 and answer.json()["model_version"] == v1
            assert node.version("tiny") == v1
        assert tree(sentinel) == {"keep.txt": b"precious"}
        assert sorted(p.name for p in (node.cache / "tiny").iterdir()) == [v1]
    finally:
        node.terminate()


# ------------------------------------------------------------------------------------------------- bytes before checking

def test_a_file_larger_than_its_manifest_entry_is_refused_before_download(node):
    """A listed file whose stored object is far larger than the manifest says: refused on its size, and the node never
    downloads those bytes (a bucket cannot fill a node's disk or bandwidth on every poll with one bad object)."""
    import hashlib

    data = b"x" * (8 << 20)
    declared = {"path": "weights.bin", "size": 10, "sha256": hashlib.sha256(b"0123456789").hexdigest()}
    version = node.plant_version([declared])
    node.reg.fs.pipe_file(node.reg._path(MODEL, version, "weights.bin"), data)
    seen: list[int] = []
    registry = node.syncer.registry
    original = registry._get

    def watched(remote, target, bar):  # the real download, recording what reached the node's disk
        original(remote, target, bar)
        seen.append(Path(target).stat().st_size)

    registry._get = watched
    [result] = node.syncer.sync_once()
    assert result.error and "weights.bin" in result.error and str(len(data)) in result.error, result.error
    assert seen == [], f"downloaded {seen} bytes of a file the manifest says is 10 bytes"
    assert [c.version for c in node.syncer.cached(MODEL)] == [node.v1]
    assert sorted(p.name for p in (node.cache / MODEL).iterdir()) == [node.v1]


def test_a_manifest_path_that_is_a_folder_in_the_registry_is_refused(node):
    """MANIFEST lists `config.json`, but in the bucket `config.json` is a folder (holding files): a plain error for
    that file, no folder tree copied into the cache, the old version kept."""
    version = node.plant_version([entry("config.json")])
    node.reg.fs.makedirs(node.reg._path(MODEL, version, "config.json"), exist_ok=True)
    node.reg.fs.pipe_file(node.reg._path(MODEL, version, "config.json", "inner.txt"), b"x")
    [result] = node.syncer.sync_once()
    assert result.error and "config.json" in result.error, result.error
    assert result.cached is None
    assert [c.version for c in node.syncer.cached(MODEL)] == [node.v1]
    assert sorted(p.name for p in (node.cache / MODEL).iterdir()) == [node.v1]
    assert tree(node.sentinel) == node.before


@pytest.mark.parametrize("planted", ["99991231T235959Z-0123456789ab", "20991231T000000Z-0123456789ab"])
def test_a_version_dated_far_ahead_does_not_break_or_skew_publishing(registry_root, tmp_path, planted):
    """A complete-looking version folder dated far in the future (hostile, or a publisher whose clock was years off):
    the next publish raised OverflowError past year 9999, and otherwise stamped every new version after it. Now the
    new version is dated by this machine's clock and LATEST moves to it."""
    reg = Registry(registry_root)
    reg.publish(MODEL, make_export(tmp_path / "export1", seed=1), metrics={"val_loss": 2.0}, provenance={},
                progress=False)
    reg.fs.makedirs(reg._path(MODEL, planted), exist_ok=True)
    reg.fs.pipe_file(reg._path(MODEL, planted, MANIFEST), b"{}")
    before = datetime.now(timezone.utc).replace(microsecond=0)
    result = reg.publish(MODEL, make_export(tmp_path / "export2", seed=2), metrics={"val_loss": 1.0}, provenance={},
                         progress=False)
    assert result.moved_latest and reg.latest(MODEL) == result.version
    dated = datetime.strptime(result.version.split("-")[0], "%Y%m%dT%H%M%SZ").replace(tzinfo=timezone.utc)
    assert before <= dated <= datetime.now(timezone.utc) + timedelta(seconds=5), result.version  # +1 s per same-second publish


def test_a_config_describing_more_weights_than_the_files_hold_is_not_loaded(tiny_export, tmp_path):
    """A version whose config.json says 40 layers over the tiny export's 2-layer weights: transformers filled the 38
    missing layers with random values and the node swapped to it, serving noise (an inflated width as well made it
    allocate tens of GB first). The node now refuses to load it, names both parameter counts in /info, keeps v1."""
    import shutil

    import httpx

    from tests.fixtures.server import ServeProcess

    registry_root = str(tmp_path / "bucket")
    reg = Registry(registry_root)
    v1 = reg.publish("tiny", tiny_export, metrics={"val_loss": 5.0}, provenance={}, progress=False).version
    inflated = tmp_path / "inflated"
    shutil.copytree(tiny_export, inflated)
    config = json.loads((inflated / "config.json").read_text())
    (inflated / "config.json").write_text(json.dumps({**config, "n_layer": 40}))
    node = ServeProcess(registry_root, tmp_path / "node", models="tiny", args=["--poll-interval", "0.2"],
                        address_space=8 << 30)
    try:
        node.wait_ready()
        v2 = reg.publish("tiny", inflated, metrics={"val_loss": 4.0}, provenance={}, progress=False).version
        deadline = time.monotonic() + 60
        while True:
            info = httpx.get(node.url + "/info", headers=node.headers(), timeout=30).json()
            if "tiny" in info["failed_loads"]:
                break
            assert info["models"]["tiny"]["version"] == v1, "the node swapped to a model with random layers"
            assert time.monotonic() < deadline, node.log()
            time.sleep(0.2)
        failure = info["failed_loads"]["tiny"]
        assert failure.startswith(v2) and "2,048,640" in failure and "149,248" in failure, failure
        answer = httpx.post(node.url + "/v1/completions", headers=node.headers(), timeout=30,
                            json={"model": "tiny", "prompt": "hello", "max_tokens": 4})
        assert answer.status_code == 200 and answer.json()["model_version"] == v1
    finally:
        node.terminate()
