"""Resume after SIGKILL equals an uninterrupted run; two replicas under MirroredStrategy equal one device (subprocesses)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.checkpoints import kill_after_first_checkpoint
from tests.test_train_tf import REPO, load_cfg, make_env, metric

ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2"}


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    from textmill.training.tf import checkpoint
    from textmill.training.tf.trainer import train

    root = make_env(tmp_path, steps=60, checkpoint_interval=5, eval_interval=10, sample_interval=10)
    cfg = load_cfg(root)
    cfg.paths = _ref_paths(root)  # same data and base, another run folder
    reference = train(cfg, "m", progress=False)
    step = kill_after_first_checkpoint(root, ENV)
    assert 0 < step < 60, f"the run was not killed mid-way (committed step {step})"
    done = subprocess.run([sys.executable, "-m", "textmill.cli", "train", "m", "--no-progress"], cwd=root, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((root / "reports/train/m.json").read_text())

    ref_curve, curve = metric(root, "train_loss", "ref/reports"), metric(root, "train_loss")
    assert sorted(curve) == sorted(ref_curve) == list(range(1, 61))  # no step missing or logged twice
    np.testing.assert_allclose([curve[s] for s in range(1, 61)], [ref_curve[s] for s in range(1, 61)], atol=1e-6)
    assert resumed["val_loss_by_step"].keys() == reference["val_loss_by_step"].keys()
    for s, loss in reference["val_loss_by_step"].items():
        assert resumed["val_loss_by_step"][s] == pytest.approx(loss, abs=1e-6)
    assert (root / "models/runs/m/samples.txt").read_text() == (root / "ref/runs/m/samples.txt").read_text()
    mine, ref = checkpoint.read(root / "models/runs/m/model-60"), checkpoint.read(root / "ref/runs/m/model-60")
    assert mine.keys() == ref.keys()
    for name in ref:
        np.testing.assert_allclose(mine[name], ref[name], atol=1e-6, err_msg=name)


def _ref_paths(root: Path):
    from textmill.config import PathsConfig

    return PathsConfig(tokens=str(root / "data/tokens"), base=str(root / "models/base"), runs=str(root / "ref/runs"),
                       reports=str(root / "ref/reports"))


MIRRORED = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import tensorflow as tf
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    from tests.test_train_tf import load_cfg
    from textmill.training.tf.trainer import train
    precision = sys.argv[2] if len(sys.argv) > 2 else "float32"
    report = train(load_cfg(Path(sys.argv[1]), steps=4, batch_size=2, grad_accum=2, distribute="mirrored",
                            eval_interval=2, precision=precision), "m", progress=False)
    print(json.dumps(report))
""")


def test_two_replicas_under_mirrored_strategy_match_one_device(tmp_path):
    from textmill.training.tf.trainer import train

    root = make_env(tmp_path)
    done = subprocess.run([sys.executable, "-c", MIRRORED, str(root)], cwd=REPO, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads(done.stdout.strip().splitlines()[-1])
    assert two["replicas"] == 2
    cfg = load_cfg(root, steps=4, batch_size=4, grad_accum=2, distribute="none", eval_interval=2)
    cfg.paths = _ref_paths(root)
    one = train(cfg, "m", progress=False)
    assert one["replicas"] == 1 and one["tokens_seen"] == two["tokens_seen"]
    curve_two, curve_one = metric(root, "train_loss"), metric(root, "train_loss", "ref/reports")
    np.testing.assert_allclose([curve_two[s] for s in range(1, 5)], [curve_one[s] for s in range(1, 5)], atol=2e-5)
    for s in ("2", "4"):
        assert two["val_loss_by_step"][s] == pytest.approx(one["val_loss_by_step"][s], abs=2e-5)


def test_mixed_float16_under_mirrored_strategy_trains(tmp_path):
    # The P100 preset (fp16 + dynamic loss scaling) on several devices: the skip-on-overflow update must not use control
    # flow around mirrored assigns (TF refuses that sync point inside tf.cond).
    root = make_env(tmp_path)
    done = subprocess.run([sys.executable, "-c", MIRRORED, str(root), "mixed_float16"], cwd=REPO, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["replicas"] == 2 and report["final_step"] == 4 and np.isfinite(report["val_loss"])
