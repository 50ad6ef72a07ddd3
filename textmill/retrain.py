"""`textmill retrain`: the scheduled-retrain job — pull data, reproduce the pipeline, publish behind the quality gate."""

from __future__ import annotations

import argparse
import logging
import os
import re
import shutil
import subprocess
import tempfile
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


# --- pulling new data (before the pipeline runs) ---------------------------------------------------------------------

SKIP_DIRS = {".git", ".dvc", ".venv", "node_modules", "__pycache__"}
KAGGLE_SPEC = re.compile(r"^(?P<dataset>[A-Za-z0-9_.-]+/[A-Za-z0-9_.-]+)=(?P<dest>[^=]+)$")


def import_stages(repo: Path) -> list[Path]:
    """`.dvc` files made by `dvc import-url` (a dep on gs://, https://, s3://...) or `dvc import` (a dep with `repo:`)."""
    import yaml

    found = []
    for root, dirs, files in os.walk(repo):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS)
        for name in sorted(files):
            if not name.endswith(".dvc"):
                continue
            path = Path(root) / name
            try:
                stage = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            except (OSError, yaml.YAMLError) as e:
                raise UserError(f"{path}: not a readable .dvc file ({type(e).__name__}); fix or remove it") from None
            deps = stage.get("deps") or [] if isinstance(stage, dict) else []
            if any(isinstance(d, dict) and ("repo" in d or "://" in str(d.get("path", ""))) for d in deps):
                found.append(path)
    return found


def _outs_hashes(stage: Path) -> list:
    import yaml

    outs = (yaml.safe_load(stage.read_text(encoding="utf-8")) or {}).get("outs") or []
    return [(o.get("path"), o.get("md5") or o.get("etag")) for o in outs]


def update_imports(repo: Path) -> list[dict]:
    """`dvc update` every import / import-url stage under `repo`; one record per stage: {stage, source, changed}.

    Raises UserError naming the .dvc file and the source when a source cannot be read (gone, no credentials, offline)."""
    import yaml

    records = []
    for stage in import_stages(repo):
        deps = (yaml.safe_load(stage.read_text(encoding="utf-8")) or {}).get("deps") or [{}]
        source = deps[0].get("path", "?") if "repo" not in deps[0] else f"{deps[0]['repo'].get('url')}:{deps[0]['path']}"
        before = _outs_hashes(stage)
        rel = stage.relative_to(repo)
        print(f"+ dvc update {rel}", flush=True)
        proc = subprocess.run(["dvc", "update", str(rel)], cwd=repo, capture_output=True, text=True)
        if proc.returncode != 0:
            last = next((ln.strip() for ln in reversed((proc.stderr + proc.stdout).splitlines()) if ln.strip()), "")
            raise UserError(f"{rel}: `dvc update` could not read {source}: {last} (check the URL and credentials, "
                            f"or drop --update-imports)")
        records.append({"stage": str(rel), "source": source, "changed": _outs_hashes(stage) != before})
    return records


def _kaggle_config_dir() -> Path:
    """Where the official client looks for kaggle.json / access_token (KAGGLE_CONFIG_DIR, ~/.kaggle, XDG config)."""
    if os.environ.get("KAGGLE_CONFIG_DIR"):
        return Path(os.environ["KAGGLE_CONFIG_DIR"])
    legacy = Path.home() / ".kaggle"
    if legacy.exists():
        return legacy
    return Path(os.environ.get("XDG_CONFIG_HOME") or Path.home() / ".config") / "kaggle"


def _kaggle_credentials() -> bool:
    if os.environ.get("KAGGLE_API_TOKEN") or (os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY")):
        return True
    folder = _kaggle_config_dir()
    return (folder / "kaggle.json").is_file() or (folder / "access_token").is_file()


def pull_kaggle(spec: str, repo: Path) -> dict:
    """Download a Kaggle dataset (`OWNER/DATASET=DEST`, DEST a folder under `repo`, e.g. data/raw/abstracts) with the
    official client, keeping its zip (corpora read archives in place); re-`dvc add`s DEST when it is DVC-tracked.

    Credentials: KAGGLE_USERNAME + KAGGLE_KEY (or KAGGLE_API_TOKEN) in the environment, or ~/.kaggle/kaggle.json
    (KAGGLE_CONFIG_DIR moves it). Raises UserError in one line when the spec is malformed, no credentials are set,
    Kaggle cannot be reached or refuses the request."""
    m = KAGGLE_SPEC.match(spec)
    if not m:
        raise UserError(f"--kaggle {spec!r}: expected OWNER/DATASET=DEST, e.g. owner/arxiv-abstracts=data/raw/abstracts")
    dataset, dest = m["dataset"], (repo / m["dest"]).resolve()
    if repo.resolve() not in dest.parents:
        raise UserError(f"--kaggle {spec!r}: DEST must be a folder inside the repository {repo}")
    if not _kaggle_credentials():
        raise UserError(f"no Kaggle credentials for {dataset}: set KAGGLE_USERNAME and KAGGLE_KEY, or save "
                        f"~/.kaggle/kaggle.json (Kaggle > Settings > API > Create New Token)")
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise UserError("--kaggle needs the official client: pip install 'textmill[pipeline]'") from None
    import requests

    api = KaggleApi()
    # the client resolves its config folder once, at import; follow the environment of this call instead
    api.config_dir = str(_kaggle_config_dir())
    api.config = os.path.join(api.config_dir, "kaggle.json")
    dest.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=dest.parent, prefix=f".{dest.name}-kaggle-") as tmp:
        try:
            api.authenticate()
            api.dataset_download_files(dataset, path=tmp, unzip=False, quiet=True)
        except SystemExit:  # the client exits the process when it finds no usable credentials
            raise UserError(f"Kaggle rejected the credentials for {dataset}; check KAGGLE_USERNAME/KAGGLE_KEY or "
                            f"~/.kaggle/kaggle.json") from None
        except requests.HTTPError as e:
            code = e.response.status_code if e.response is not None else "?"
            raise UserError(f"Kaggle refused {dataset} (HTTP {code}): check the dataset name and that your account "
                            f"accepted its terms") from None
        except (requests.ConnectionError, requests.Timeout, OSError) as e:
            raise UserError(f"cannot reach Kaggle to download {dataset} ({type(e).__name__}); check the network or "
                            f"proxy, or retry later") from None
        files = sorted(Path(tmp).iterdir())
        for f in files:
            os.replace(f, dest / f.name)   # same filesystem: each file appears whole
    tracked = dest.with_name(dest.name + ".dvc").exists()
    if tracked:
        _run(["dvc", "add", str(dest.relative_to(repo.resolve()))])
    return {"dataset": dataset, "dest": str(dest.relative_to(repo.resolve())), "files": [f.name for f in files],
            "dvc_add": tracked}


def pull_new_data(repo: Path, *, update: bool, kaggle: list[str]) -> dict:
    """The scheduled retrain's pull step: `dvc update` of import stages, then Kaggle downloads. Returns what changed."""
    return {"imports": update_imports(repo) if update else [], "kaggle": [pull_kaggle(s, repo) for s in kaggle]}


def publish_results(repo: Path, *, push: bool, commit_lock: bool, message: str) -> list[str]:
    """After the pipeline published: `dvc push` the new data/outputs, then commit dvc.lock and changed .dvc files."""
    done = []
    if push:
        _run(["dvc", "push"])
        done.append("dvc push")
    if commit_lock:
        paths = [p for p in ["dvc.lock", "params.yaml", *(str(s.relative_to(repo)) for s in import_stages(repo))]
                 if (repo / p).exists()]
        paths += [str(p.relative_to(repo)) for p in (repo / "data").rglob("*.dvc")] if (repo / "data").exists() else []
        _run(["git", "-C", str(repo), "add", "--", *sorted(set(paths))])
        if subprocess.run(["git", "-C", str(repo), "diff", "--cached", "--quiet"]).returncode != 0:
            _run(["git", "-C", str(repo), "commit", "-q", "-m", message])
            done.append("committed dvc.lock")
    return done


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
    p.add_argument("--update-imports", action="store_true",
                   help="`dvc update` every `dvc import-url` / `dvc import` source (gs://, https://, ...) first")
    p.add_argument("--kaggle", action="append", default=[], metavar="OWNER/DATASET=DEST",
                   help="download a Kaggle dataset into DEST (e.g. data/raw/abstracts) first (repeatable)")
    p.add_argument("--push", action="store_true", help="`dvc push` data and outputs to the DVC remote afterwards")
    p.add_argument("--commit-lock", action="store_true", help="git commit dvc.lock (and updated .dvc files) afterwards")
    args = p.parse_args(argv)
    repo = Path.cwd()
    pulled = pull_new_data(repo, update=args.update_imports, kaggle=args.kaggle)
    for rec in pulled["imports"]:
        print(f"data {rec['stage']}: {'updated from' if rec['changed'] else 'unchanged at'} {rec['source']}")
    for rec in pulled["kaggle"]:
        print(f"data {rec['dest']}: {len(rec['files'])} file(s) from kaggle {rec['dataset']}")
    receipts = retrain(args.params, pull=args.pull, overrides=args.overrides, force_publish=args.force_publish)
    for model, r in receipts.items():
        print(f"{model}: {r.get('message', r)}")
    for step in publish_results(repo, push=args.push, commit_lock=args.commit_lock,
                                message="retrain: " + "; ".join(f"{m}: {r.get('message', '')}" for m, r in receipts.items())):
        print(step)
    return 0
