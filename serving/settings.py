"""The one settings object of a serving node: `ServingConfig` filled from params.yaml, then `TEXTMILL_*` env, then flags.

Order (later wins): the schema's defaults, the `serving:` section of params.yaml (when the file exists, or must when
`--params` is given), environment variables named `TEXTMILL_<FIELD>` (lists comma-separated, e.g.
`TEXTMILL_MODELS=abstracts,legal`, `TEXTMILL_API_KEYS=...`), `--set serving.<field>=<value>`, then the verb's own flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import re
from pathlib import Path
from typing import Any, Mapping

from textmill import config as tm_config
from textmill.config import ServingConfig
from textmill.errors import UserError

ENV_PREFIX = "TEXTMILL_"
DEVICES = re.compile(r"^(auto|cpu|cuda(:\d+)?|mps)$")
DTYPES = {"auto", "float32", "float16", "bfloat16", "int8"}


def add_arguments(p: argparse.ArgumentParser, *, server: bool) -> None:
    """Flags shared by `textmill sync` and `textmill serve` (all optional: the node runs without a config file)."""
    p.add_argument("--params", type=Path, default=None, help="params.yaml to read the serving section from "
                   "(default: ./params.yaml when it exists)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="config override, e.g. --set serving.keep_versions=3 (repeatable)")
    p.add_argument("--root", help="registry root URI (gs://bucket/prefix or a local folder)")
    p.add_argument("--models", help="comma-separated model names (default: every model in the registry)")
    p.add_argument("--cache", dest="cache_dir", help="local cache folder for verified model versions")
    p.add_argument("--keep", dest="keep_versions", type=int, help="old versions to keep per model for rollback")
    if server:
        p.add_argument("--host")
        p.add_argument("--port", type=int)
        p.add_argument("--device", help="auto | cpu | cuda | cuda:N")
        p.add_argument("--dtype", help="auto | float32 | bfloat16 | int8 | float16 (see docs/serving.md, Precision)")
        p.add_argument("--poll-interval", dest="poll_interval", type=float, help="seconds between registry polls")


def _coerce(name: str, raw: str, default: Any) -> Any:
    try:
        if isinstance(default, bool):
            if raw.lower() not in ("1", "0", "true", "false", "yes", "no"):
                raise ValueError(raw)
            return raw.lower() in ("1", "true", "yes")
        if isinstance(default, list):
            return [part.strip() for part in raw.split(",") if part.strip()]
        return type(default)(raw)
    except ValueError:
        raise UserError(f"environment variable {ENV_PREFIX}{name.upper()}={raw!r} is not a valid "
                        f"{type(default).__name__}") from None


def from_env(env: Mapping[str, str]) -> dict[str, Any]:
    values = {}
    for f in dataclasses.fields(ServingConfig):
        raw = env.get(ENV_PREFIX + f.name.upper())
        if raw is not None:
            values[f.name] = _coerce(f.name, raw, getattr(ServingConfig(), f.name))
    return values


def _base(params: Path | None, overrides: list[str]) -> ServingConfig:
    bad = [o for o in overrides if not o.startswith("serving.")]
    if bad:
        raise UserError(f"--set {bad[0]}: serving verbs only take serving.<field>=<value> overrides")
    path = params if params is not None else tm_config.DEFAULT_PARAMS
    if params is None and not path.exists():
        return tm_config.from_container({"serving": _dotlist(overrides)}).serving
    return tm_config.load(path, overrides).serving


def _dotlist(overrides: list[str]) -> dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(OmegaConf.from_dotlist(overrides)).get("serving", {}) if overrides else {}


def load(args: argparse.Namespace, env: Mapping[str, str] | None = None) -> ServingConfig:
    """Settings for this node from params.yaml + env + flags, validated."""
    cfg = _base(args.params, [])
    cfg = dataclasses.replace(cfg, **from_env(os.environ if env is None else env))
    if args.overrides:  # --set beats the environment, as documented; the schema re-validates the merged values
        _base(args.params, list(args.overrides))  # same checks and messages for the override keys themselves
        merged = {**dataclasses.asdict(cfg), **_dotlist(list(args.overrides))}
        cfg = tm_config.from_container({"serving": merged}).serving
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(ServingConfig)
             if getattr(args, f.name, None) is not None}
    if isinstance(flags.get("models"), str):
        flags["models"] = [m.strip() for m in flags["models"].split(",") if m.strip()]
    cfg = dataclasses.replace(cfg, **flags)
    return validate(cfg)


def validate(cfg: ServingConfig) -> ServingConfig:
    if not DEVICES.match(cfg.device):
        raise UserError(f"serving.device={cfg.device!r} is invalid; use auto, cpu, cuda or cuda:N")
    if cfg.dtype not in DTYPES:
        raise UserError(f"serving.dtype={cfg.dtype!r} is invalid; choose one of {sorted(DTYPES)}")
    if cfg.dtype == "int8" and cfg.device.startswith(("cuda", "mps")):
        raise UserError(f"serving.dtype=int8 runs on CPU only; with serving.device={cfg.device} use auto or bfloat16")
    if not 0 <= cfg.precision_tolerance < 1:
        raise UserError(f"serving.precision_tolerance={cfg.precision_tolerance} must be in [0, 1) "
                        f"(a fraction: 0.01 = 1 % of the fp32 validation loss)")
    for key in ("max_batch_size", "max_queue", "stream_every", "keep_versions", "cache_size", "cpu_threads"):
        if getattr(cfg, key) < (0 if key in ("keep_versions", "cpu_threads") else 1):
            raise UserError(f"serving.{key}={getattr(cfg, key)} is too small")
    if cfg.poll_interval <= 0 or not 0 <= cfg.poll_jitter < 1:
        raise UserError("serving.poll_interval must be > 0 and serving.poll_jitter in [0, 1)")
    from serving.protocol import MAX_SEED

    if not 0 <= cfg.default_seed <= MAX_SEED:
        raise UserError(f"serving.default_seed={cfg.default_seed} must be in [0, {MAX_SEED}]")
    if not cfg.root:
        raise UserError("no registry root: pass --root URI, set TEXTMILL_ROOT, or serving.root in params.yaml")
    return cfg
