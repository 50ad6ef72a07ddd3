"""`dvc repro` end to end on the bundled corpora, in a scratch copy of the repo: clean → base → prepare → train → convert →
evaluate → publish, with fewer training steps than `make repro` so it fits the test budget."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from tests.conftest import REPO

pytestmark = pytest.mark.slow

COPY = ["configs", "data/raw", "dvc.yaml", "params.yaml", ".dvc/config", ".dvcignore", "pipelines", "training",
        "convert", "textmill", "serving"]


def sh(cmd: list[str], cwd: Path, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, **kw)
    assert r.returncode == 0, f"{' '.join(cmd)} failed:\n{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


@pytest.fixture(scope="module")
def repro(tmp_path_factory):
    root = tmp_path_factory.mktemp("repo")
    for rel in COPY:
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copyfile(src, dst))
    params = yaml.safe_load((root / "params.yaml").read_text())
    params["training"].update(steps=40, eval_interval=20, checkpoint_interval=20, sample_interval=20, warmup_steps=5)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    raw_before = {p: p.read_bytes() for p in (root / "data/raw").rglob("*") if p.is_file()}
    env = {**os.environ, "GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t",
           "GIT_COMMITTER_EMAIL": "t@t"}
    sh(["git", "init", "-q"], root, env=env)
    sh(["git", "add", "-A"], root, env=env)
    sh(["git", "commit", "-qm", "init"], root, env=env)
    result = sh(["dvc", "repro"], root, env=env, timeout=900)
    return root, params, raw_before, result


def test_every_stage_ran_and_raw_is_untouched(repro):
    root, params, raw_before, _ = repro
    lock = yaml.safe_load((root / "dvc.lock").read_text())["stages"]
    for model in params["models"]:
        for stage in ("base", "prepare", "train", "convert", "evaluate", "publish"):
            assert f"{stage}@{model}" in lock
    for corpus in params["corpora"]:
        assert f"clean@{corpus}" in lock
    assert {p: p.read_bytes() for p in (root / "data/raw").rglob("*") if p.is_file()} == raw_before


def test_validation_loss_falls_and_evaluate_agrees(repro):
    root, params, *_ = repro
    for model in params["models"]:
        train = json.loads((root / f"reports/train/{model}.json").read_text())
        by_step = {int(k): v for k, v in train["val_loss_by_step"].items()}
        assert by_step[max(by_step)] < by_step[min(by_step)], by_step
        ev = json.loads((root / f"reports/eval/{model}.json").read_text())
        assert ev["abs_diff"] < 1e-3


def test_each_model_is_published_and_listed(repro):
    root, params, *_ = repro
    for model in params["models"]:
        receipt = json.loads((root / f"reports/publish/{model}.json").read_text())
        latest = (root / ".bucket" / model / "LATEST").read_text().strip()
        assert receipt["version"] == latest and receipt["moved_latest"]
        manifest = json.loads((root / ".bucket" / model / latest / "MANIFEST.json").read_text())
        assert {"model.safetensors", "config.json", "tokenizer.json"} <= {f["path"] for f in manifest["files"]}
    out = sh(["textmill", "models", "ls", ".bucket"], root).stdout
    for model in params["models"]:
        assert model in out


def test_second_repro_is_a_no_op(repro):
    root, *_ = repro
    out = sh(["dvc", "repro"], root).stdout
    assert "didn't change" in out or "up to date" in out, out
    assert "Running stage" not in out


def test_dvc_exp_run_recomposes_params_from_configs(repro):
    # DVC's Hydra integration: `-S` overrides configs/ into params.yaml, then only the affected stages rerun.
    root, *_ = repro
    before = json.loads((root / "reports/clean/legal.json").read_text())
    out = sh(["dvc", "exp", "run", "-S", "corpora.legal.min_chars=400", "clean@legal"], root).stdout
    assert "Running stage 'clean@legal'" in out and "clean@abstracts" not in out
    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["corpora"]["legal"]["min_chars"] == 400
    after = json.loads((root / "reports/clean/legal.json").read_text())
    assert after["docs_out"] < before["docs_out"]
    assert after["drops"].get("too_short", 0) > before["drops"].get("too_short", 0)
