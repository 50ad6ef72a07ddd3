"""`textmill retrain`: the scheduled-retrain job — pull data, reproduce the pipeline, publish behind the quality gate."""

from __future__ import annotations

import argparse
import shutil
import subprocess
from pathlib import Path

from textmill import config as C
from textmill.errors import UserError
from textmill.storage import read_json


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed (see its output above)")


def retrain(params: Path, *, pull: bool, overrides: list[str], force_publish: bool) -> dict:
    """dvc pull (optional) -> dvc exp run / repro -> read publish receipts. Returns {model: receipt}."""
    if shutil.which("dvc") is None:
        raise UserError("dvc is not on PATH; install textmill[pipeline] (make install does)")
    if pull:
        _run(["dvc", "pull", "--allow-missing"])
    if overrides:
        # `dvc exp run -S` recomposes configs/ into params.yaml through DVC's Hydra integration.
        _run(["dvc", "exp", "run", *[a for o in overrides for a in ("-S", o)]])
    else:
        _run(["dvc", "repro"])
    cfg = C.load(params)
    if force_publish:
        for model in cfg.models:
            _run(["textmill", "publish", model, "--force"])
    receipts = {}
    for model in cfg.models:
        path = Path(cfg.paths.reports) / "publish" / f"{model}.json"
        receipts[model] = read_json(path, default={"message": "not published"},
                                    fix=f"re-run `textmill publish {model}`")
    return receipts


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="textmill retrain", description=__doc__)
    p.add_argument("--params", type=Path, default=C.DEFAULT_PARAMS)
    p.add_argument("--pull", action="store_true", help="dvc pull raw data and cached outputs from the DVC remote first")
    p.add_argument("-S", "--set", dest="overrides", action="append", default=[],
                   help="Hydra override for this run (dvc exp run -S), e.g. -S training.steps=2000")
    p.add_argument("--force-publish", action="store_true", help="move LATEST even if the gate refuses")
    args = p.parse_args(argv)
    receipts = retrain(args.params, pull=args.pull, overrides=args.overrides, force_publish=args.force_publish)
    for model, r in receipts.items():
        print(f"{model}: {r.get('message', r)}")
    return 0
