"""The bucket registry against a local folder and a real GCS emulator: publish, read, verify, gate, no-op, rollback, gc."""

from __future__ import annotations

import hashlib
import json
import os
import re
from pathlib import Path

import pytest

from textmill.errors import UserError
from textmill.registry import MANIFEST, Registry, VerificationError, content_hash, verify_folder


def make_export(folder: Path, seed: int, weights_size: int = 64 * 1024) -> Path:
    """A tiny fake export folder: the registry is content-agnostic, so bytes are enough."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = hashlib.sha256(f"weights-{seed}".encode()).digest()
    (folder / "model.safetensors").write_bytes((rng * (weights_size // len(rng) + 1))[:weights_size])
    (folder / "config.json").write_text(json.dumps({"n_layer": 2, "n_embd": 64, "seed": seed}))
    (folder / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (folder / "textmill.json").write_text(json.dumps({"run": "models/runs/m", "step": seed}))
    return folder


def publish(reg: Registry, export: Path, loss: float, **kw):
    return reg.publish("m", export, metrics={"val_loss": loss}, provenance={"test": True}, progress=False, **kw)


def remote(reg: Registry, *parts: str) -> str:
    return reg._path(*parts)


def test_publish_then_read_back(registry_root, tmp_path):
    reg = Registry(registry_root)
    assert reg.models() == [] and reg.latest("m") is None and reg.versions("m") == []
    export = make_export(tmp_path / "export", seed=1)
    res = publish(reg, export, 2.5)
    assert res.moved_latest and not res.noop and res.live_version is None
    assert re.fullmatch(r"\d{8}T\d{6}Z-[0-9a-f]{12}", res.version)
    assert reg.models() == ["m"] and reg.versions("m") == [res.version] and reg.latest("m") == res.version

    man = reg.manifest("m", res.version)
    assert man["model"] == "m" and man["version"] == res.version and man["created"].endswith("Z")
    assert man["metrics"] == {"val_loss": 2.5} and man["provenance"] == {"test": True}
    assert [f["path"] for f in man["files"]] == ["config.json", "model.safetensors", "textmill.json", "tokenizer.json"]
    for f in man["files"]:
        data = (export / f["path"]).read_bytes()
        assert f["size"] == len(data) and f["sha256"] == hashlib.sha256(data).hexdigest()
    assert res.version.endswith(content_hash(man["files"])[:12])

    dest = reg.download("m", res.version, tmp_path / "cache" / res.version)
    for f in man["files"]:
        assert (dest / f["path"]).read_bytes() == (export / f["path"]).read_bytes()
    assert json.loads((dest / MANIFEST).read_text()) == man
    verify_folder(dest, man)
    assert sorted(p.name for p in dest.parent.iterdir()) == [res.version]  # no temp folder left


def test_identical_republish_is_a_noop(registry_root, tmp_path):
    reg = Registry(registry_root)
    export = make_export(tmp_path / "export", seed=1)
    first = publish(reg, export, 2.5)
    again = publish(reg, export, 2.4)
    assert again.noop and not again.moved_latest and again.version == first.version
    assert "identical content" in again.message and "nothing uploaded" in again.message
    assert reg.versions("m") == [first.version]


def test_gate_refuses_worse_loss_then_force_moves(registry_root, tmp_path):
    reg = Registry(registry_root)
    live = publish(reg, make_export(tmp_path / "a", seed=1), 2.00).version
    within = publish(reg, make_export(tmp_path / "b", seed=2), 2.04)  # within tolerance 0.05: moves
    assert within.moved_latest and reg.latest("m") == within.version

    worse = publish(reg, make_export(tmp_path / "c", seed=3), 2.30)
    assert not worse.moved_latest and not worse.noop
    assert "2.3000" in worse.message and "2.0400" in worse.message and "LATEST not moved" in worse.message
    assert reg.latest("m") == within.version
    assert worse.version in reg.versions("m")  # uploaded anyway, ready for a deliberate rollback

    forced = publish(reg, make_export(tmp_path / "d", seed=4), 2.30, force=True)
    assert forced.moved_latest and "forced" in forced.message and reg.latest("m") == forced.version
    assert forced.live_val_loss == pytest.approx(2.04) and forced.new_val_loss == pytest.approx(2.30)
    assert live in reg.versions("m")



def test_force_after_refusal_moves_latest_to_the_same_upload(registry_root, tmp_path):
    # What a user does after "refused ... pass --force": republish the same export with --force.
    reg = Registry(registry_root)
    live = publish(reg, make_export(tmp_path / "a", seed=1), 2.00).version
    worse_export = make_export(tmp_path / "c", seed=3)
    refused = publish(reg, worse_export, 2.30)
    assert not refused.moved_latest and reg.latest("m") == live
    again = publish(reg, worse_export, 2.30)  # still refused without --force, nothing uploaded twice
    assert not again.moved_latest and reg.latest("m") == live
    forced = publish(reg, worse_export, 2.30, force=True)
    assert forced.moved_latest and forced.version == refused.version and reg.latest("m") == refused.version
    assert reg.versions("m") == [live, refused.version]

def test_corrupt_byte_in_registry_fails_download(registry_root, tmp_path):
    reg = Registry(registry_root)
    version = publish(reg, make_export(tmp_path / "export", seed=1), 2.0).version
    path = remote(reg, "m", version, "model.safetensors")
    data = bytearray(reg.fs.cat_file(path))
    data[len(data) // 2] ^= 0x01
    reg.fs.pipe_file(path, bytes(data))
    reg.fs.rm_file(remote(reg, "m", version, "tokenizer.json"))

    dest = tmp_path / "cache" / version
    with pytest.raises(VerificationError) as err:
        reg.download("m", version, dest)
    assert "model.safetensors: sha256" in str(err.value) and "tokenizer.json: missing" in str(err.value)
    assert not dest.exists() and list((tmp_path / "cache").iterdir()) == []


def test_download_reuses_matching_local_files(registry_root, tmp_path):
    reg = Registry(registry_root)
    a = make_export(tmp_path / "a", seed=1)
    v1 = publish(reg, a, 2.0).version
    (a / "config.json").write_text('{"changed": true}')  # v2 shares model.safetensors with v1
    v2 = publish(reg, a, 1.9).version
    cached = reg.download("m", v1, tmp_path / "cache" / v1)
    # Prove reuse by behaviour: v2's weights vanish from the registry, the download still succeeds from the v1 cache.
    reg.fs.rm_file(remote(reg, "m", v2, "model.safetensors"))
    got = reg.download("m", v2, tmp_path / "cache" / v2, reuse=[cached])
    assert (got / "model.safetensors").read_bytes() == (a / "model.safetensors").read_bytes()
    assert json.loads((got / "config.json").read_text()) == {"changed": True}

    # A corrupt reuse candidate is not trusted: it is re-checked and fetched instead (and here it is gone -> error).
    data = bytearray((cached / "model.safetensors").read_bytes())
    data[0] ^= 0xFF
    os.unlink(cached / "model.safetensors")
    (cached / "model.safetensors").write_bytes(bytes(data))
    with pytest.raises(VerificationError, match="model.safetensors: missing in the registry"):
        reg.download("m", v2, tmp_path / "cache2" / v2, reuse=[cached])


def test_rollback_and_unknown_version(registry_root, tmp_path):
    reg = Registry(registry_root)
    v1 = publish(reg, make_export(tmp_path / "a", seed=1), 2.0).version
    v2 = publish(reg, make_export(tmp_path / "b", seed=2), 1.9).version
    assert reg.latest("m") == v2
    reg.rollback("m", v1)
    assert reg.latest("m") == v1
    with pytest.raises(UserError, match="no complete version m@20200101T000000Z-0123456789ab"):
        reg.rollback("m", "20200101T000000Z-0123456789ab")
    with pytest.raises(UserError, match="'nope' is not a version id"):
        reg.rollback("m", "nope")
    assert reg.latest("m") == v1


def test_gc_keeps_newest_and_live(registry_root, tmp_path):
    reg = Registry(registry_root)
    versions = [publish(reg, make_export(tmp_path / f"e{i}", seed=i), 2.0 - i / 100).version for i in range(4)]
    assert reg.versions("m") == versions  # ids sort in publish order, even within one second
    live = versions[0]
    reg.rollback("m", live)
    # A version whose publisher died long ago (no MANIFEST) is garbage too; a recent one may still be uploading.
    for stale in ("20200101T000000Z-0123456789ab", "29990101T000000Z-0123456789ab"):
        reg.fs.makedirs(remote(reg, "m", stale), exist_ok=True)
        reg.fs.pipe_file(remote(reg, "m", stale, "model.safetensors"), b"partial")
    deleted = reg.gc("m", keep=1)
    assert deleted == sorted(["20200101T000000Z-0123456789ab", *versions[1:3]])
    assert reg.versions("m") == [live, versions[3]]
    assert reg.fs.exists(remote(reg, "m", "29990101T000000Z-0123456789ab", "model.safetensors"))
    assert reg.latest("m") == live
    reg.download("m", live, tmp_path / "dl")  # the live version is intact
    assert reg.gc("m", keep=0) == [versions[3]] and reg.versions("m") == [live]


def test_incomplete_version_is_invisible(registry_root, tmp_path):
    reg = Registry(registry_root)
    v1 = publish(reg, make_export(tmp_path / "a", seed=1), 2.0).version
    partial = remote(reg, "m", "20991231T000000Z-abcdefabcdef", "model.safetensors")
    reg.fs.makedirs(reg.fs._parent(partial), exist_ok=True)
    reg.fs.pipe_file(partial, b"partial")
    assert reg.versions("m") == [v1] and reg.latest("m") == v1 and reg.models() == ["m"]


def test_user_errors(registry_root, tmp_path):
    reg = Registry(registry_root)
    with pytest.raises(UserError, match="export folder not found"):
        publish(reg, tmp_path / "missing", 1.0)
    with pytest.raises(UserError, match="no numeric `val_loss`"):
        reg.publish("m", make_export(tmp_path / "e", seed=1), metrics={"loss": 1}, provenance={}, progress=False)
    with pytest.raises(UserError, match="no version m@20200101T000000Z-0123456789ab"):
        reg.manifest("m", "20200101T000000Z-0123456789ab")
    with pytest.raises(UserError, match="'v0' is not a version id"):
        reg.manifest("m", "v0")


def test_transfers_retry_transient_errors_then_reraise(monkeypatch):
    from textmill import registry

    monkeypatch.setattr(registry, "BACKOFF_S", 0.0)
    calls = []

    def failing(times: int, exc: Exception):
        def fn():
            calls.append(1)
            if len(calls) <= times:
                raise exc
            return "ok"
        return fn

    assert registry._with_retries("upload x", failing(2, ConnectionResetError("reset by peer"))) == "ok"
    assert len(calls) == 3
    calls.clear()
    with pytest.raises(TimeoutError):
        registry._with_retries("upload x", failing(99, TimeoutError("slow")))
    assert len(calls) == registry.RETRIES
    calls.clear()
    with pytest.raises(PermissionError):  # not transient: no retry
        registry._with_retries("upload x", failing(99, PermissionError("403")))
    assert len(calls) == 1


def test_progress_bar_reports_bytes(registry_root, tmp_path, capsys):
    reg = Registry(registry_root)
    export = make_export(tmp_path / "e", seed=1, weights_size=300_000)
    res = reg.publish("m", export, metrics={"val_loss": 1.0}, provenance={}, progress=True)
    err = capsys.readouterr().err
    assert f"publish m@{res.version}" in err and "100%" in err
    reg.download("m", res.version, tmp_path / "dl", progress=True)
    assert f"m@{res.version}" in capsys.readouterr().err
