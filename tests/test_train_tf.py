"""The TF trainer end to end on a tiny GPT-2: run folder layout, reports, validation, best/early stopping, fingerprints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
import yaml

from tests.fixtures.checkpoints import tf_val_loss
from textmill import config as config_mod
from textmill import tokenizer as tok_io
from textmill import weights
from textmill.errors import UserError
from textmill.sizes import Hparams

REPO = Path(__file__).resolve().parent.parent
HP = Hparams(n_vocab=300, n_ctx=32, n_embd=32, n_head=2, n_layer=2)
TRAINING = dict(steps=30, batch_size=4, grad_accum=1, learning_rate=3e-3, warmup_steps=5, eval_interval=10,
                checkpoint_interval=10, sample_interval=10, sample_length=8, max_to_keep=2, seed=7, log_interval=5)
RUN_FILES = {"checkpoint", "counter", "hparams.json", "encoder.json", "vocab.bpe", "samples.txt", "textmill_state.json"}


def licence_paragraphs() -> list[str]:
    """Real English text bundled in the repo: the licence corpus, one paragraph per document."""
    text = "\n\n".join(p.read_text(encoding="utf-8", errors="replace") for p in sorted((REPO / "data/raw/legal").glob("*.txt")))
    return [p.strip() for p in re.split(r"\n\s*\n", text) if len(p.strip()) > 40]


def make_env(root: Path, *, hp: Hparams = HP, **training) -> Path:
    """A repo-shaped folder: models/base/m (OpenAI layout, scratch weights), data/tokens/m, params.yaml. Returns it."""
    from textmill.training.tf import checkpoint

    docs = licence_paragraphs()
    tok = tok_io.train_bpe(docs, hp.n_vocab)
    eot = tok_io.eot_id(tok)
    base = root / "models/base/m"
    base.mkdir(parents=True)
    tok_io.save_openai(tok, base)
    (base / "hparams.json").write_text(json.dumps(hp.to_json()), encoding="utf-8")
    checkpoint.save(dict(weights.init_numpy(hp, 0)), base / "model.ckpt")
    checkpoint.write_checkpoint_file(base, "model.ckpt", ["model.ckpt"])
    split = {"train": [], "val": []}
    for i, doc in enumerate(docs):  # every 10th paragraph is held out
        split["val" if i % 10 == 3 else "train"] += tok.encode(doc).ids + [eot]
    tokens = root / "data/tokens/m"
    tokens.mkdir(parents=True)
    for name, ids in split.items():
        np.asarray(ids, np.uint16).tofile(tokens / f"{name}.bin")
    meta = {"dtype": "uint16", "vocab_size": tok_io.vocab_size(tok), "eot_id": eot,
            "tokens": {k: len(v) for k, v in split.items()}, "tokenizer_sha256": tok_io.checksum(tok)}
    (tokens / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))
    params["models"] = {"m": {"corpora": [], "description": "test"}}
    params["training"].update({**TRAINING, **training})
    (root / "params.yaml").write_text(yaml.safe_dump(params), encoding="utf-8")
    return root


def load_cfg(root: Path, **overrides) -> config_mod.Config:
    """params.yaml of `root` with every path made absolute (in-process runs do not chdir)."""
    sets = [f"paths.{k}={root / v}" for k, v in config_mod.to_dict(config_mod.Config())["paths"].items()]
    sets += [f"training.{k}={v}" for k, v in overrides.items()]
    return config_mod.load(root / "params.yaml", sets)


def metric(root: Path, name: str, reports: str = "reports") -> dict[int, float]:
    path = root / reports / "train/m/plots/metrics" / f"{name}.tsv"
    rows = path.read_text(encoding="utf-8").splitlines()
    head = rows[0].split("\t")
    return {int(r.split("\t")[head.index("step")]): float(r.split("\t")[head.index(name)]) for r in rows[1:]}


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from textmill.training.tf.trainer import train

    root = make_env(tmp_path_factory.mktemp("train"))
    report = train(load_cfg(root), "m", progress=False)
    return root, report


def test_run_folder_has_gpt2_simple_layout(trained):
    root, report = trained
    run = root / "models/runs/m"
    ckpts = {f"model-{s}.{ext}" for s in (20, 30) for ext in ("index", "data-00000-of-00001")}
    assert {p.name for p in run.iterdir()} == RUN_FILES | ckpts  # max_to_keep=2 pruned model-10
    assert (run / "counter").read_text().strip() == "30"
    assert (run / "checkpoint").read_text().splitlines()[0] == 'model_checkpoint_path: "model-30"'
    assert json.loads((run / "hparams.json").read_text()) == HP.to_json()
    assert re.findall(r"======== step (\d+) ========", (run / "samples.txt").read_text()) == ["10", "20", "30"]


def test_checkpoint_holds_weights_and_resume_state(trained):
    from textmill.training.tf import checkpoint

    root, _ = trained
    names = checkpoint.list_variables(root / "models/runs/m/model-30")
    model_vars = {n: s for n, s in names.items() if n.startswith("model/")}
    assert model_vars == weights.openai_shapes(HP)
    assert names["textmill/opt/m/model/h0/attn/c_attn/w"] == (1, 32, 96)
    assert checkpoint.read(root / "models/runs/m/model-30", ["textmill/step"])["textmill/step"] == 30
    assert all(weights.is_model_weight(n) == n.startswith("model/") for n in names)  # the converter skips ours


def test_report_and_validation_loss_falls(trained):
    root, report = trained
    on_disk = json.loads((root / "reports/train/m.json").read_text())
    assert on_disk == json.loads(json.dumps(report))
    assert report["final_step"] == 30 and report["tokens_seen"] == 30 * 4 * 32
    assert set(report["val_loss_by_step"]) == {"10", "20", "30"}
    assert report["val_loss"] == report["val_loss_by_step"]["30"]
    assert report["val_loss"] < report["initial_val_loss"] - 1.0  # ln(300)=5.7 at init; it learns the licences
    assert report["best_val_loss"] == min(report["val_loss_by_step"].values())
    assert report["tokens_per_s"] > 0 and report["peak_memory_bytes"] is None  # CPU
    assert sorted(metric(root, "train_loss")) == list(range(1, 31))
    assert metric(root, "val_loss")[30] == pytest.approx(report["val_loss"])
    assert sorted(metric(root, "lr")) == list(range(1, 31))


def test_val_loss_is_the_shared_protocol(trained):
    """The trainer's final val loss equals a fresh evaluation of model-30 with training.data's protocol."""
    root, report = trained
    run_loss = tf_val_loss(root / "models/runs/m", root / "data/tokens/m", n_ctx=32, batch_size=3)
    assert run_loss == pytest.approx(report["val_loss"], abs=1e-5)



def test_val_loss_is_float32_whatever_the_training_precision(tmp_path):
    # evaluate (transformers, float32) must reproduce the trainer's val loss to 1e-3; a bf16 eval was ~3e-3 off.
    import tensorflow as tf

    from textmill.training import data
    from textmill.training.tf.model import load
    from textmill.training.tf.trainer import train

    root = make_env(tmp_path)
    report = train(load_cfg(root, steps=4, eval_interval=4, checkpoint_interval=4, sample_interval=0,
                            precision="bfloat16"), "m", progress=False)
    model = load(root / "models/runs/m")  # float32 compute
    val = data.open_tokens(root / "data/tokens/m", "val")
    losses = ((tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=model(x)).numpy(), w)
              for x, y, w in data.eval_batches(val, 32, 3))
    assert report["val_loss"] == pytest.approx(data.mean_loss(losses), abs=1e-5)

def test_changed_settings_are_refused_then_restart_works(trained, capsys):
    from textmill.training.train import main

    root, _ = trained
    args = ["m", "--params", str(root / "params.yaml"), "--no-progress"]
    paths = [f"--set=paths.{k}={v}" for k, v in (("tokens", root / "data/tokens"), ("base", root / "models/base"),
                                                 ("runs", root / "models/runs"), ("reports", root / "reports"))]
    with pytest.raises(UserError, match=r"other settings.*--restart"):
        main(args + paths + ["--set=training.learning_rate=0.01"])
    # Same settings: the finished run is recognised and nothing retrains (the report is rewritten unchanged).
    assert main(args + paths) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final_step"] == 30
    with pytest.raises(UserError, match=r"other settings.*--restart"):  # a PyTorch run is another trajectory
        main(args + paths + ["--set=training.backend=pt"])



def test_restart_if_stale_starts_over_when_settings_change(trained, capsys):
    # What `dvc repro` runs: the run folder persists (so a killed run resumes), but changed settings mean a fresh run.
    from textmill.training.train import main

    root, _ = trained
    args = ["m", "--params", str(root / "params.yaml"), "--no-progress", "--restart-if-stale"]
    args += [f"--set=paths.{k}={v}" for k, v in (("tokens", root / "data/tokens"), ("base", root / "models/base"),
                                                 ("runs", root / "models/runs"), ("reports", root / "reports"))]
    assert main(args + ["--set=training.steps=12"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["final_step"] == 12
    state = json.loads((root / "models/runs/m/textmill_state.json").read_text())
    assert state["step"] == 12 and max(map(int, state["val_loss_by_step"])) == 12

def test_best_checkpoint_survives_max_to_keep_and_early_stopping(tmp_path):
    from textmill.training.tf.trainer import Session

    root = make_env(tmp_path)
    session = Session(load_cfg(root, steps=40, eval_interval=5, checkpoint_interval=5, max_to_keep=1,
                                early_stopping_patience=3, sample_interval=0), "m", progress=False)
    # A validation curve with its minimum at step 10, as over-fitting gives; real weights and checkpoints otherwise.
    scripted = iter([5.0, 4.0, 3.0, 3.5, 3.6, 3.7, 3.8])
    session.trainer.val_loss = lambda tokens: next(scripted)
    report = session.run()
    assert report["stopped_early"] and report["final_step"] == 25  # 3 evals without improvement after step 10
    assert report["best_step"] == 10 and report["val_loss"] == 3.7
    run = root / "models/runs/m"
    assert sorted(p.name for p in run.glob("*.index")) == ["model-10.index", "model-25.index"]
    assert json.loads((run / "textmill_state.json").read_text())["kept"] == ["model-10", "model-25"]


def test_fingerprint_changes_with_the_base_weights(tmp_path):
    # Pointing base.uri at another checkpoint of the same size must not "resume" the old run under dvc repro.
    from textmill.training.tf import checkpoint
    from textmill.training.tf.trainer import fingerprint

    root = make_env(tmp_path)
    cfg = load_cfg(root)
    meta, base = root / "data/tokens/m/meta.json", root / "models/base/m/model.ckpt.index"
    before = fingerprint(HP, cfg.training, 32, 1, meta, base)
    assert fingerprint(HP, cfg.training, 32, 1, meta, base) == before
    checkpoint.save(dict(weights.init_numpy(HP, 99)), root / "models/base/m/model.ckpt")  # other weights, same shapes
    assert fingerprint(HP, cfg.training, 32, 1, meta, base) != before
