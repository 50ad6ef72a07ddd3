"""The publish gate judges exactly what it publishes: `textmill evaluate` (real, on a tiny transformers export) records
the export it scored, and `textmill publish` refuses any other content; a republish of older content says LATEST moves
back; `textmill retrain` reports only this run's receipts."""

from __future__ import annotations

import json
import shutil
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest
import yaml

from tests.fixtures.checkpoints import tiny_config, write_tokens
from tests.fixtures.models import CORPUS
from tests.test_registry import make_export
from textmill import config as tm_config
from textmill.cli import main as textmill
from textmill.registry import Registry, content_hash, file_entries
from textmill.retrain import this_runs_receipts

MODEL = "tiny"


@pytest.fixture(scope="module")
def evaluated(tiny_export, tiny_export_factory, tmp_path_factory):
    """A project whose export was scored by the real `evaluate` (report in reports/eval/tiny.json), and a params.yaml."""
    from tokenizers import Tokenizer

    from textmill.training.evaluate import evaluate

    root = tmp_path_factory.mktemp("gate")
    shutil.copytree(tiny_export, root / "models" / "export" / MODEL)
    tok = Tokenizer.from_file(str(tiny_export / "tokenizer.json"))
    write_tokens(root / "data" / "tokens" / MODEL, tok, CORPUS[:6], CORPUS[:6])
    cfg = tiny_config(root, MODEL, n_ctx=32)
    cfg.evaluate.samples, cfg.evaluate.prompts = 1, ["The"]
    (root / "params.yaml").write_text(yaml.safe_dump(tm_config.to_dict(cfg)))
    report = evaluate(cfg, MODEL, compare=False)
    return {"root": root, "report": report, "other_weights": tiny_export_factory(1) / "model.safetensors"}


@pytest.fixture
def project(evaluated, tmp_path, monkeypatch):
    """A fresh copy of the evaluated project (tests edit the export)."""
    root = tmp_path / "proj"
    shutil.copytree(evaluated["root"], root)
    params = root / "params.yaml"  # its paths are absolute: point them at the copy
    params.write_text(params.read_text().replace(str(evaluated["root"]), str(root)))
    monkeypatch.chdir(root)
    return root


def publish(root: Path, bucket: str) -> int:
    return textmill(["publish", MODEL, "--root", bucket, "--params", str(root / "params.yaml"), "--no-progress"])


def test_evaluate_report_names_the_export_it_scored(evaluated):
    export = evaluated["root"] / "models" / "export" / MODEL
    entries = file_entries(export)
    identity = evaluated["report"]["export"]
    assert identity["content_hash"] == content_hash(entries)
    assert identity["files"] == {e["path"]: e["sha256"] for e in entries}
    on_disk = json.loads((evaluated["root"] / "reports" / "eval" / f"{MODEL}.json").read_text())
    assert on_disk["export"] == identity


def edit_config(export: Path) -> str:
    cfg = json.loads((export / "config.json").read_text())
    (export / "config.json").write_text(json.dumps({**cfg, "n_positions": 1}))  # a version no node could serve
    return "changed since: 'config.json'"


def add_file(export: Path) -> str:
    (export / "notes.txt").write_text("added after evaluate")
    return "added since: 'notes.txt'"


def remove_file(export: Path) -> str:
    (export / "generation_config.json").unlink()
    return "removed since: 'generation_config.json'"


@pytest.mark.parametrize("change", [edit_config, add_file, remove_file, "swap_weights"], ids=lambda c: getattr(c, "__name__", c))
def test_publish_refuses_an_export_changed_after_evaluate(project, evaluated, tmp_path, capsys, change):
    bucket = str(tmp_path / "bucket")
    export = project / "models" / "export" / MODEL
    if change == "swap_weights":  # other weights of the same shape: config and tokenizer untouched
        shutil.copy(evaluated["other_weights"], export / "model.safetensors")
        expected = "changed since: 'model.safetensors'"
    else:
        expected = change(export)
    assert publish(project, bucket) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and expected in err
    assert f"reports/eval/{MODEL}.json" in err and f"models/export/{MODEL}" in err and "textmill evaluate tiny" in err
    assert evaluated["report"]["export"]["content_hash"][:12] in err  # both contents named
    assert content_hash(file_entries(export))[:12] in err
    assert not (tmp_path / "bucket").exists()  # nothing uploaded, LATEST untouched


def test_publish_accepts_the_scored_export_and_refuses_a_report_without_identity(project, tmp_path, capsys):
    bucket = str(tmp_path / "bucket")
    assert publish(project, bucket) == 0
    version = Registry(bucket).latest(MODEL)
    manifest = Registry(bucket).manifest(MODEL, version)
    assert "export" not in manifest["metrics"] and manifest["provenance"]["evaluated_export"]
    report = project / "reports" / "eval" / f"{MODEL}.json"
    old = json.loads(report.read_text())
    del old["export"]  # a report from before reports named their export
    report.write_text(json.dumps(old))
    capsys.readouterr()
    assert publish(project, str(tmp_path / "bucket2")) == 2
    assert "does not identify the export it scored" in capsys.readouterr().err


def test_republishing_older_content_says_latest_moves_back(tmp_path):
    reg = Registry(str(tmp_path / "bucket"))
    a, b = make_export(tmp_path / "a", seed=1), make_export(tmp_path / "b", seed=2)
    kw = dict(provenance={}, progress=False)
    v1 = reg.publish("m", a, metrics={"val_loss": 2.0}, **kw).version
    v2 = reg.publish("m", b, metrics={"val_loss": 1.9}, **kw).version
    refused = reg.publish("m", a, metrics={"val_loss": 2.0}, **kw)  # worse than live by more than the tolerance
    assert not refused.moved_latest and not refused.back_to_older and reg.latest("m") == v2
    assert f"identical to the older version {v1}" in refused.message and "LATEST not moved" in refused.message
    back = reg.publish("m", a, metrics={"val_loss": 1.9}, **kw)
    assert back.moved_latest and back.back_to_older and back.version == v1 and reg.latest("m") == v1
    assert f"identical to the older version {v1}" in back.message and f"LATEST moves BACK to it from {v2}" in back.message
    assert reg.versions("m") == [v1, v2]  # nothing uploaded


def test_retrain_reports_only_this_runs_receipts(tmp_path):
    reg = Registry(str(tmp_path / "bucket"))
    kw = dict(metrics={"val_loss": 2.0}, provenance={}, progress=False)
    v1 = reg.publish("m", make_export(tmp_path / "a", seed=1), **kw).version
    v2 = reg.publish("m", make_export(tmp_path / "b", seed=2), **kw).version
    reports = tmp_path / "reports"
    (reports / "publish").mkdir(parents=True)
    earlier = (datetime.now(timezone.utc) - timedelta(hours=1)).isoformat().replace("+00:00", "Z")
    stale = {"model": "m", "root": reg.root, "version": v2, "message": f"m: LATEST -> {v2}", "published_at": earlier}
    (reports / "publish" / "m.json").write_text(json.dumps(stale))
    reg.rollback("m", v1)  # an operator rolled back since; dvc then finds publish@m up to date and skips it
    started = datetime.now(timezone.utc)
    [(model, receipt)] = this_runs_receipts(reports, ["m"], started).items()
    assert receipt["published_this_run"] is False and receipt["live_version"] == v1
    assert "not published by this run" in receipt["message"] and f"LATEST is {v1}" in receipt["message"]
    assert v2 not in receipt["message"] and receipt["previous"] == stale
    # A receipt written during this run is reported as is; a missing one (old receipts had no time) says nothing ran.
    fresh = {**stale, "message": f"m: LATEST -> {v1}", "published_at": started.isoformat().replace("+00:00", "Z")}
    (reports / "publish" / "m.json").write_text(json.dumps(fresh))
    assert this_runs_receipts(reports, ["m"], started)["m"] == fresh
    assert this_runs_receipts(reports, ["x"], started)["x"]["published_this_run"] is False
