"""Bucket registry -> local verified cache: `<cache>/<model>/<version>/` appears only complete and checked (temp + rename).

Only the registry's read side is used. A version folder in the cache exists only after `Registry.download` verified every
file against the MANIFEST (it writes MANIFEST.json into the folder before the rename), so "has MANIFEST.json and is not a
hidden temp folder" is what "verified" means here; the loader never looks at anything else.

Everything the bucket says is untrusted (docs/publishing.md "Untrusted bucket contents"): the registry validates model
names, LATEST, version ids and manifest paths before any path is built from them, and this module only ever deletes a
direct child of `<cache>/<model>/`, unlinking a symlink rather than following it.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from textmill.config import ServingConfig
from textmill.errors import UserError
from textmill.registry import (MANIFEST, MODEL_NAME, VERSION_ID, Registry, UntrustedData, check_manifest,
                               check_model_name, shown)

log = logging.getLogger(__name__)

STALE_TEMP_S = 600.0   # a hidden temp folder older than this was left by a sync that died mid-download
TEMP_NAME = re.compile(r"\.[^/]+\.[A-Za-z0-9_]+\.tmp")   # storage.atomic_path's `.<name>.<random>.tmp`


@dataclass
class Cached:
    model: str
    version: str
    folder: Path

    def manifest(self) -> dict:
        """The cached MANIFEST.json, validated like one read from the registry (raises UntrustedData)."""
        where = str(self.folder / MANIFEST)
        try:
            manifest = json.loads((self.folder / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as e:
            raise UntrustedData(f"{where}: unreadable ({type(e).__name__})", "manifest") from None
        return check_manifest(manifest, self.model, self.version, where)


@dataclass
class SyncResult:
    model: str
    latest: str | None              # the registry's LATEST (None: none, or unreachable)
    cached: Cached | None           # the verified cached copy of `latest`
    downloaded: bool = False
    error: str | None = None
    rejected: str | None = None     # UntrustedData.kind when the registry held a hostile or malformed value


class Syncer:
    """One registry root, one cache folder. Thread-compatible: the daemon calls it from its one sync thread."""

    def __init__(self, settings: ServingConfig, registry: Registry | None = None) -> None:
        self.settings = settings
        self.cache = Path(settings.cache_dir)
        self._registry = registry
        for model in settings.models:
            check_model_name(model, "--models / serving.models")

    @property
    def registry(self) -> Registry:
        # Built lazily: constructing a gs:// filesystem must not be what stops a node from textmill.serving its cache.
        if self._registry is None:
            self._registry = Registry(self.settings.root)
        return self._registry

    # the cache
    def cached(self, model: str) -> list[Cached]:
        """Verified cached versions of `model`, oldest to newest (folders named by a version id, not symlinks)."""
        folder = self.cache / model
        if not MODEL_NAME.fullmatch(model) or folder.is_symlink() or not folder.is_dir():
            return []
        return [Cached(model, p.name, p) for p in sorted(folder.iterdir())
                if VERSION_ID.fullmatch(p.name) and not p.is_symlink() and p.is_dir() and (p / MANIFEST).is_file()]

    def newest_cached(self, model: str) -> Cached | None:
        found = self.cached(model)
        return found[-1] if found else None

    def cached_models(self) -> list[str]:
        if not self.cache.is_dir():
            return []
        return sorted(p.name for p in self.cache.iterdir() if self.cached(p.name))

    def prune(self, model: str, protect: set[str] = frozenset()) -> list[str]:
        """Keep the newest `keep_versions + 1` (the live one and N for rollback) plus `protect`; delete the rest."""
        versions = [c.version for c in self.cached(model)]
        keep = set(versions[-(self.settings.keep_versions + 1):]) | set(protect)
        removed = [v for v in versions if v not in keep]
        for v in removed:
            self._remove(self.cache / model / v)
            log.info("model %s: removed cached version %s (keep_versions=%d)", model, v, self.settings.keep_versions)
        self._remove_stale_temps(model)
        return removed

    def _remove_stale_temps(self, model: str) -> None:
        now = time.time()
        folder = self.cache / model
        if not MODEL_NAME.fullmatch(model) or folder.is_symlink() or not folder.is_dir():
            return
        for p in folder.iterdir():
            if TEMP_NAME.fullmatch(p.name) and now - p.lstat().st_mtime > STALE_TEMP_S:
                self._remove(p)

    def _model_dir(self, model: str) -> Path:
        """`<cache>/<model>` for a valid name, refusing a symlinked one (its contents would land outside the cache)."""
        folder = self.cache / check_model_name(model)
        if folder.is_symlink():
            raise UntrustedData(f"{folder}: a symlink inside the cache; remove it (the cache holds real folders only)",
                                "symlink")
        return folder

    def _remove(self, path: Path) -> None:
        """Delete `path`, a direct child of `<cache>/<model>/`, without ever leaving the cache: a symlink is unlinked
        (its target untouched), a folder reached through a symlinked parent is refused, and rmtree does not follow
        symlinks inside the folder."""
        model_dir = path.parent
        try:
            confined = (not model_dir.is_symlink() and model_dir.parent == self.cache
                        and model_dir.resolve() == self.cache.resolve() / model_dir.name)
        except OSError:
            confined = False
        if not confined:
            log.error("refusing to delete %s: not a direct child of a model folder in the cache %s", shown(str(path)),
                      self.cache)
            return
        if path.is_symlink() or not path.is_dir():
            path.unlink(missing_ok=True)
        else:
            shutil.rmtree(path, ignore_errors=True)

    # the registry
    def models(self) -> list[str]:
        return list(self.settings.models) or self.registry.models()

    def unknown(self, models: list[str]) -> tuple[list[str], list[str]]:
        """(names in `models` that are neither in the registry nor cached, the registry's models): a typo in --models.
        Lists the registry (raises its errors: an unreachable registry cannot tell a typo from a model to come)."""
        missing = [m for m in models if not self.cached(m)]
        if not missing:
            return [], []
        available = self.registry.models()
        return [m for m in missing if m not in available], available

    def sync_model(self, model: str, *, progress: bool = False) -> SyncResult:
        """Make the registry's LATEST of `model` present and verified in the cache (download only what changed).

        Raises UntrustedData (before touching the disk) when the registry holds a hostile or malformed name, LATEST
        or manifest; VerificationError when files do not match; the registry's errors when it is unreachable."""
        folder = self._model_dir(model)
        latest = self.registry.latest(model)
        if latest is None:
            return SyncResult(model, None, None, error=f"{self.settings.root}: model {model!r} has no LATEST")
        dest = folder / latest
        have = {c.version: c for c in self.cached(model)}
        if latest in have:
            return SyncResult(model, latest, have[latest])
        if os.path.lexists(dest):  # a folder without MANIFEST.json (or a symlink) is not ours to trust: fetch it again
            self._remove(dest)
        reuse = [c.folder for c in have.values()]
        started = time.monotonic()
        self.registry.download(model, latest, dest, reuse=reuse, progress=progress)
        log.info("model %s: version %s downloaded and verified in %.1fs", model, latest, time.monotonic() - started)
        return SyncResult(model, latest, Cached(model, latest, dest), downloaded=True)

    def sync_once(self, *, progress: bool = False, protect: dict[str, str] | None = None) -> list[SyncResult]:
        """One pass over every model; a failure of one model (unreachable, verification) does not stop the others."""
        results = []
        try:
            if self.settings.models:
                models = list(self.settings.models)
            else:
                models, hostile = self.registry.listing()
                results += [SyncResult(shown(name), None, None, error=f"{self.settings.root}: folder {shown(name)} is "
                                       "not a valid model name; ignored", rejected="model_name") for name in hostile]
        except Exception as e:  # unreachable bucket: nothing to compare against; the caller decides what that means
            log.error("registry %s: cannot list models: %s: %s", self.settings.root, type(e).__name__, e)
            return [SyncResult("*", None, None, error=f"cannot list models in {self.settings.root}: {e}")]
        for model in models:
            try:
                result = self.sync_model(model, progress=progress)
            except Exception as e:  # unreachable bucket, failed verification, bad manifest: this model waits, others go on
                log.error("model %s: sync failed: %s: %s", model, type(e).__name__, e)
                result = SyncResult(model, None, None, error=str(e),
                                    rejected=e.kind if isinstance(e, UntrustedData) else None)
            if result.cached is not None:
                keep = {result.latest} | ({protect[model]} if protect and model in protect else set())
                self.prune(model, keep)
            results.append(result)
        return results


def main(argv: list[str]) -> int:
    """One sync pass (bucket registry -> verified local cache), then exit: for boot scripts and init containers.
    Exit 0 when every model's LATEST is cached, 1 when one failed (unreachable, verification), 2 on a usage mistake."""
    from textmill.serving import settings as node_settings

    p = argparse.ArgumentParser(prog="textmill sync", description=main.__doc__)
    node_settings.add_arguments(p, server=False)
    settings = node_settings.load(p.parse_args(argv))
    syncer = Syncer(settings)
    results = syncer.sync_once(progress=True)
    if not results:
        raise UserError(f"{settings.root}: no models in the registry (publish one with `textmill publish`)")
    if settings.models and any(r.latest is None and r.rejected is None for r in results):
        try:
            unknown, available = syncer.unknown(list(settings.models))
        except Exception:  # unreachable: the per-model errors printed below say so
            unknown, available = [], []
        if unknown:
            raise UserError(f"--models: unknown model(s) {', '.join(unknown)} in {settings.root}; available: "
                            f"{', '.join(available) or 'none'}")
    for r in results:
        state = "error: " + r.error if r.error else ("downloaded" if r.downloaded else "up to date")
        print(f"{r.model}: {r.latest or '-'} {state}")
    return 1 if any(r.error for r in results) else 0
