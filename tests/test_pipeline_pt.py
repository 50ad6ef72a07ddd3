"""`dvc exp run -S training.backend=pt` end to end in a scratch copy of the repo (the licence corpus only, a few steps):
clean -> base -> prepare -> train (PyTorch) -> convert -> evaluate -> publish, through the real dvc.yaml."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from tests.conftest import REPO
from tests.test_pipeline_e2e import COPY, sh

pytestmark = pytest.mark.slow

OVERRIDES = ["training.backend=pt", "training.steps=6", "training.eval_interval=3", "training.checkpoint_interval=3",
             "training.sample_interval=3", "training.warmup_steps=1", "training.batch_size=4", "model.n_ctx=64",
             "model.vocab_size=512", "evaluate.samples=1", "evaluate.sample_tokens=8"]


def test_dvc_exp_run_with_the_pytorch_backend(tmp_path):
    root = tmp_path / "repo"
    for rel in COPY:
        src, dst = REPO / rel, root / rel
        dst.parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__")) if src.is_dir()
         else shutil.copyfile(src, dst))
    # One model on the small licence corpus: drop the abstracts corpus and model from the Hydra root.
    config = (root / "configs/config.yaml").read_text()
    config = config.replace("  - corpus@corpora.abstracts: abstracts\n", "")
    config = config.replace('  abstracts:\n    corpora: [abstracts]\n    description: "Debian package descriptions in six '
                            'languages (arXiv-abstract-shaped JSON Lines)"\n', "")
    (root / "configs/config.yaml").write_text(config)
    assert "abstracts" not in config
    env = {**os.environ, "PYTHONPATH": str(root), "OMP_NUM_THREADS": "1", "GIT_AUTHOR_NAME": "t",
           "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    sh(["textmill", "params"], root, env=env)
    sh(["git", "init", "-q"], root, env=env)
    sh(["git", "add", "-A"], root, env=env)
    sh(["git", "commit", "-qm", "init"], root, env=env)
    cmd = ["dvc", "exp", "run"] + [a for o in OVERRIDES for a in ("-S", o)]
    sh(cmd, root, env=env, timeout=900)

    params = yaml.safe_load((root / "params.yaml").read_text())
    assert params["training"]["backend"] == "pt" and list(params["models"]) == ["legal"]
    train = json.loads((root / "reports/train/legal.json").read_text())
    assert train["backend"] == "pt" and train["final_step"] == 6
    assert train["val_loss"] < train["initial_val_loss"]
    assert sorted(p.suffix for p in (root / "models/runs/legal").glob("model-6.*")) == [".pt", ".safetensors"]
    record = json.loads((root / "models/export/legal/textmill.json").read_text())
    assert record["source"]["backend"] == "pt" and record["verify"]["models"]["greedy_match"]
    ev = json.loads((root / "reports/eval/legal.json").read_text())
    assert ev["abs_diff"] < 1e-3 and ev["step"] == train["best_step"]
    receipt = json.loads((root / "reports/publish/legal.json").read_text())
    assert receipt["version"] == (root / ".bucket/legal/LATEST").read_text().strip()
