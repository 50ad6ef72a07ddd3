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
import re
import shutil
import stat
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
MAX_CLOCK_LEAD = timedelta(days=1)  # versions dated further ahead of now are not used to date a new one

# Untrusted names: everything read from a registry, and every name a user passes that becomes a path, must match these.
MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
VERSION_ID = re.compile(r"[0-9]{8}T[0-9]{6}Z-[0-9a-f]{%d}" % HASH_CHARS)
PATH_SEGMENT = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}")  # no leading dot: no `.`, `..`, hidden or temp names
MAX_PATH_CHARS = 255
MAX_DEPTH = 8
MAX_FILES = 10_000
MAX_LATEST_BYTES = 64           # a version id is 30 characters
MAX_MANIFEST_BYTES = 16 << 20   # a manifest lists files and a little provenance; anything larger is not ours
SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class VerificationError(UserError):
    """Files that do not match their MANIFEST entry (size or sha256), or are missing. Lists every bad file."""


class UntrustedData(VerificationError):
    """A model name, version id, LATEST text, MANIFEST field or file path that is not in the registry's format.

    `kind` says which (`model_name`, `version_id`, `latest`, `manifest`, `manifest_path`, `symlink`): serving counts
    rejections by it. Raised before anything is created, changed or deleted because of the value."""

    def __init__(self, message: str, kind: str) -> None:
        super().__init__(message)
        self.kind = kind


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
    back_to_older: bool = False      # the content equals an older, non-live version: LATEST moves (back) to that one

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


# ------------------------------------------------------------------------------------------------------- untrusted names

def shown(value: Any, limit: int = 80) -> str:
    """`repr` of an untrusted value, cut to `limit` characters: safe to put in a log line or terminal (no raw newline,
    escape sequence or megabyte of text reaches either)."""
    text = ascii(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check_model_name(name: Any, where: str = "model name") -> str:
    """Return `name` if it is a valid model name (ASCII letters, digits, `.`, `_`, `-`; starts with a letter or digit;
    at most 64 characters), else raise UntrustedData(kind="model_name") naming `where`."""
    if not isinstance(name, str) or not MODEL_NAME.fullmatch(name):
        raise UntrustedData(f"{where}: {shown(name)} is not a valid model name (1-64 ASCII letters, digits, '.', '_', "
                            "'-'; starting with a letter or digit)", "model_name")
    return name


def check_version_id(version: Any, where: str = "version id") -> str:
    """Return `version` if it is exactly the format `publish` writes, `YYYYMMDDTHHMMSSZ-<12 lowercase hex>` with a real
    date and time, else raise UntrustedData(kind="version_id") naming `where`."""
    if not isinstance(version, str) or not VERSION_ID.fullmatch(version) or version_time(version) is None:
        raise UntrustedData(f"{where}: {shown(version)} is not a version id (YYYYMMDDTHHMMSSZ-<{HASH_CHARS} hex>, as "
                            "`textmill publish` writes)", "version_id")
    return version


def check_file_path(path: Any, where: str = "file path") -> str:
    """Return `path` if it is a safe relative POSIX path inside a version folder, else raise UntrustedData
    (kind="manifest_path"): `/`-separated segments of ASCII letters, digits, `.`, `_`, `-`, none empty and none
    starting with `.` (so no `.`, `..`, hidden or temp names), not absolute, no backslash or drive letter (`:`), no
    NUL/control or non-ASCII character (so no look-alike of `/` or `.`), at most 8 deep and 255 characters, and not
    the reserved MANIFEST.json at the top."""
    problem = None
    if not isinstance(path, str):
        problem = "not a string"
    elif len(path) > MAX_PATH_CHARS:
        problem = f"longer than {MAX_PATH_CHARS} characters"
    elif path == MANIFEST:
        problem = f"{MANIFEST} is the registry's own file"
    else:
        segments = path.split("/")
        if len(segments) > MAX_DEPTH:
            problem = f"more than {MAX_DEPTH} folders deep"
        elif not all(PATH_SEGMENT.fullmatch(seg) for seg in segments):
            problem = ("not a relative path of '/'-separated names made of ASCII letters, digits, '.', '_', '-' "
                       "(no empty, '.', '..' or hidden segment, no leading or trailing '/', no backslash, drive or "
                       "control character)")
    if problem:
        raise UntrustedData(f"{where}: {shown(path)}: {problem}", "manifest_path")
    return path


def check_manifest(manifest: Any, model: str, version: str, where: str) -> dict:
    """Validate a parsed MANIFEST.json of `model@version` read from `where` (a registry or a cache): `model` and
    `version` fields equal the folder's, `files` is a non-empty list of {path, size, sha256} with safe, unique paths
    (compared case-insensitively, and no file doubling as a folder), sizes non-negative ints, sha256 64 lowercase hex,
    and the version's content hash matches the files. Returns the manifest; raises UntrustedData."""
    def bad(problem: str, kind: str = "manifest") -> UntrustedData:
        return UntrustedData(f"{where}: {problem}; the version is not trusted (re-publish it)", kind)

    if not isinstance(manifest, dict):
        raise bad("not a JSON object")
    if manifest.get("model") != model or manifest.get("version") != version:
        raise bad(f"names {shown(manifest.get('model'))}@{shown(manifest.get('version'))}, but it is stored as "
                  f"{model}@{version}")
    files = manifest.get("files")
    if not isinstance(files, list) or not files or len(files) > MAX_FILES:
        raise bad(f"`files` must be a list of 1 to {MAX_FILES} entries")
    if not isinstance(manifest.get("metrics", {}), dict):
        raise bad("`metrics` is not an object")
    seen: set[str] = set()
    for i, e in enumerate(files):
        if not isinstance(e, dict):
            raise bad(f"files[{i}] is not an object")
        path = check_file_path(e.get("path"), f"{where}: files[{i}].path")
        size, sha = e.get("size"), e.get("sha256")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise bad(f"files[{i}] ({path}): size {shown(size)} is not a non-negative integer")
        if not isinstance(sha, str) or not SHA256_HEX.fullmatch(sha):
            raise bad(f"files[{i}] ({path}): sha256 {shown(sha)} is not 64 lowercase hex digits")
        key = path.casefold()
        if key in seen:
            raise bad(f"files[{i}]: {path} is listed twice (paths are compared case-insensitively)", "manifest_path")
        seen.add(key)
    for key in seen:  # `a` as a file and `a/b`: one of them cannot be written
        parts = key.split("/")
        if any("/".join(parts[:n]) in seen for n in range(1, len(parts))):
            raise bad(f"{key}: a listed file is also used as a folder", "manifest_path")
    if not version.endswith("-" + content_hash(files)[:HASH_CHARS]):
        raise bad(f"the files hash to {content_hash(files)[:HASH_CHARS]}, not to the id's {version[-HASH_CHARS:]}")
    return manifest


def inside(folder: Path, rel: str) -> Path | None:
    """`folder/rel` when it is a regular file that is not a symlink and, resolved, lies inside `folder` (no symlinked
    folder on the way out); else None."""
    path = Path(folder) / rel
    try:
        if not stat.S_ISREG(os.lstat(path).st_mode):
            return None
        path.resolve(strict=True).relative_to(Path(folder).resolve(strict=True))
    except (OSError, ValueError):
        return None
    return path


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
            check_file_path(rel, f"{folder}: file name (rename or remove it before publishing)")
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


def export_identity(folder: Path) -> dict[str, Any]:
    """What identifies an export folder's content: `{"content_hash": <sha256 hex of content_hash>, "files": {path:
    sha256}}` over every file (the same hashing publish does). `evaluate` records it in its report; `publish` refuses
    a report whose identity differs from the folder it is about to upload."""
    entries = file_entries(Path(folder))
    return {"content_hash": content_hash(entries), "files": {e["path"]: e["sha256"] for e in entries}}


def identity_mismatch(scored: Any, entries: list[dict[str, Any]]) -> str | None:
    """None when `scored` (an `export_identity` from a report) names exactly the files in `entries`, else a short
    account of the difference (changed / added / removed files and both content hashes)."""
    actual = content_hash(entries)
    if not isinstance(scored, dict) or not isinstance(scored.get("files"), dict):
        return "the report does not identify the export it scored (written before reports did)"
    if scored.get("content_hash") == actual:
        return None
    have = {e["path"]: e["sha256"] for e in entries}
    want = scored["files"]
    parts = [f"{label}: {', '.join(shown(p) for p in sorted(paths)[:5])}" for label, paths in (
        ("changed since", [p for p in have if p in want and want[p] != have[p]]),
        ("added since", [p for p in have if p not in want]),
        ("removed since", [p for p in want if p not in have])) if paths]
    return (f"it scored content {shown(str(scored.get('content_hash'))[:12])}, the folder now holds {actual[:12]!r} "
            f"({'; '.join(parts) or 'same files, different hash'})")


def make_version(created: datetime, entries: Iterable[dict[str, Any]]) -> str:
    """`YYYYMMDDTHHMMSSZ-<first 12 hex of content_hash>`: sorts by time, names the content."""
    return f"{created.strftime(VERSION_TIME)}-{content_hash(entries)[:HASH_CHARS]}"


def version_time(version: str) -> datetime | None:
    """The UTC time in a version id, or None when it has none."""
    try:
        return datetime.strptime(version.split("-", 1)[0], VERSION_TIME).replace(tzinfo=timezone.utc)
    except (ValueError, AttributeError):
        return None


def verify_folder(folder: Path, manifest: dict) -> None:
    """Check every MANIFEST file in `folder` (size, then sha256); raise VerificationError listing each bad one
    (UntrustedData for a path that is not a safe relative path: nothing outside `folder` is read)."""
    folder = Path(folder)
    problems = [p for e in manifest["files"] if (p := _check_file(folder / check_file_path(e["path"]), e))]
    if problems:
        raise VerificationError(f"{folder}: {len(problems)} file(s) do not match {MANIFEST}: " + "; ".join(problems))


def _check_file(path: Path, entry: dict[str, Any]) -> str | None:
    """None when `path` matches its manifest entry, else what is wrong. A symlink never matches."""
    if path.is_symlink():
        return f"{entry['path']}: a symlink, not a file"
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
    def listing(self) -> tuple[list[str], list[str]]:
        """(valid model names, folder names that are not valid model names) of the models with a LATEST or at least
        one complete version. The second list is untrusted text: show it with `shown`."""
        self._fresh()
        found = self.fs.glob(self._path("*", LATEST)) + self.fs.glob(self._path("*", "*", MANIFEST))
        base = self._path("")
        names = {p[len(base):].split("/", 1)[0] for p in found if p.startswith(base)}
        valid = sorted(n for n in names if MODEL_NAME.fullmatch(n))
        return valid, sorted(names.difference(valid))

    def models(self) -> list[str]:
        """Models with a LATEST or at least one complete version; folders whose name is not a valid model name are
        left out (logged)."""
        valid, rejected = self.listing()
        for name in rejected:
            log.warning("registry %s: ignoring folder %s: not a valid model name", self.root, shown(name))
        return valid

    def versions(self, model: str) -> list[str]:
        """Complete versions (with MANIFEST.json), oldest to newest (ids sort by time). Folders whose name is not a
        version id are left out (logged)."""
        check_model_name(model)
        self._fresh()
        names = sorted(p.rsplit("/", 2)[-2] for p in self.fs.glob(self._path(model, "*", MANIFEST)))
        for name in names:
            if not VERSION_ID.fullmatch(name) or version_time(name) is None:
                log.warning("registry %s: ignoring %s/%s: not a version id", self.root, model, shown(name))
        return [n for n in names if VERSION_ID.fullmatch(n) and version_time(n) is not None]

    def _all_version_dirs(self, model: str) -> list[str]:
        """Folders under `model` named like version ids (complete or not)."""
        self._fresh()
        try:
            entries = self.fs.ls(self._path(model), detail=True)
        except FileNotFoundError:
            return []
        names = (e["name"].rstrip("/").rsplit("/", 1)[-1] for e in entries if e["type"] == "directory")
        return sorted(n for n in names if VERSION_ID.fullmatch(n) and version_time(n) is not None)

    def latest(self, model: str) -> str | None:
        """The version id in `<model>/LATEST` (None when there is no LATEST). Its text must be exactly a version id,
        optionally followed by one newline (what publish writes); anything else raises UntrustedData(kind="latest")."""
        check_model_name(model)
        path = self._path(model, LATEST)
        try:
            raw = self.fs.cat_file(path, start=0, end=MAX_LATEST_BYTES + 1)
        except FileNotFoundError:
            return None
        text = raw[:-1] if raw.endswith(b"\n") else raw
        try:
            return check_version_id(text.decode("ascii"), storage.join(self.root, model, LATEST))
        except (UnicodeDecodeError, UntrustedData):
            raise UntrustedData(f"{storage.join(self.root, model, LATEST)}: holds {shown(raw)}, not a version id "
                                f"(YYYYMMDDTHHMMSSZ-<{HASH_CHARS} hex> and one newline); nothing was done with it. Fix "
                                f"it with `textmill rollback {model} <version>`", "latest") from None

    def manifest(self, model: str, version: str) -> dict:
        """The parsed, validated MANIFEST.json of `model@version` (see `check_manifest`). Raises UserError when the
        version is not complete, UntrustedData when the manifest is malformed, too large or hostile."""
        check_model_name(model)
        check_version_id(version, f"{model}@{shown(version)}")
        where = storage.join(self.root, model, version, MANIFEST)
        try:
            raw = self.fs.cat_file(self._path(model, version, MANIFEST), start=0, end=MAX_MANIFEST_BYTES + 1)
        except FileNotFoundError:
            raise UserError(f"{self.root}: no version {model}@{version} (complete versions: {self.versions(model)}); "
                            f"see `textmill models ls {self.root}`") from None
        if len(raw) > MAX_MANIFEST_BYTES:
            raise UntrustedData(f"{where}: larger than {MAX_MANIFEST_BYTES} bytes; not a manifest", "manifest")
        try:
            manifest = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise UntrustedData(f"{where}: not valid JSON ({type(e).__name__}: {shown(str(e))})", "manifest") from None
        return check_manifest(manifest, model, version, where)

    def download(self, model: str, version: str, dest: Path, *, reuse: Iterable[Path] = (),
                 progress: bool = False) -> Path:
        """Fill a temp folder beside `dest` (reusing files with a matching sha256 from `reuse` folders, downloading the
        rest), verify every file against the MANIFEST, then rename it to `dest`. On a mismatch: VerificationError,
        `dest` untouched. The folder also gets the version's MANIFEST.json."""
        manifest = self.manifest(model, version)
        dest = Path(dest)
        local = _reusable_files(reuse)
        if self._local:
            self._refuse_symlinks(model, version, manifest)
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
                    # the stored object's size first: a bucket whose object is larger than its manifest entry says
                    # must not cost the node those bytes of disk and bandwidth (on every poll) before it is refused
                    if (stored := self._stored_size(remote)) not in (e["size"], None):
                        shown_size = f"size {stored}" if isinstance(stored, int) else stored
                        problems.append(f"{e['path']}: {shown_size} in the registry, but {MANIFEST} says size "
                                        f"{e['size']}; not downloaded")
                        continue
                    self._get(remote, target, bar)
                except FileNotFoundError:
                    problems.append(f"{e['path']}: missing in the registry")
                    continue
                if problem := _check_file(target, e):
                    problems.append(problem)
        return problems

    def _refuse_symlinks(self, model: str, version: str, manifest: dict) -> None:
        """A local registry: every listed file must be a regular file inside its version folder, not a symlink (which
        would copy any file the node can read into its cache)."""
        folder = Path(self._path(model, version))
        for e in manifest["files"]:
            if (folder / e["path"]).exists() and inside(folder, e["path"]) is None:
                raise UntrustedData(f"{storage.join(self.root, model, version, e['path'])}: a symlink or not a "
                                    "regular file inside its version folder; the version is not trusted", "symlink")

    def _stored_size(self, remote: str) -> int | str | None:
        """The size in bytes of the object `remote`, what it is instead of a file ("a directory entry"), or None when
        the store does not say (an HTTP server without Content-Length: the download's own check then decides);
        FileNotFoundError when it is absent."""
        info = _with_retries(f"stat {remote}", lambda: self.fs.info(remote))
        if info.get("type") not in ("file", None):
            return f"a {info.get('type')} entry"
        size = info.get("size")
        return size if isinstance(size, int) and not isinstance(size, bool) else None

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
                on_uploaded: Callable[[str], None] | None = None,
                scored: tuple[str, dict] | None = None) -> PublishResult:
        """Upload `export_dir` as a new version, then move LATEST to it unless the gate refuses (see module doc).

        `scored=(what, identity)`: the `export_identity` that `metrics` were computed on, from the report named `what`;
        when it does not match the folder being published, nothing is uploaded and UserError names both.
        `on_uploaded(path)` is called after each file (relative path; MANIFEST.json last) — for progress hooks and tests.
        """
        check_model_name(model)
        new_loss = _val_loss(metrics, f"metrics for {model}")
        entries = file_entries(Path(export_dir))
        if scored is not None and (problem := identity_mismatch(scored[1], entries)):
            raise UserError(f"{scored[0]} does not match {export_dir}: {problem}; re-run `textmill evaluate {model}` "
                            "(or `dvc repro`) so the gate judges what is published")
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
            # If it moves, LATEST goes *back* to an older id: say so plainly, it is easy to mistake for a new version.
            result = self._move_latest(model, same[-1], new_loss, force=force, tolerance=tolerance)
            older = live is not None and same[-1] < live
            what = f"{model}: this export is identical to {'the older' if older else 'the'} version {same[-1]} " \
                   "(nothing uploaded); "
            if result.moved_latest:
                result.back_to_older = older
                result.message = what + (f"LATEST moves BACK to it from {live}. " if older else "") + result.message
            else:
                result.message = what + result.message
            return result
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
    def _latest_cas(self, model: str, *, repair: bool = False) -> Iterator[tuple[str | None, Callable[[str], bool]]]:
        """Yield (live version, swap); swap(new) sets LATEST if nobody moved it since it was read, returning success.
        A LATEST that is not a version id raises UntrustedData, unless `repair` (rollback overwrites it; live: None)."""
        check_model_name(model)
        path = self._path(model, LATEST)

        def live() -> str | None:
            try:
                return self.latest(model)
            except UntrustedData:
                if not repair:
                    raise
                return None

        if self._local:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            with _flock(Path(path).with_name(".LATEST.lock")):
                yield live(), lambda new: self._put_latest(path, new)
        elif self._gcs:
            self._fresh(path)
            try:
                generation = str(self.fs.info(path)["generation"])
            except FileNotFoundError:
                generation = "0"  # GCS: ifGenerationMatch=0 means "only if the object does not exist"
            yield live(), lambda new: self._gcs_put_if(path, f"{new}\n".encode(), generation)
        else:  # other object stores: no precondition available through fsspec; last writer wins
            yield live(), lambda new: self._put_latest(path, new)

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
        """Point LATEST at an existing complete version (no gate: the operator chose it). Also repairs a LATEST that
        holds garbage."""
        check_version_id(version, f"rollback {model}")
        if version not in self.versions(model):
            raise UserError(f"{self.root}: no complete version {model}@{version}; complete versions: {self.versions(model)}")
        for _ in range(CAS_ATTEMPTS):
            with self._latest_cas(model, repair=True) as (_, swap):
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
    times = [t for v in existing if (t := version_time(v))]
    # A version dated far ahead (a publisher whose clock was years off, or a hostile folder such as 99991231T235959Z-...)
    # would stamp every later publish after it -- and past year 9999 stop every publish with an OverflowError.
    ahead = [t for t in times if t > now + MAX_CLOCK_LEAD]
    if ahead:
        log.warning("ignoring %d version(s) dated more than %s ahead of this machine's clock (newest %s) when dating "
                    "the new version; check that publisher's clock or remove them", len(ahead), MAX_CLOCK_LEAD,
                    max(ahead).strftime(VERSION_TIME))
    newest = max((t for t in times if t <= now + MAX_CLOCK_LEAD), default=None)
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
        for e in manifest.get("files", []) if isinstance(manifest, dict) else []:
            # A cached MANIFEST is only as good as the disk it sits on: reuse only safe paths to regular files inside
            # the folder (never a symlink or `..` out of it), and every reused file is re-checked by sha256 anyway.
            try:
                src = inside(Path(folder), check_file_path(e.get("path")))
            except (UntrustedData, AttributeError):
                src = None
            if src is not None and isinstance(e.get("sha256"), str):
                found.setdefault(e["sha256"], src)
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
