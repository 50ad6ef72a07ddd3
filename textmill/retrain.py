"""`textmill retrain`: the scheduled-retrain job — pull data, reproduce the pipeline, publish behind the quality gate."""

from __future__ import annotations

import argparse
import logging
import shutil
import subprocess
from datetime import datetime, timezone
from pathlib import Path

from textmill import config as C
from textmill.errors import UserError
from textmill.storage import read_json

log = logging.getLogger(__name__)


def _run(cmd: list[str]) -> None:
    print("+", " ".join(cmd), flush=True)
    if subprocess.run(cmd).returncode != 0:
        raise UserError(f"`{' '.join(cmd)}` failed (see its output above)")


def _stamp(receipt: dict) -> datetime | None:
    try:
        return datetime.fromisoformat(str(receipt["published_at"]).replace("Z", "+00:00"))
    except (KeyError, ValueError):
        return None


def _live(receipt: dict, model: str) -> str:
    """The registry's LATEST of `model` now (receipts name their root), or why it cannot be read."""
    from textmill.registry import Registry

    try:
        return Registry(receipt["root"]).latest(model) or "-"
    except Exception as e:  # unreachable bucket, hostile LATEST, no root in an old receipt: say so, do not fail
        return f"unknown ({type(e).__name__}: {e})"


def this_runs_receipts(reports: Path, models: list[str], started: datetime) -> dict[str, dict]:
    """{model: receipt} for receipts `reports/publish/<model>.json` written at or after `started` (UTC, by this run).

    A receipt from before (DVC found `publish@<model>` up to date and did not run it) is not this run's result: its
    message may say `LATEST -> X` after an operator rolled back to Y. It is replaced by a plain statement that nothing
    was published, with the registry's LATEST read now, and the old receipt kept under `previous`."""
    since = started.replace(microsecond=0)
    out = {}
    for model in models:
        path = reports / "publish" / f"{model}.json"
        receipt = read_json(path, default={}, fix=f"re-run `textmill publish {model}`")
        stamp = _stamp(receipt) if isinstance(receipt, dict) else None
        if stamp is not None and stamp >= since:
            out[model] = receipt
            continue
        live = _live(receipt, model) if isinstance(receipt, dict) and receipt.get("root") else "-"
        out[model] = {"model": model, "published_this_run": False, "live_version": live, "previous": receipt or None,
                      "message": f"not published by this run (publish@{model} was up to date); LATEST is {live}"}
    return out


def retrain(params: Path, *, pull: bool, overrides: list[str], force_publish: bool) -> dict:
    """dvc pull (optional) -> dvc exp run / repro -> this run's publish receipts. Returns {model: receipt}; a model
    this run did not publish gets a receipt saying so (see `this_runs_receipts`)."""
    started = datetime.now(timezone.utc)
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
    return this_runs_receipts(Path(cfg.paths.reports), list(cfg.models), started)


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
