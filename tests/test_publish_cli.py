"""`textmill publish / models / rollback / gc` as a user runs them, from a project folder, against both roots."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_registry import make_export
from textmill.cli import main as textmill
from textmill.registry import Registry, export_identity

REPO = Path(__file__).resolve().parent.parent
GIT = ["git", "-c", "user.name=t", "-c", "user.email=t@t.invalid", "-c", "init.defaultBranch=main"]
DVC_LOCK = """schema: '2.0'
stages:
  clean@abstracts:
    cmd: textmill clean abstracts
    deps:
    - path: data/raw/abstracts
      md5: aaaa.dir
    outs:
    - path: data/clean/abstracts
      md5: bbbb.dir
  train@abstracts:
    cmd: textmill train abstracts
    outs:
    - path: models/runs/abstracts
      md5: cccc.dir
  train@legal:
    cmd: textmill train legal
    outs:
    - path: models/runs/legal
      md5: dddd.dir
"""


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with params.yaml, an export and an eval report for model `abstracts`."""
    proj = tmp_path / "proj"
    proj.mkdir()
    shutil.copy(REPO / "params.yaml", proj / "params.yaml")
    make_export(proj / "models" / "export" / "abstracts", seed=1)
    set_loss(proj, 2.0)
    (proj / "dvc.lock").write_text(DVC_LOCK)
    monkeypatch.chdir(proj)
    return proj


def set_loss(proj: Path, loss: float) -> None:
    """An evaluation report for the export as it is now (what `textmill evaluate` writes, minus the scoring)."""
    (proj / "reports" / "eval").mkdir(parents=True, exist_ok=True)
    identity = export_identity(proj / "models" / "export" / "abstracts")
    (proj / "reports" / "eval" / "abstracts.json").write_text(json.dumps({"val_loss": loss, "perplexity": 7.4,
                                                                           "export": identity}))


def receipt(proj: Path) -> dict:
    return json.loads((proj / "reports" / "publish" / "abstracts.json").read_text())


def test_publish_writes_receipt_and_provenance(project, registry_root, capsys):
    subprocess.run([*GIT, "init", "-q"], cwd=project, check=True)
    subprocess.run([*GIT, "add", "params.yaml"], cwd=project, check=True)
    subprocess.run([*GIT, "commit", "-q", "-m", "x"], cwd=project, check=True)
    (project / "params.yaml").write_text((project / "params.yaml").read_text() + "\n")  # dirty tree

    assert textmill(["publish", "abstracts", "--root", registry_root, "--no-progress"]) == 0
    rec = receipt(project)
    assert rec["root"] == registry_root and rec["moved_latest"] and not rec["noop"]
    assert rec["version"] in capsys.readouterr().out
    man = Registry(registry_root).manifest("abstracts", rec["version"])
    assert man["metrics"] == {"val_loss": 2.0, "perplexity": 7.4}
    prov = man["provenance"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=project, capture_output=True, text=True).stdout.strip()
    assert prov["git"] == {"commit": head, "dirty": True}
    assert prov["dvc_lock"] == {"clean@abstracts": {"data/raw/abstracts": "aaaa.dir", "data/clean/abstracts": "bbbb.dir"},
                                "train@abstracts": {"models/runs/abstracts": "cccc.dir"}}
    assert prov["corpora"] == ["abstracts"] and prov["base"]["init"] == "scratch"
    assert prov["export"] == {"run": "models/runs/m", "step": 1}
    assert prov["evaluated_export"] == export_identity(project / "models" / "export" / "abstracts")["content_hash"]
    assert rec["published_at"].endswith("Z")

    # Same content again: a no-op that says so.
    assert textmill(["publish", "abstracts", "--root", registry_root, "--no-progress"]) == 0
    assert receipt(project)["noop"] and "identical content" in capsys.readouterr().out


def test_publish_gate_and_force_from_the_cli(project, registry_root, capsys):
    assert textmill(["publish", "abstracts", "--root", registry_root, "--no-progress"]) == 0
    first = receipt(project)["version"]
    (project / "models" / "export" / "abstracts" / "config.json").write_text('{"v": 2}')
    set_loss(project, 2.5)
    assert textmill(["publish", "abstracts", "--root", registry_root, "--no-progress"]) == 0
    refused = receipt(project)
    assert not refused["moved_latest"] and refused["live_val_loss"] == 2.0 and refused["new_val_loss"] == 2.5
    out = capsys.readouterr().out
    assert "2.5000" in out and "2.0000" in out and "--force" in out
    assert Registry(registry_root).latest("abstracts") == first
    # --set publish.tolerance loosens the gate; a content change makes it a new version.
    (project / "models" / "export" / "abstracts" / "config.json").write_text('{"v": 3}')
    set_loss(project, 2.5)
    assert textmill(["publish", "abstracts", "--root", registry_root, "--no-progress", "--force"]) == 0
    assert receipt(project)["moved_latest"] and Registry(registry_root).latest("abstracts") == receipt(project)["version"]


def test_models_rollback_gc(project, registry_root, capsys):
    versions = []
    for i in range(3):
        (project / "models" / "export" / "abstracts" / "config.json").write_text(json.dumps({"v": i}))
        set_loss(project, 2.0 - i / 10)
        assert textmill(["publish", "abstracts", "--root", registry_root, "--no-progress"]) == 0
        versions.append(receipt(project)["version"])
    capsys.readouterr()
    assert textmill(["models", "ls", registry_root]) == 0
    out = capsys.readouterr().out
    assert "abstracts" in out and versions[-1] in out and "1.8000" in out

    assert textmill(["models", "show", "abstracts", "--root", registry_root]) == 0
    out = capsys.readouterr().out
    assert all(v in out for v in versions) and f"* abstracts@{versions[-1]}" in out
    assert textmill(["models", "show", f"abstracts@{versions[0]}", "--root", registry_root, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["version"] == versions[0]

    assert textmill(["rollback", "abstracts", versions[0], "--root", registry_root]) == 0
    assert f"-> {versions[0]}" in capsys.readouterr().out
    assert textmill(["gc", "abstracts", "--keep", "1", "--root", registry_root]) == 0
    assert Registry(registry_root).versions("abstracts") == sorted([versions[0], versions[-1]])
    assert Registry(registry_root).latest("abstracts") == versions[0]


def test_default_root_comes_from_params(project):
    assert textmill(["publish", "abstracts", "--no-progress", "--set", "publish.root=bucket-from-set"]) == 0
    assert Registry(str(project / "bucket-from-set")).latest("abstracts") == receipt(project)["version"]


def test_user_mistakes_are_one_line_exit_2(project, capsys):
    (project / "reports" / "eval" / "abstracts.json").unlink()
    assert textmill(["publish", "abstracts", "--root", "b"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "reports/eval/abstracts.json" in err and "textmill evaluate abstracts" in err
    set_loss(project, 2.0)
    (project / "reports" / "eval" / "abstracts.json").write_text('{"val_loss": 2.0,')
    assert textmill(["publish", "abstracts", "--root", "b"]) == 2
    assert "invalid JSON" in capsys.readouterr().err
    set_loss(project, 2.0)
    assert textmill(["publish", "nosuchmodel", "--root", "b"]) == 2
    assert "unknown model 'nosuchmodel'" in capsys.readouterr().err
    assert textmill(["rollback", "abstracts", "20200101T000000Z-0123456789ab", "--root", "b"]) == 2
    assert "no complete version abstracts@20200101T000000Z-0123456789ab" in capsys.readouterr().err
    assert textmill(["rollback", "abstracts", "../v0", "--root", "b"]) == 2
    assert "'../v0' is not a version id" in capsys.readouterr().err


def test_publish_cli_subprocess_against_gcs(project, gcs_bucket):
    """The installed `textmill` entry point, in its own process, publishing to the emulator through gcsfs."""
    root = f"{gcs_bucket}/prod"
    proc = subprocess.run([str(Path(sys.executable).parent / "textmill"), "publish", "abstracts", "--root", root],
                          cwd=project, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert Registry(root).latest("abstracts") == receipt(project)["version"]


def test_models_ls_lists_the_others_and_marks_a_broken_model(project, registry_root, capsys):
    from tests.test_untrusted_bucket import entry, plant_version, set_latest

    reg = Registry(registry_root)
    good = reg.publish("abstracts", project / "models" / "export" / "abstracts", metrics={"val_loss": 1.25},
                       provenance={}, progress=False).version
    for model in ("legal", "news"):
        reg.publish(model, make_export(project / model, seed=2), metrics={"val_loss": 2.0}, provenance={}, progress=False)
    set_latest(reg, "legal", b"../../etc\n")                        # LATEST holds a path
    plant_version(reg, "news", [entry("/etc/passwd")])              # live manifest lists an absolute path
    reg.fs.makedirs(reg._path("bad\x1b[31mname"), exist_ok=True)     # a folder name with a terminal escape
    set_latest(reg, "bad\x1b[31mname", f"{good}\n".encode())
    assert textmill(["models", "ls", registry_root]) == 1
    out, err = capsys.readouterr()
    rows = {line[2:].split()[0]: line for line in out.splitlines()[1:]}
    assert rows["abstracts"].startswith("  ") and good in rows["abstracts"] and "1.2500" in rows["abstracts"]
    assert rows["legal"].startswith("! ") and "BROKEN" in rows["legal"] and "not a version id" in rows["legal"]
    assert rows["news"].startswith("! ") and "/etc/passwd" in rows["news"]
    assert "\x1b" not in out and "'bad\\x1b[31mname'" in out
    assert "3 broken model(s)" in err
