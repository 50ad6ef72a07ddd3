"""CLI verbs over the bucket registry: `publish` (the DVC stage publish@<model>), `models ls|show`, `rollback`, `gc`."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import yaml

from textmill import config as tm_config
from textmill import storage
from textmill.errors import UserError
from textmill.registry import LATEST, Registry, UntrustedData, shown
from textmill.storage import read_json

DVC_LOCK = Path("dvc.lock")


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--root", help="registry URI (gs://bucket/prefix or a folder); default: publish.root from params")
    tm_config.add_cli_arguments(p, "publish.tolerance=0.1")


def _root(args: argparse.Namespace, explicit: str | None = None) -> str:
    root = explicit or args.root
    return root if root else tm_config.from_args(args).publish.root


# ---------------------------------------------------------------------------------------------------------------- publish

def git_state(cwd: Path = Path(".")) -> dict[str, Any]:
    """{commit, dirty} of the working tree, or {commit: None} outside a git repo / without git."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, check=True).stdout
        status = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd, capture_output=True,
                                text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return {"commit": None, "dirty": None}
    return {"commit": commit.strip(), "dirty": bool(status.strip())}


def dvc_stage_hashes(lock: Path, model: str, corpora: list[str]) -> dict[str, dict[str, str]]:
    """{stage: {path: md5}} from dvc.lock for this model's stages (`<stage>@<model>`) and its corpora's clean stages."""
    if not lock.exists():
        return {}
    try:
        stages = (yaml.safe_load(lock.read_text(encoding="utf-8")) or {}).get("stages", {})
    except yaml.YAMLError as e:
        raise UserError(f"{lock}: cannot parse YAML ({e}); run `dvc repro` to rewrite it") from None
    wanted = {name for name in stages if name.endswith(f"@{model}")} | {f"clean@{c}" for c in corpora}
    out = {}
    for name in sorted(wanted & set(stages)):
        entries = (stages[name].get("deps") or []) + (stages[name].get("outs") or [])
        out[name] = {e["path"]: e.get("md5") or e.get("hash") for e in entries if "path" in e}
    return out


def _read_json(path: Path, what: str, fix: str) -> dict:
    return read_json(path, fix=f"{what}: {fix}")


def provenance(cfg: tm_config.Config, model: str, export: Path) -> dict[str, Any]:
    spec = cfg.model_spec(model)
    return {
        "git": git_state(),
        "dvc_lock": dvc_stage_hashes(DVC_LOCK, model, list(spec.corpora)),
        "base": tm_config.to_dict(cfg)["base"],
        "corpora": list(spec.corpora),
        "export": _read_json(export / "textmill.json", "export provenance (textmill.json)",
                             f"re-run `textmill convert` for {model}") if (export / "textmill.json").exists() else None,
        "published_at": _now(),
    }


def _now() -> str:
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def publish_main(argv: list[str]) -> int:
    """`textmill publish <model> [--root URI] [--force]`: upload models/export/<model> as a new version behind the gate."""
    p = argparse.ArgumentParser(prog="textmill publish", description=publish_main.__doc__)
    p.add_argument("model")
    p.add_argument("--force", action="store_true", help="move LATEST even if the gate refuses (worse val_loss)")
    p.add_argument("--no-progress", action="store_true")
    _common(p)
    args = p.parse_args(argv)
    cfg = tm_config.from_args(args)
    cfg.model_spec(args.model)  # an unknown model name fails first, naming the configured ones
    export = Path(cfg.paths.export) / args.model
    eval_report = Path(cfg.paths.reports) / "eval" / f"{args.model}.json"
    metrics = _read_json(eval_report, "evaluation report", f"run `textmill evaluate {args.model}` (or `dvc repro`) first")
    if not isinstance(metrics, dict) or "val_loss" not in metrics:
        raise UserError(f"{eval_report}: no `val_loss` key; re-run `textmill evaluate {args.model}`")
    scored = metrics.pop("export", None)  # which export the numbers belong to: checked against the folder, not shipped
    root = args.root or cfg.publish.root
    prov = {**provenance(cfg, args.model, export), "evaluated_export": scored.get("content_hash") if isinstance(scored, dict) else None}
    result = Registry(root).publish(args.model, export, metrics=metrics, provenance=prov,
                                    force=args.force or cfg.publish.force, tolerance=cfg.publish.tolerance,
                                    progress=not args.no_progress, scored=(str(eval_report), scored))
    receipt = {"model": args.model, "root": root, **result.to_dict(), "published_at": _now()}
    storage.write_json_atomic(Path(cfg.paths.reports) / "publish" / f"{args.model}.json", receipt)
    print(result.message)
    return 0


# --------------------------------------------------------------------------------------------------- models / rollback / gc

def _plain(value) -> str:
    """A manifest field for the terminal: printable ASCII text as is, anything else as `shown` (escaped, cut)."""
    return value if isinstance(value, str) and value.isascii() and value.isprintable() and len(value) <= 80 \
        else shown(value)


def _ls_row(reg: Registry, model: str) -> str:
    """One table row; raises UserError (incl. UntrustedData) when the model's LATEST or live manifest is broken."""
    live = reg.latest(model)
    loss = reg.manifest(model, live).get("metrics", {}).get("val_loss") if live else None
    shown_loss = f"{loss:.4f}" if isinstance(loss, (int, float)) and not isinstance(loss, bool) else "-"
    return f"  {model:<20} {live or '-':<30} {shown_loss:>9} {len(reg.versions(model)):>8}"


def _ls(reg: Registry) -> int:
    """Print every model with its live version; a broken model (unreadable LATEST or manifest, a folder name that is
    not a model name) is listed with `!` and why, and makes the exit code 1. Returns the exit code."""
    models, hostile = reg.listing()
    if not models and not hostile:
        print(f"{reg.root}: no models")
        return 0
    print(f"  {'model':<20} {'live version':<30} {'val_loss':>9} {'versions':>8}")
    broken = [shown(name) for name in hostile]
    for name in hostile:
        print(f"! {shown(name):<20} BROKEN: not a valid model name (ignored by serving nodes)")
    for m in models:
        try:
            print(_ls_row(reg, m))
        except UserError as e:
            print(f"! {m:<20} BROKEN: {e}")
            broken.append(m)
    if broken:
        print(f"textmill models: {len(broken)} broken model(s): {', '.join(broken)} (marked ! above)", file=sys.stderr)
    return 1 if broken else 0


def _show(reg: Registry, ref: str, as_json: bool) -> None:
    model, _, version = ref.partition("@")
    live = reg.latest(model)
    if not version:
        versions = reg.versions(model)
        if not versions:
            raise UserError(f"{reg.root}: no versions of {model!r}; models here: {reg.models()}")
        for v in versions:
            loss = reg.manifest(model, v).get("metrics", {}).get("val_loss")
            print(f"{'*' if v == live else ' '} {model}@{v}  val_loss={loss}")
        return
    manifest = reg.manifest(model, version)
    if as_json:
        print(json.dumps(manifest, indent=2, sort_keys=True))
        return
    print(f"{model}@{version}{'  (live)' if version == live else ''}\ncreated: {_plain(manifest.get('created'))}")
    print("metrics: " + json.dumps(manifest.get("metrics", {}), sort_keys=True))
    provenance = manifest.get("provenance")
    git = provenance.get("git") if isinstance(provenance, dict) else None
    if isinstance(git, dict) and git:
        print(f"git: {_plain(git.get('commit'))}{' (dirty)' if git.get('dirty') else ''}")
    for e in manifest["files"]:
        print(f"  {e['size']:>12}  {e['sha256'][:12]}  {e['path']}")


def models_main(argv: list[str]) -> int:
    """`textmill models ls [ROOT]` | `textmill models show <model>[@version] [--root URI] [--json]`.

    `ls` exits 1 when a model is broken (listed with `!` and the reason; the others are listed as usual)."""
    p = argparse.ArgumentParser(prog="textmill models", description=models_main.__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ls = sub.add_parser("ls", help="models, their live version and val_loss")
    ls.add_argument("root_pos", nargs="?", metavar="ROOT")
    _common(ls)
    show = sub.add_parser("show", help="a model's versions, or one version's manifest")
    show.add_argument("ref", metavar="MODEL[@VERSION]")
    show.add_argument("--json", action="store_true", help="print the whole MANIFEST.json")
    _common(show)
    args = p.parse_args(argv)
    if args.cmd == "ls":
        return _ls(Registry(_root(args, args.root_pos)))
    _show(Registry(_root(args)), args.ref, args.json)
    return 0


def rollback_main(argv: list[str]) -> int:
    """`textmill rollback <model> <version> [--root URI]`: point LATEST at an earlier complete version."""
    p = argparse.ArgumentParser(prog="textmill rollback", description=rollback_main.__doc__)
    p.add_argument("model")
    p.add_argument("version")
    _common(p)
    args = p.parse_args(argv)
    reg = Registry(_root(args))
    try:
        before = reg.latest(args.model)
    except UntrustedData:  # rollback is how an operator repairs a LATEST that holds garbage
        before = "(invalid LATEST)"
    reg.rollback(args.model, args.version)
    print(f"{args.model}: {LATEST} {before or '-'} -> {args.version}")
    return 0


def gc_main(argv: list[str]) -> int:
    """`textmill gc <model> --keep N [--root URI]`: delete old versions, keeping the newest N and always the live one."""
    p = argparse.ArgumentParser(prog="textmill gc", description=gc_main.__doc__)
    p.add_argument("model")
    p.add_argument("--keep", type=int, required=True)
    _common(p)
    args = p.parse_args(argv)
    reg = Registry(_root(args))
    deleted = reg.gc(args.model, args.keep)
    print(f"{args.model}: deleted {len(deleted)} version(s)" + "".join(f"\n  {v}" for v in deleted)
          + f"\nlive: {reg.latest(args.model) or '-'}; kept: {len(reg.versions(args.model))}")
    return 0
