"""`textmill train <model>`: the DVC stage `train@<model>`; dispatches on `training.backend` (tf | pt)."""

from __future__ import annotations

import argparse
import json
import os

from textmill import config as config_mod


def main(argv: list[str]) -> int:
    """Train a model from models/base/<model>/ on data/tokens/<model>/ into models/runs/<model>/ (resumes if present)."""
    p = argparse.ArgumentParser(prog="textmill train", description=main.__doc__)
    p.add_argument("model", help="model name (a key of `models:` in params.yaml)")
    config_mod.add_cli_arguments(p, "training.steps=50")
    p.add_argument("--restart", action="store_true",
                   help="delete an existing run folder for this model and start from the base checkpoint")
    p.add_argument("--restart-if-stale", action="store_true",
                   help="resume a run with the same settings and data, start over if they changed (what dvc.yaml uses)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar (logs only)")
    args = p.parse_args(argv)
    cfg = config_mod.from_args(args)
    cfg.model_spec(args.model)
    if cfg.training.backend == "pt":
        from textmill.training.pt.trainer import train  # torch only: TensorFlow is not imported for a PyTorch run
    else:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        from textmill.training.tf.trainer import train  # TensorFlow loads only here (6 s)

    report = train(cfg, args.model, restart=args.restart, restart_if_stale=args.restart_if_stale,
                   progress=not args.no_progress)
    keys = ("final_step", "train_loss", "val_loss", "best_step", "best_val_loss", "tokens_per_s")
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank returns the report; rank 0 prints it
        print(json.dumps({k: report[k] for k in keys}))
    return 0
