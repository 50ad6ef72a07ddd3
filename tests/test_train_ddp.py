"""DDP through torchrun: 2 CPU processes (gloo) train the loss curve of 1 process with twice the accumulation."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.test_train_pt import ENV, PT
from tests.test_train_tf import load_cfg, make_env, metric


def to_hf_base(root: Path) -> None:
    """Replace models/base/m (OpenAI layout) by the same weights in Hugging Face layout, so the workers need no TF."""
    import torch
    from safetensors.torch import save_file
    from transformers import GPT2Config

    from textmill import tokenizer as tok_io
    from textmill.sizes import to_hf_config_kwargs
    from textmill.training import openai_layout
    from textmill.training.pt.trainer import openai_state_dict

    base = root / "models/base/m"
    hp = openai_layout.read_hparams(base)
    state = openai_state_dict(openai_layout.resolve_prefix(base))
    tok = tok_io.load(base)
    shutil.rmtree(base)
    base.mkdir()
    GPT2Config(**to_hf_config_kwargs(hp, eot_id=tok_io.eot_id(tok))).save_pretrained(base)
    save_file({k: v.to(torch.float32) for k, v in state.items()}, str(base / "model.safetensors"), {"format": "pt"})
    tok_io.save_hf(tok, base, model_max_length=hp.n_ctx)


def test_two_processes_match_one_with_twice_the_accumulation(tmp_path):
    from textmill.config import PathsConfig
    from textmill.training.pt.trainer import train

    steps = 4
    root = make_env(tmp_path, **{**PT, "steps": steps, "batch_size": 2, "grad_accum": 1, "eval_interval": 2,
                                 "checkpoint_interval": 2, "sample_interval": 2})
    to_hf_base(root)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "textmill",
           "train", "m", "--no-progress"]
    done = subprocess.run(cmd, cwd=root, env=ENV, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-3000:]
    two = json.loads((root / "reports/train/m.json").read_text())
    assert two["replicas"] == 2 and len([ln for ln in done.stdout.splitlines() if ln.startswith('{"final_step"')]) == 1

    cfg = load_cfg(root, grad_accum=2)
    cfg.paths = PathsConfig(tokens=str(root / "data/tokens"), base=str(root / "models/base"), runs=str(root / "ref/runs"),
                            reports=str(root / "ref/reports"))
    one = train(cfg, "m", progress=False)
    assert one["replicas"] == 1 and one["tokens_seen"] == two["tokens_seen"] == steps * 2 * 2 * 32
    curve_two, curve_one = metric(root, "train_loss"), metric(root, "train_loss", "ref/reports")
    assert sorted(curve_two) == sorted(curve_one) == list(range(1, steps + 1))
    np.testing.assert_allclose([curve_two[s] for s in range(1, steps + 1)], [curve_one[s] for s in range(1, steps + 1)],
                               atol=1e-5)
    for s in ("2", "4"):
        assert two["val_loss_by_step"][s] == pytest.approx(one["val_loss_by_step"][s], abs=1e-5)
    # Only rank 0 wrote: one section per sampling step (rank 1 sampled too, to keep its RNG in step, but wrote nothing).
    assert (root / "models/runs/m/samples.txt").read_text().count("======== step") == 2
