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
        if isinstance(default, list) and name == "api_keys":  # keep blank parts: validate() refuses them loudly
            return [part.strip() for part in raw.split(",")]
        if isinstance(default, list):
            return [part.strip() for part in raw.split(",") if part.strip()]
        if isinstance(default, dict):  # name=value pairs, comma-separated (e.g. TEXTMILL_CHAT_TEMPLATES=abstracts=plain)
            pairs = [part.split("=", 1) for part in raw.split(",") if part.strip()]
            if any(len(p) != 2 or not p[0].strip() for p in pairs):
                raise ValueError(raw)
            return {k.strip(): v.strip() for k, v in pairs}
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


MAX_POLL_INTERVAL_S = 86_400.0   # a day; threading's wait overflows far beyond
MAX_DRAIN_TIMEOUT_S = 86_400.0


def validate(cfg: ServingConfig) -> ServingConfig:
    if not DEVICES.match(cfg.device):
        raise UserError(f"serving.device={cfg.device!r} is invalid; use auto, cpu, cuda or cuda:N")
    if cfg.dtype not in DTYPES:
        raise UserError(f"serving.dtype={cfg.dtype!r} is invalid; choose one of {sorted(DTYPES)}")
    from textmill.serving.engines import ENGINES

    if cfg.engine not in ENGINES:
        raise UserError(f"serving.engine={cfg.engine!r} is not a known engine; choose one of {sorted(ENGINES)}")
    if cfg.dtype == "int8" and cfg.device.startswith(("cuda", "mps")):
        raise UserError(f"serving.dtype=int8 runs on CPU only; with serving.device={cfg.device} use auto or bfloat16")
    if not 0 <= cfg.precision_tolerance < 1:
        raise UserError(f"serving.precision_tolerance={cfg.precision_tolerance} must be in [0, 1) "
                        f"(a fraction: 0.01 = 1 % of the fp32 validation loss)")
    for key in ("max_batch_size", "max_prefill_tokens", "max_queue", "stream_every", "keep_versions", "cache_size", "cpu_threads"):
        if getattr(cfg, key) < (0 if key in ("keep_versions", "cpu_threads") else 1):
            raise UserError(f"serving.{key}={getattr(cfg, key)} is too small")
    # `not (a < x <= b)` also refuses NaN, which compares false to everything: a NaN poll interval made the sync loop
    # poll the bucket without pause (Event.wait(nan) returns at once), inf or 1e300 killed it (OverflowError), and a
    # NaN or negative drain timeout cut every in-flight request off at SIGTERM.
    if not (0 < cfg.poll_interval <= MAX_POLL_INTERVAL_S) or not 0 <= cfg.poll_jitter < 1:
        raise UserError(f"serving.poll_interval={cfg.poll_interval} must be in (0, {MAX_POLL_INTERVAL_S}] seconds and "
                        f"serving.poll_jitter={cfg.poll_jitter} in [0, 1)")
    if not 0 <= cfg.drain_timeout <= MAX_DRAIN_TIMEOUT_S:
        raise UserError(f"serving.drain_timeout={cfg.drain_timeout} must be in [0, {MAX_DRAIN_TIMEOUT_S}] seconds")
    from textmill.serving.protocol import MAX_SEED

    if not 0 <= cfg.default_seed <= MAX_SEED:
        raise UserError(f"serving.default_seed={cfg.default_seed} must be in [0, {MAX_SEED}]")
    _validate_api_keys(cfg.api_keys)
    _validate_limits(cfg)
    from textmill.serving.result_cache import check_url

    check_url(cfg.cache_url)
    if not cfg.root:
        raise UserError("no registry root: pass --root URI, set TEXTMILL_ROOT, or serving.root in params.yaml")
    return cfg


API_KEY_CHARS = re.compile(r"[\x21-\x7e]+")   # visible ASCII: what an `Authorization` header carries unchanged


def _validate_api_keys(keys: list[str]) -> None:
    """A blank key would let `Authorization: Bearer` with no token in; a key with spaces or non-ASCII could never
    match a header. Both are refused at start-up, naming the entry (never its value)."""
    for i, key in enumerate(keys):
        if not isinstance(key, str) or not key.strip():
            raise UserError(f"serving.api_keys[{i}] is empty or blank: it would accept a request with no key. Remove it "
                            f"(no keys at all = no authentication) or set a real key (TEXTMILL_API_KEYS=k1,k2)")
        if not API_KEY_CHARS.fullmatch(key):  # `$` would let a trailing newline through
            raise UserError(f"serving.api_keys[{i}] contains spaces, control or non-ASCII characters, which an "
                            f"`Authorization: Bearer <key>` header cannot carry; use visible ASCII only")


def _validate_limits(cfg: ServingConfig) -> None:
    """The limits of docs/serving.md "Security and limits": each must be a positive, workable value."""
    if cfg.max_body_bytes < 1024:
        raise UserError(f"serving.max_body_bytes={cfg.max_body_bytes} is too small (at least 1024 bytes)")
    for key in ("body_timeout", "header_timeout", "keep_alive_timeout", "ws_idle_timeout"):
        if not getattr(cfg, key) > 0:
            raise UserError(f"serving.{key}={getattr(cfg, key)} must be > 0 seconds")
    if cfg.max_connections < 16:
        raise UserError(f"serving.max_connections={cfg.max_connections} is too small (at least 16)")
    if not 1 <= cfg.max_websockets <= cfg.max_connections // 2:
        raise UserError(f"serving.max_websockets={cfg.max_websockets} must be in [1, max_connections / 2 = "
                        f"{cfg.max_connections // 2}] so plain HTTP (/live, /ready) always has sockets left")
