"""The bucket registry: publish export folders as immutable, checksummed versions under any fsspec root, and read them back.

Layout: `<root>/<model>/<version>/<files>`, `<root>/<model>/<version>/MANIFEST.json`, `<root>/<model>/LATEST` (the live
version id). Publish writes files, then MANIFEST.json (a version without one is incomplete and invisible), then LATEST
last, so a reader that follows LATEST never sees a half-published version. LATEST moves by compare-and-set (a GCS
generation precondition; a lock file on local folders) so racing publishers cannot overwrite each other's decision.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator
from urllib.parse import quote

from fsspec.callbacks import Callback
from tqdm.auto import tqdm

from textmill import storage
from textmill.errors import UserError

log = logging.getLogger(__name__)

MANIFEST = "MANIFEST.json"
LATEST = "LATEST"
VERSION_TIME = "%Y%m%dT%H%M%SZ"
HASH_CHARS = 12
RETRIES = 4                 # attempts per file transfer before the error is re-raised
BACKOFF_S = 0.5             # first retry delay, doubled on each attempt
CAS_ATTEMPTS = 8            # times a publisher re-reads LATEST after losing a compare-and-set
STALE_INCOMPLETE_S = 86400  # gc removes incomplete versions (no MANIFEST) older than this: a publish died there


class VerificationError(UserError):
    """Files that do not match their MANIFEST entry (size or sha256), or are missing. Lists every bad file."""


class LatestConflict(UserError):
    """LATEST kept changing under a publisher (racing publishers); nothing was overwritten."""


@dataclass
class PublishResult:
    version: str
    moved_latest: bool
    noop: bool
    message: str
    live_val_loss: float | None = None
    new_val_loss: float | None = None
    live_version: str | None = None  # LATEST before this publish (None: first version of the model)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ---------------------------------------------------------------------------------------------------------------- hashing

def file_entries(folder: Path) -> list[dict[str, Any]]:
    """[{path, size, sha256}] for every file under `folder`, sorted by POSIX relative path."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: export folder not found; run `textmill convert` first or pass the right folder")
    entries = []
    for p in sorted(folder.rglob("*")):
        if p.is_file():
            rel = p.relative_to(folder).as_posix()
            if rel == MANIFEST:
                raise UserError(f"{p}: an export folder must not contain {MANIFEST} (the registry writes it); remove it")
            entries.append({"path": rel, "size": p.stat().st_size, "sha256": storage.sha256_file(p)})
    if not entries:
        raise UserError(f"{folder}: export folder is empty; nothing to publish")
    return entries


def content_hash(entries: Iterable[dict[str, Any]]) -> str:
    """sha256 over the sorted (path, sha256) list: the same files give the same hash whenever they are published."""
    h = hashlib.sha256()
    for path, sha in sorted((e["path"], e["sha256"]) for e in entries):
        h.update(f"{path}\0{sha}\n".encode())
    return h.hexdigest()


def make_version(created: datetime, entries: Iterable[dict[str, Any]]) -> str:
    return f"{created.strftime(VERSION_TIME)}-{content_hash(entries)[:HASH_CHARS]}"


def version_time(version: str) -> datetime | None:
    try:
        return datetime.strptime(version.split("-", 1)[0], VERSION_TIME).replace(tzinfo=timezone.utc)
    except ValueError:
        return None


def verify_folder(folder: Path, manifest: dict) -> None:
    """Check every MANIFEST file in `folder` (size, then sha256); raise VerificationError listing each bad one."""
    folder = Path(folder)
    problems = [p for e in manifest["files"] if (p := _check_file(folder / e["path"], e))]
    if problems:
        raise VerificationError(f"{folder}: {len(problems)} file(s) do not match {MANIFEST}: " + "; ".join(problems))


def _check_file(path: Path, entry: dict[str, Any]) -> str | None:
    """None when `path` matches its manifest entry, else what is wrong."""
    if not path.is_file():
        return f"{entry['path']}: missing"
    size = path.stat().st_size
    if size != entry["size"]:
        return f"{entry['path']}: size {size} != {entry['size']}"
    sha = storage.sha256_file(path)
    if sha != entry["sha256"]:
        return f"{entry['path']}: sha256 {sha[:12]}… != {entry['sha256'][:12]}…"
    return None


# -------------------------------------------------------------------------------------------------------------- transfers

class _BarCallback(Callback):
    """Forwards fsspec's per-file byte progress into one tqdm bar over all files."""

    def __init__(self, bar: tqdm):
        super().__init__()
        self.bar, self.done = bar, 0

    def call(self, *args, **kwargs):
        if self.value > self.done:
            self.bar.update(self.value - self.done)
            self.done = self.value


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    code = getattr(exc, "code", None)  # gcsfs.retry.HttpError after gcsfs' own retries gave up
    if isinstance(code, int) and (code >= 500 or code == 429):
        return True
    try:
        import aiohttp
    except ImportError:
        return False
    return isinstance(exc, aiohttp.ClientError)


def _with_retries(what: str, fn: Callable[[], Any]) -> Any:
    """Run `fn`, retrying transient network errors with exponential backoff, then re-raise the last one."""
    for attempt in range(RETRIES):
        try:
            return fn()
        except Exception as e:
            if not _is_transient(e) or attempt == RETRIES - 1:
                raise
            delay = BACKOFF_S * 2**attempt
            log.warning("%s failed (%s: %s); retry %d/%d in %.1fs", what, type(e).__name__, e, attempt + 1, RETRIES - 1, delay)
            time.sleep(delay)
    raise AssertionError("unreachable")


def _fmt_loss(x: float | None) -> str:
    return "none" if x is None else f"{x:.4f}"


# --------------------------------------------------------------------------------------------------------------- registry

class Registry:
    """A registry root (`gs://bucket/prefix`, a local folder, or any fsspec URI)."""

    def __init__(self, root: str):
        self.root = str(root)
        self.fs, self._base = storage.filesystem(self.root)
        self._local = storage.is_local(self.root)
        self._gcs = "gs" in (self.fs.protocol if isinstance(self.fs.protocol, tuple) else (self.fs.protocol,))

    def __repr__(self) -> str:
        return f"Registry({self.root!r})"

    def _path(self, *parts: str) -> str:
        return "/".join([self._base.rstrip("/"), *parts]) if self._base else "/".join(parts)

    def _fresh(self, path: str | None = None) -> None:
        """Drop fsspec's listing cache: other processes publish while this one runs."""
        self.fs.invalidate_cache(path)

    # ------------------------------------------------------------------------------------------------------ read side
    def models(self) -> list[str]:
        """Models with a LATEST or at least one complete version."""
        self._fresh()
        found = self.fs.glob(self._path("*", LATEST)) + self.fs.glob(self._path("*", "*", MANIFEST))
        base = self._path("")
        return sorted({p[len(base):].split("/", 1)[0] for p in found if p.startswith(base)})

    def versions(self, model: str) -> list[str]:
        """Complete versions (with MANIFEST.json), oldest to newest (ids sort by time)."""
        self._fresh()
        return sorted(p.rsplit("/", 2)[-2] for p in self.fs.glob(self._path(model, "*", MANIFEST)))

    def _all_version_dirs(self, model: str) -> list[str]:
        self._fresh()
        try:
            entries = self.fs.ls(self._path(model), detail=True)
        except FileNotFoundError:
            return []
        return sorted(e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")

    def latest(self, model: str) -> str | None:
        try:
            return self.fs.cat_file(self._path(model, LATEST)).decode().strip() or None
        except FileNotFoundError:
            return None

    def manifest(self, model: str, version: str) -> dict:
        path = self._path(model, version, MANIFEST)
        try:
            return json.loads(self.fs.cat_file(path))
        except FileNotFoundError:
            raise UserError(f"{self.root}: no version {model}@{version} (complete versions: {self.versions(model)}); "
                            f"see `textmill models ls {self.root}`") from None
        except json.JSONDecodeError as e:
            raise VerificationError(f"{storage.join(self.root, model, version, MANIFEST)}: not valid JSON ({e})") from None

    def download(self, model: str, version: str, dest: Path, *, reuse: Iterable[Path] = (),
                 progress: bool = False) -> Path:
        """Fill a temp folder beside `dest` (reusing files with a matching sha256 from `reuse` folders, downloading the
        rest), verify every file against the MANIFEST, then rename it to `dest`. On a mismatch: VerificationError,
        `dest` untouched. The folder also gets the version's MANIFEST.json."""
        manifest = self.manifest(model, version)
        dest = Path(dest)
        local = _reusable_files(reuse)
        with storage.atomic_path(dest) as tmp:
            tmp.mkdir(parents=True)
            problems = self._fill(model, version, manifest, tmp, local, progress)
            if problems:
                raise VerificationError(f"{storage.join(self.root, model, version)}: {len(problems)} file(s) do not "
                                        f"match {MANIFEST}: " + "; ".join(problems) + "; the download was discarded")
            (tmp / MANIFEST).write_bytes(_manifest_bytes(manifest))
        return dest

    def _fill(self, model: str, version: str, manifest: dict, tmp: Path, local: dict[str, Path],
              progress: bool) -> list[str]:
        files = manifest["files"]
        problems = []
        with tqdm(total=sum(e["size"] for e in files), unit="B", unit_scale=True, disable=not progress,
                  desc=f"{model}@{version}") as bar:
            for e in files:
                target = tmp / e["path"]
                target.parent.mkdir(parents=True, exist_ok=True)
                if e["sha256"] in local and _link_or_copy(local[e["sha256"]], target) and not _check_file(target, e):
                    bar.update(e["size"])
                    continue
                target.unlink(missing_ok=True)
                remote = self._path(model, version, *e["path"].split("/"))
                try:
                    self._get(remote, target, bar)
                except FileNotFoundError:
                    problems.append(f"{e['path']}: missing in the registry")
                    continue
                if problem := _check_file(target, e):
                    problems.append(problem)
        return problems

    def _get(self, remote: str, target: Path, bar: tqdm) -> None:
        def attempt():
            cb = _BarCallback(bar)
            try:
                self.fs.get_file(remote, str(target), callback=cb)
            except BaseException:
                bar.update(-cb.done)
                raise
            bar.update(max(target.stat().st_size - cb.done, 0))
        _with_retries(f"download {remote}", attempt)

    # ----------------------------------------------------------------------------------------------------- write side
    def publish(self, model: str, export_dir: Path, *, metrics: dict, provenance: dict, force: bool = False,
                tolerance: float = 0.05, progress: bool = True,
                on_uploaded: Callable[[str], None] | None = None) -> PublishResult:
        """Upload `export_dir` as a new version, then move LATEST to it unless the gate refuses (see module doc).

        `on_uploaded(path)` is called after each file (relative path; MANIFEST.json last) — for progress hooks and tests.
        """
        new_loss = _val_loss(metrics, f"metrics for {model}")
        entries = file_entries(Path(export_dir))
        digest = content_hash(entries)[:HASH_CHARS]
        existing = self.versions(model)
        same = [v for v in existing if v.endswith("-" + digest)]
        if same:
            live = self.latest(model)
            if live == same[-1]:
                return PublishResult(same[-1], False, True, f"{model}: identical content is already published as "
                                     f"{same[-1]}, the live version; nothing uploaded", None, new_loss, live)
            # Uploaded before but not live (the gate refused it, or it was rolled back): nothing to upload, but the
            # gate (or --force) decides about LATEST again, so `publish --force` after a refusal does what it says.
            return self._move_latest(model, same[-1], new_loss, force=force, tolerance=tolerance)
        created = _next_time(existing)
        version = make_version(created, entries)
        manifest = {"model": model, "version": version, "created": created.isoformat().replace("+00:00", "Z"),
                    "files": entries, "metrics": metrics, "provenance": provenance}
        self._upload(model, version, Path(export_dir), entries, progress, on_uploaded)
        self._write(self._path(model, version, MANIFEST), _manifest_bytes(manifest))
        if on_uploaded:
            on_uploaded(MANIFEST)
        return self._move_latest(model, version, new_loss, force=force, tolerance=tolerance)

    def _upload(self, model: str, version: str, folder: Path, entries: list[dict], progress: bool,
                on_uploaded: Callable[[str], None] | None) -> None:
        with tqdm(total=sum(e["size"] for e in entries), unit="B", unit_scale=True, disable=not progress,
                  desc=f"publish {model}@{version}") as bar:
            for e in entries:
                remote = self._path(model, version, *e["path"].split("/"))
                if self._local:
                    Path(remote).parent.mkdir(parents=True, exist_ok=True)

                def attempt(src=folder / e["path"], remote=remote):
                    cb = _BarCallback(bar)
                    try:
                        self.fs.put_file(str(src), remote, callback=cb)
                    except BaseException:
                        bar.update(-cb.done)
                        raise
                    bar.update(max(src.stat().st_size - cb.done, 0))
                _with_retries(f"upload {remote}", attempt)
                if on_uploaded:
                    on_uploaded(e["path"])

    def _write(self, path: str, data: bytes) -> None:
        """Write a small object whole: a temp file + rename on local folders; one upload request (atomic) on GCS."""
        if self._local:
            with storage.atomic_path(path) as tmp:
                tmp.write_bytes(data)
        else:
            _with_retries(f"write {path}", lambda: self.fs.pipe_file(path, data))

    def _move_latest(self, model: str, version: str, new_loss: float, *, force: bool, tolerance: float) -> PublishResult:
        """Gate against the live version, then compare-and-set LATEST; on losing a race re-read and decide again."""
        for _ in range(CAS_ATTEMPTS):
            with self._latest_cas(model) as (live, swap):
                live_loss = _val_loss(self.manifest(model, live)["metrics"], f"live {model}@{live}") if live else None
                worse = live_loss is not None and new_loss > live_loss + tolerance
                numbers = f"new val_loss {_fmt_loss(new_loss)} vs live {live or '-'} val_loss {_fmt_loss(live_loss)}" \
                          f" (tolerance {tolerance})"
                if worse and not force:
                    return PublishResult(version, False, False, f"{model}@{version} uploaded but LATEST not moved: "
                                         f"gate refused, {numbers}; pass --force to publish anyway", live_loss, new_loss, live)
                if swap(version):
                    how = "forced past the gate" if worse else "passed the gate"
                    return PublishResult(version, True, False, f"{model}: LATEST -> {version} ({how}: {numbers})",
                                         live_loss, new_loss, live)
            log.info("%s: LATEST changed while publishing %s; re-reading the live version", model, version)
        raise LatestConflict(f"{storage.join(self.root, model, LATEST)}: changed {CAS_ATTEMPTS} times while publishing "
                             f"{version}; the version is uploaded, run `textmill rollback {model} {version}` to make it live")

    @contextlib.contextmanager
    def _latest_cas(self, model: str) -> Iterator[tuple[str | None, Callable[[str], bool]]]:
        """Yield (live version, swap); swap(new) sets LATEST if nobody moved it since it was read, returning success."""
        path = self._path(model, LATEST)
        if self._local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with _flock(Path(path).with_name(".LATEST.lock")):
                yield self.latest(model), lambda new: self._put_latest(path, new)
        elif self._gcs:
            self._fresh(path)
            try:
                generation = str(self.fs.info(path)["generation"])
            except FileNotFoundError:
                generation = "0"  # GCS: ifGenerationMatch=0 means "only if the object does not exist"
            yield self.latest(model), lambda new: self._gcs_put_if(path, f"{new}\n".encode(), generation)
        else:  # other object stores: no precondition available through fsspec; last writer wins
            yield self.latest(model), lambda new: self._put_latest(path, new)

    def _put_latest(self, path: str, version: str) -> bool:
        self._write(path, f"{version}\n".encode())
        return True

    def _gcs_put_if(self, path: str, data: bytes, generation: str) -> bool:
        """One upload with an `ifGenerationMatch` precondition; False when GCS answers 412 (someone moved LATEST)."""
        bucket, key, _ = self.fs.split_path(path)
        try:
            self.fs.call("POST", f"{self.fs._location}/upload/storage/v1/b/{quote(bucket)}/o", uploadType="media",
                         name=key, ifGenerationMatch=generation, data=data,
                         headers={"Content-Type": "text/plain"}, json_out=True)
        except FileExistsError:  # gcsfs maps 412 Precondition Failed to FileExistsError
            return False
        finally:
            self._fresh(path)
        return True

    def rollback(self, model: str, version: str) -> None:
        """Point LATEST at an existing complete version (no gate: the operator chose it)."""
        if version not in self.versions(model):
            raise UserError(f"{self.root}: no complete version {model}@{version}; complete versions: {self.versions(model)}")
        for _ in range(CAS_ATTEMPTS):
            with self._latest_cas(model) as (_, swap):
                if swap(version):
                    return
        raise LatestConflict(f"{storage.join(self.root, model, LATEST)}: kept changing; rollback to {version} not done")

    def gc(self, model: str, keep: int) -> list[str]:
        """Delete all but the newest `keep` complete versions (never the live one), and incomplete versions left by a
        publish that died more than a day ago. Returns the deleted version ids."""
        if keep < 0:
            raise UserError(f"gc --keep must be >= 0 (got {keep})")
        complete = self.versions(model)
        live = self.latest(model)
        doomed = [v for v in complete[: max(len(complete) - keep, 0)] if v != live]
        now = datetime.now(timezone.utc)
        doomed += [v for v in self._all_version_dirs(model) if v not in complete and v != live
                   and (t := version_time(v)) is not None and (now - t).total_seconds() > STALE_INCOMPLETE_S]
        deleted = []
        for v in sorted(doomed):
            # Re-read LATEST right before (under the local lock, which rollback and publish also take): a rollback to `v`
            # since the listing above must win. MANIFEST goes first: a half-deleted version is then incomplete
            # (invisible), never a complete one missing files.
            with self._latest_cas(model) as (live_now, _swap):
                if live_now == v:
                    continue
                with contextlib.suppress(FileNotFoundError):
                    self.fs.rm_file(self._path(model, v, MANIFEST))
            self.fs.rm(self._path(model, v), recursive=True)
            deleted.append(v)
        self._fresh()
        return deleted


# ---------------------------------------------------------------------------------------------------------------- helpers

def _val_loss(metrics: dict, what: str) -> float:
    try:
        return float(metrics["val_loss"])
    except (KeyError, TypeError, ValueError):
        raise UserError(f"{what}: no numeric `val_loss` (got keys {sorted(metrics) if isinstance(metrics, dict) else metrics!r}); "
                        "run `textmill evaluate` first") from None


def _next_time(existing: list[str]) -> datetime:
    """Now (UTC, whole seconds), but always after the newest existing version, so ids sort in publish order even for
    two publishes within one second or a publisher whose clock lags another's."""
    now = datetime.now(timezone.utc).replace(microsecond=0)
    newest = max((t for v in existing if (t := version_time(v))), default=None)
    return max(now, newest + timedelta(seconds=1)) if newest else now


def _manifest_bytes(manifest: dict) -> bytes:
    return (json.dumps(manifest, indent=2, sort_keys=True, ensure_ascii=False) + "\n").encode("utf-8")


def _reusable_files(folders: Iterable[Path]) -> dict[str, Path]:
    """sha256 -> local file, from cached version folders' MANIFEST.json (each file is re-checked when reused)."""
    found: dict[str, Path] = {}
    for folder in folders:
        try:
            manifest = json.loads((Path(folder) / MANIFEST).read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError):
            continue  # not a cached version folder: nothing to reuse from it
        for e in manifest.get("files", []):
            found.setdefault(e["sha256"], Path(folder) / e["path"])
    return found


def _link_or_copy(src: Path, dst: Path) -> bool:
    """Hardlink (same disk, no bytes copied), else copy. False when `src` is gone."""
    try:
        os.link(src, dst)
    except FileNotFoundError:
        return False
    except OSError:
        try:
            shutil.copyfile(src, dst)
        except FileNotFoundError:
            return False
    return True


@contextlib.contextmanager
def _flock(path: Path) -> Iterator[None]:
    """An exclusive lock on a local lock file; the kernel releases it when the holder dies (even on SIGKILL)."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)
