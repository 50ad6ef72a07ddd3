"""The PyTorch backend end to end on a tiny GPT-2: run folder, report, shared validation protocol, export + evaluate,
resume after SIGKILL, Hugging Face bases, the memory planner."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.fixtures.checkpoints import kill_after_first_checkpoint, tf_val_loss
from tests.test_train_tf import HP, REPO, load_cfg, make_env, metric
from textmill.errors import UserError

# One intra-op thread: the tiny model gains nothing from more, and a shared 2-core machine makes OpenMP threads spin.
ENV = {**os.environ, "PYTHONPATH": str(REPO), "TF_CPP_MIN_LOG_LEVEL": "2", "OMP_NUM_THREADS": "1"}
PT = dict(backend="pt", steps=12, eval_interval=6, checkpoint_interval=4, sample_interval=4)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def trained(tmp_path_factory, one_thread):
    from textmill.training.pt.trainer import train

    root = make_env(tmp_path_factory.mktemp("pt"), **PT)
    report = train(load_cfg(root), "m", progress=False)
    return root, report


def test_run_folder_report_and_curves(trained):
    root, report = trained
    run = root / "models/runs/m"
    ckpts = {f"model-{s}.{ext}" for s in (8, 12) for ext in ("safetensors", "pt")}  # max_to_keep=2
    assert {p.name for p in run.iterdir()} == {"counter", "hparams.json", "encoder.json", "vocab.bpe", "samples.txt",
                                               "textmill_state.json"} | ckpts
    state = json.loads((run / "textmill_state.json").read_text())
    assert state["backend"] == "pt" and state["kept"] == ["model-8", "model-12"]
    assert re.findall(r"======== step (\d+) ========", (run / "samples.txt").read_text()) == ["4", "8", "12"]
    assert set(report["val_loss_by_step"]) == {"6", "12"}
    assert json.loads((root / "reports/train/m.json").read_text()) == json.loads(json.dumps(report))
    assert report["backend"] == "pt" and report["final_step"] == 12 and report["tokens_seen"] == 12 * 4 * 32
    assert report["val_loss"] < report["initial_val_loss"] - 0.5
    assert report["memory_plan"]["micro_batch"] == 4 and report["peak_rss_bytes"] > 0
    assert sorted(metric(root, "train_loss")) == list(range(1, 13))
    assert metric(root, "val_loss")[12] == pytest.approx(report["val_loss"])


def test_model_uses_sdpa_attention_and_openai_math():
    import torch

    from textmill.training.pt.trainer import build_model

    model = build_model(HP, 0, torch.device("cpu"))
    cfg = model.config
    assert cfg._attn_implementation == "sdpa" and cfg.activation_function == "gelu_new"
    assert cfg.resid_pdrop == cfg.embd_pdrop == cfg.attn_pdrop == 0.0 and cfg.layer_norm_epsilon == 1e-5
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()  # tied


def test_initial_val_loss_matches_the_tf_model_of_the_base(trained):
    """The OpenAI-layout base read into GPT2LMHeadModel is the same function TF computes (the shared protocol)."""
    root, report = trained
    base_loss = tf_val_loss(root / "models/base/m", root / "data/tokens/m", n_ctx=32, batch_size=4)
    assert report["initial_val_loss"] == pytest.approx(base_loss, abs=1e-5)


def test_convert_then_evaluate_reproduces_the_trainers_val_loss(trained):
    from textmill.convert.cli import main as convert_main
    from textmill.training.evaluate import evaluate

    root, report = trained
    export = root / "models/export/m"
    assert convert_main([str(root / "models/runs/m"), str(export), "--step", "best", "--verify",
                         "--tokens", str(root / "data/tokens/m")]) == 0
    record = json.loads((export / "textmill.json").read_text())
    assert record["source"]["backend"] == "pt" and record["step"] == report["best_step"]
    assert record["val_loss"] == report["val_loss_by_step"][str(report["best_step"])]
    assert record["verify"]["models"]["logits_max_abs_diff"] < 1e-5 and record["verify"]["models"]["greedy_match"]
    assert {"config.json", "model.safetensors", "tokenizer.json", "vocab.json", "merges.txt"} <= \
        {p.name for p in export.iterdir()}
    cfg = load_cfg(root)
    assert cfg.evaluate.sample_tokens + 2 > HP.n_ctx  # samples would run past the 32 positions: they stop there
    out = evaluate(cfg, "m")
    assert out["abs_diff"] < 1e-3 and out["step"] == report["best_step"]
    samples = (root / "reports/eval/m-samples.md").read_text()
    assert samples.count("Sample 1 (seed") == len(cfg.evaluate.prompts)


def test_resume_after_sigkill_equals_uninterrupted_run(tmp_path):
    from textmill.config import PathsConfig
    from textmill.training.pt.trainer import train

    root = make_env(tmp_path, **{**PT, "steps": 12, "checkpoint_interval": 2, "eval_interval": 6,
                                 "grad_accum": 2, "batch_size": 2})
    cfg = load_cfg(root)
    cfg.paths = PathsConfig(tokens=str(root / "data/tokens"), base=str(root / "models/base"), runs=str(root / "ref/runs"),
                            reports=str(root / "ref/reports"))
    reference = train(cfg, "m", progress=False)
    step = kill_after_first_checkpoint(root, ENV, entry="textmill", timeout=180)
    assert 0 < step < 12, f"the run was not killed mid-way (committed step {step})"
    done = subprocess.run([sys.executable, "-m", "textmill", "train", "m", "--no-progress"], cwd=root, env=ENV,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    resumed = json.loads((root / "reports/train/m.json").read_text())
    ref_curve, curve = metric(root, "train_loss", "ref/reports"), metric(root, "train_loss")
    assert sorted(curve) == sorted(ref_curve) == list(range(1, 13))
    np.testing.assert_allclose([curve[s] for s in range(1, 13)], [ref_curve[s] for s in range(1, 13)], atol=1e-6)
    for s, loss in reference["val_loss_by_step"].items():
        assert resumed["val_loss_by_step"][s] == pytest.approx(loss, abs=1e-6)
    assert (root / "models/runs/m/samples.txt").read_text() == (root / "ref/runs/m/samples.txt").read_text()
    from safetensors.numpy import load_file

    mine, ref = load_file(root / "models/runs/m/model-12.safetensors"), load_file(root / "ref/runs/m/model-12.safetensors")
    assert mine.keys() == ref.keys()
    for name in ref:
        np.testing.assert_allclose(mine[name], ref[name], atol=1e-6, err_msg=name)


def test_hf_base_trains_with_pt_and_tf_refuses_it_in_one_line(trained, tmp_path, capsys):
    """An exported folder (config.json + model.safetensors + vocab.json/merges.txt) is a base for the PyTorch backend."""
    import shutil

    from textmill.cli import main as cli_main
    from textmill.training.pt.trainer import train

    root, report = trained
    export = root / "models/export/m"
    if not export.exists():
        from textmill.convert.cli import main as convert_main

        convert_main([str(root / "models/runs/m"), str(export)])
    hf_root = make_env(tmp_path, **{**PT, "steps": 2, "eval_interval": 2, "checkpoint_interval": 2, "sample_interval": 0})
    base = hf_root / "models/base/m"
    shutil.rmtree(base)
    shutil.copytree(export, base)
    out = train(load_cfg(hf_root), "m", progress=False)
    assert out["initial_val_loss"] < report["initial_val_loss"] - 0.5  # it starts from the fine-tuned weights
    args = ["train", "m", "--params", str(hf_root / "params.yaml"), "--no-progress", "--restart",
            "--set", "training.backend=tf"]
    args += [f"--set=paths.{k}={hf_root / v}" for k, v in (("tokens", "data/tokens"), ("base", "models/base"),
                                                            ("runs", "models/runs"), ("reports", "reports"))]
    assert cli_main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Hugging Face base" in err[0] and "training.backend=pt" in err[0]


def test_memory_planner_splits_the_batch_to_fit_and_says_when_nothing_fits():
    from textmill.config import TrainingConfig
    from textmill.sizes import from_name
    from textmill.training.pt import memory

    medium, large = from_name("355M"), from_name("774M")
    tc = TrainingConfig(batch_size=16, grad_accum=2, n_ctx=1024, precision="mixed_float16", memory_gb=16)
    plan = memory.plan(medium, tc, 1024, "cuda")  # 16 x 1024 float32 logits alone take ~10 GB
    assert (plan.micro_batch, plan.grad_accum, plan.grad_checkpointing) == (8, 4, True)
    assert plan.estimated_bytes <= 16e9
    roomy = memory.plan(medium, TrainingConfig(batch_size=8, grad_accum=4, memory_gb=80), 1024, "cuda")
    assert (roomy.micro_batch, roomy.grad_accum, roomy.grad_checkpointing) == (8, 4, False)
    # A full fine-tune of 774M keeps 16 bytes per parameter (weights, gradients, two AdamW moments): 12.4 GB.
    with pytest.raises(UserError, match=r"training\.memory_gb=12.*training\.lora_rank"):
        memory.plan(large, TrainingConfig(batch_size=8, memory_gb=12), 1024, "cuda")
    lora = memory.plan(large, TrainingConfig(batch_size=8, memory_gb=12, lora_rank=16, precision="bfloat16"), 1024,
                       "cuda")
    assert lora.estimated_bytes <= 12e9 and lora.micro_batch >= 1


def test_planned_split_is_used_and_recorded(tmp_path):
    from textmill.training.pt.trainer import train

    root = make_env(tmp_path, **{**PT, "steps": 2, "eval_interval": 2, "checkpoint_interval": 2, "sample_interval": 0,
                                 "batch_size": 4, "memory_gb": 0.0012})
    report = train(load_cfg(root), "m", progress=False)
    plan = report["memory_plan"]
    assert (plan["micro_batch"], plan["grad_accum"], plan["grad_checkpointing"]) == (2, 2, True)  # 1.2 MB: see memory
    assert report["tokens_seen"] == 2 * 4 * HP.n_ctx


def test_lora_trains_adapters_only_and_export_merges_them(tmp_path):
    from safetensors.numpy import load_file

    from textmill.convert.cli import main as convert_main
    from textmill.training.pt.trainer import openai_state_dict, train
    from textmill.training import openai_layout

    root = make_env(tmp_path, **{**PT, "steps": 3, "eval_interval": 3, "checkpoint_interval": 3, "sample_interval": 0,
                                 "lora_rank": 4, "lora_alpha": 8.0, "learning_rate": 3e-2})
    report = train(load_cfg(root), "m", progress=False)
    assert report["lora_rank"] == 4 and report["val_loss"] < report["initial_val_loss"]
    export = root / "models/export/m"
    assert convert_main([str(root / "models/runs/m"), str(export), "--verify"]) == 0
    merged = load_file(export / "model.safetensors")
    base = {k: v.numpy() for k, v in openai_state_dict(openai_layout.resolve_prefix(root / "models/base/m")).items()}
    assert merged.keys() == base.keys()  # plain GPT-2 keys: no lora_A/lora_B, no base_layer
    np.testing.assert_array_equal(merged["transformer.h.1.mlp.c_fc.weight"], base["transformer.h.1.mlp.c_fc.weight"])
    np.testing.assert_array_equal(merged["transformer.wte.weight"], base["transformer.wte.weight"])
    assert np.abs(merged["transformer.h.0.attn.c_attn.weight"] - base["transformer.h.0.attn.c_attn.weight"]).max() > 1e-4
    record = json.loads((export / "textmill.json").read_text())
    assert record["val_loss"] == pytest.approx(report["val_loss"], abs=0)


def test_mixed_float16_trains_with_a_grad_scaler_and_checkpoints_it(tmp_path):
    import torch

    from textmill.training.pt.trainer import train

    root = make_env(tmp_path, **{**PT, "steps": 2, "eval_interval": 2, "checkpoint_interval": 1, "sample_interval": 0,
                                 "precision": "mixed_float16"})
    report = train(load_cfg(root), "m", progress=False)
    assert report["precision"] == "mixed_float16" and np.isfinite(report["val_loss"])
    saved = torch.load(root / "models/runs/m/model-2.pt", weights_only=False)
    assert saved["step"] == 2 and saved["scaler"]["scale"] > 0  # the loss scale is part of the resume state


@pytest.mark.parametrize("override", ["training.lora_rank=8", "training.memory_gb=16", "training.compile=true"])
def test_pytorch_only_settings_are_refused_for_the_tf_backend(override):
    from textmill import config as config_mod

    with pytest.raises(UserError, match=rf"training\.{override.split('.')[1].split('=')[0]}=.* PyTorch-backend setting"):
        config_mod.load(REPO / "params.yaml", ["training.backend=tf", override])
    config_mod.load(REPO / "params.yaml", ["training.backend=pt", override])  # fine with pt


def test_run_core_and_layout_reader_import_no_framework():
    code = ("import sys, textmill.training.run, textmill.training.openai_layout, textmill.convert.sources, textmill.training.pt.memory; "
            "bad = [m for m in ('tensorflow', 'torch') if m in sys.modules]; assert not bad, bad")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-2000:]


def test_bfloat16_training_validates_in_float32(tmp_path):
    """Autocast bf16 for the steps, float32 for validation: a fresh float32 evaluation of the checkpoint agrees."""
    import torch
    from safetensors.torch import load_file

    from textmill.training import data
    from textmill.training.pt.trainer import build_model, load_weights, train

    root = make_env(tmp_path, **{**PT, "steps": 2, "eval_interval": 2, "checkpoint_interval": 2, "sample_interval": 0,
                                 "precision": "bfloat16"})
    report = train(load_cfg(root), "m", progress=False)
    model = build_model(HP, 0, torch.device("cpu"))
    load_weights(model, load_file(str(root / "models/runs/m/model-2.safetensors")), root)
    val = data.open_tokens(root / "data/tokens/m", "val")
    with torch.inference_mode():
        losses = [(torch.nn.functional.cross_entropy(model(torch.from_numpy(x).long()).logits.flatten(0, 1),
                                                     torch.from_numpy(y).long().flatten(), reduction="none")
                   .view(x.shape).numpy(), w) for x, y, w in data.eval_batches(val, HP.n_ctx, 5)]
    assert report["precision"] == "bfloat16"
    assert report["val_loss"] == pytest.approx(data.mean_loss(iter(losses)), abs=1e-5)
