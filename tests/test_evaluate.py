"""train (TF, real trainer) -> convert --step best --verify -> evaluate (transformers only): the DVC chain on a tiny model."""

from __future__ import annotations

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from safetensors import safe_open

from textmill.convert.cli import main as convert_main
from textmill import config as textmill_config
from textmill.errors import UserError
from tests.fixtures.checkpoints import (TEXTS, random_weights, tiny_config, tiny_hparams, tiny_tokenizer,
                                        write_openai_release, write_tokens)
from textmill.weights import is_model_weight
from textmill.training import data
from textmill.training.evaluate import evaluate

NAME = "tiny"
VAL_TEXTS = ["Das Paket enthält Werkzeuge für die Verarbeitung von Text und Daten.",
             "This software is provided as is, without warranty of any kind, express or implied.",
             "Le paquet fournit une bibliothèque pour lire les fichiers de configuration."] * 4


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """base (OpenAI layout) + tokens -> 6 real TF training steps (val every 2) -> convert the best step with --verify."""
    from textmill.training.tf.trainer import train

    root = tmp_path_factory.mktemp("pipeline")
    cfg = tiny_config(root, NAME, steps=6, batch_size=4, n_ctx=32, eval_interval=2, checkpoint_interval=2,
                      learning_rate=3e-3, warmup_steps=1)
    tok = tiny_tokenizer()
    hp = tiny_hparams(tok)
    write_openai_release(root / "models/base" / NAME, hp, tok, random_weights(hp, 3))
    write_tokens(root / "data/tokens" / NAME, tok, TEXTS, VAL_TEXTS)
    report = train(cfg, NAME, progress=False)
    run, export = root / "models/runs" / NAME, root / "models/export" / NAME
    assert convert_main([str(run), str(export), "--step", "best", "--verify", "--tokens",
                         str(root / "data/tokens" / NAME)]) == 0
    return {"root": root, "cfg": cfg, "report": report, "run": run, "export": export, "hp": hp}


def test_convert_textmill_run_best_step(pipeline):
    state = json.loads((pipeline["run"] / "textmill_state.json").read_text())
    record = json.loads((pipeline["export"] / "textmill.json").read_text())
    best = state["best_step"]
    assert best is not None and record["source"]["layout"] == "textmill" and record["step"] == best
    assert record["source"]["prefix"].endswith(f"model-{best}")
    assert record["val_loss"] == pytest.approx(state["val_loss_by_step"][str(best)], abs=0)
    # The trainer's optimizer state and its own variables are skipped, and listed.
    skipped = record["skipped_variables"]
    assert not any(is_model_weight(v) for v in skipped) and sum("model/wte" in v for v in skipped) >= 2
    assert record["verify"]["models"]["logits_max_abs_diff"] < 1e-4
    assert record["verify"]["tokenizer"]["sample"].endswith("val.bin[:%d]" % min(2000, data.eval_token_count(
        data.open_tokens(pipeline["root"] / "data/tokens" / NAME, "val")) + 1))


def test_convert_best_reads_best_step_not_latest(pipeline, tmp_path):
    """A run whose best validation was at an earlier, kept checkpoint: --step best converts that one."""
    from textmill.training.tf import checkpoint

    run = Path(shutil.copytree(pipeline["run"], tmp_path / "run"))
    state = json.loads((run / "textmill_state.json").read_text())
    earlier = min(int(s) for s in state["val_loss_by_step"] if (run / f"model-{s}.index").is_file())
    assert earlier < state["step"]
    state["best_step"] = earlier
    (run / "textmill_state.json").write_text(json.dumps(state))
    assert convert_main([str(run), str(tmp_path / "export"), "--step", "best"]) == 0
    record = json.loads((tmp_path / "export" / "textmill.json").read_text())
    assert record["step"] == earlier and record["val_loss"] == state["val_loss_by_step"][str(earlier)]
    with safe_open(str(tmp_path / "export" / "model.safetensors"), "np") as f:
        wte = f.get_tensor("transformer.wte.weight")
    np.testing.assert_array_equal(wte, checkpoint.read(run / f"model-{earlier}", ["model/wte"])["model/wte"])
    assert not np.array_equal(wte, checkpoint.read(run / f"model-{state['step']}", ["model/wte"])["model/wte"])


def tf_val_loss(prefix, hp, tokens, n_ctx) -> float:
    """The same validation protocol computed with the TF model directly (not through the trainer)."""
    import tensorflow as tf

    from textmill.training.tf.model import load

    model = load(prefix, hp)

    def losses():
        for x, y, w in data.eval_batches(tokens, n_ctx, 3):
            ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x))
            yield ce.numpy(), w

    return data.mean_loss(losses())


def test_evaluate_matches_tf_loss_and_writes_reports(pipeline):
    cfg, root = pipeline["cfg"], pipeline["root"]
    report = evaluate(cfg, NAME)
    step = json.loads((pipeline["export"] / "textmill.json").read_text())["step"]
    tokens = data.open_tokens(root / "data/tokens" / NAME, "val")
    tf_loss = tf_val_loss(pipeline["run"] / f"model-{step}", pipeline["hp"], tokens, 32)
    assert abs(report["val_loss"] - tf_loss) < 1e-3
    assert report["train_val_loss"] == pipeline["report"]["val_loss_by_step"][str(step)]
    assert report["abs_diff"] < cfg.evaluate.loss_tolerance and report["step"] == step
    assert report["perplexity"] == pytest.approx(np.exp(report["val_loss"]))
    assert report["tokens"] == len(tokens) - 1 and report["n_ctx"] == 32
    written = json.loads((root / "reports/eval" / f"{NAME}.json").read_text())
    assert written["val_loss"] == report["val_loss"] and written["model"] == NAME
    samples = (root / "reports/eval" / f"{NAME}-samples.md").read_text()
    assert samples.count("Sample ") == 4 and "## Prompt: 'Das Paket'" in samples
    # Fixed seeds: a second run writes the same samples.
    evaluate(cfg, NAME)
    assert (root / "reports/eval" / f"{NAME}-samples.md").read_text() == samples


def test_evaluate_fails_when_export_disagrees_with_trainer(pipeline, tmp_path):
    cfg = pipeline["cfg"]
    train_report = pipeline["root"] / "reports/train" / f"{NAME}.json"
    original = train_report.read_text()
    eval_dir = pipeline["root"] / "reports/eval"
    before = {p.name: p.read_bytes() for p in eval_dir.iterdir()} if eval_dir.exists() else {}
    step = json.loads((pipeline["export"] / "textmill.json").read_text())["step"]
    report = json.loads(original)
    report["val_loss_by_step"][str(step)] += 0.01
    train_report.write_text(json.dumps(report))
    try:
        with pytest.raises(UserError, match=r"differs from the trainer's .* > evaluate.loss_tolerance=0.001"):
            evaluate(cfg, NAME)
    finally:
        train_report.write_text(original)
    after = {p.name: p.read_bytes() for p in eval_dir.iterdir()} if eval_dir.exists() else {}
    assert after == before


def test_evaluate_missing_export_is_user_error(pipeline, tmp_path):
    cfg = copy.deepcopy(pipeline["cfg"])
    cfg.paths.export = str(tmp_path / "export")
    cfg.paths.reports = str(tmp_path / "reports")
    with pytest.raises(UserError, match="no exported model here; run `textmill convert`"):
        evaluate(cfg, NAME)
    assert not (tmp_path / "reports").exists()


def test_evaluate_cli_never_imports_tensorflow(pipeline, tmp_path):
    params = tmp_path / "params.yaml"
    OmegaConf.save(OmegaConf.create(textmill_config.to_dict(pipeline["cfg"])), params)
    code = ("import sys; from textmill.cli import main; rc = main(['evaluate', 'tiny', '--params', sys.argv[1]]); "
            "assert 'tensorflow' not in sys.modules, 'evaluate imported TensorFlow'; sys.exit(rc)")
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code, str(params)], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert json.loads(out.stdout.strip().splitlines()[-1])["model"] == NAME
