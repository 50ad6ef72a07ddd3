"""Storage URIs through fsspec (gs://, https://, local paths) and atomic local writes (temp path, then rename).

Credentials for gs:// follow Google's order (see README "Publishing to GCS"): `GOOGLE_APPLICATION_CREDENTIALS` (a service
account JSON), then Application Default Credentials (gcloud / metadata server); `STORAGE_EMULATOR_HOST` switches to an
emulator with anonymous access.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Iterator

# gcsfs probes the experimental hierarchical-namespace API on every call; an emulator does not answer it and each call then
# hangs ~60 s. This must be set before gcsfs is first imported, so it lives at import time of the module that imports it.
if os.environ.get("STORAGE_EMULATOR_HOST"):
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402
from fsspec.core import url_to_fs  # noqa: E402

CHUNK = 8 * 1024 * 1024


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for a URI: anonymous access against an emulator, the default credential chain otherwise."""
    if uri.startswith(("gs://", "gcs://")):
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return {"token": "anon"}
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            return {"token": os.environ["GOOGLE_APPLICATION_CREDENTIALS"]}
        return {"token": "google_default"}
    return {}


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URI or local path."""
    uri = str(uri)
    fs, path = url_to_fs(uri, **storage_options(uri))
    return fs, path.rstrip("/") if path not in ("/", "") else path


def is_local(uri: str) -> bool:
    return "://" not in str(uri) or str(uri).startswith("file://")


def join(uri: str, *parts: str) -> str:
    return "/".join([str(uri).rstrip("/"), *[p.strip("/") for p in parts]])


def sha256_file(path: str | os.PathLike, chunk: int = CHUNK) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


OWNER_FILE = ".owner.json"


def _boot_id() -> str:
    try:
        return Path("/proc/sys/kernel/random/boot_id").read_text().strip()
    except OSError:
        return ""


def _start_time(pid: int) -> str:
    """A process's start time in clock ticks since boot (field 22 of /proc/<pid>/stat; "" where there is no /proc)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _owner() -> dict[str, Any]:
    return {"pid": os.getpid(), "boot_id": _boot_id(), "start": _start_time(os.getpid())}


def _owner_gone(owner: dict[str, Any]) -> bool:
    """Whether the process that made a temp folder has ended: another boot, no such pid, or a new process on its pid."""
    pid = owner.get("pid")
    if not isinstance(pid, int) or pid <= 0:
        return False  # not ours to judge
    if owner.get("boot_id") and owner["boot_id"] != _boot_id():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False  # alive, someone else's
    return bool(owner.get("start")) and _start_time(pid) not in ("", owner["start"])


def remove_stale_temps(dest: Path) -> list[Path]:
    """Remove `.<dest name>.*.tmp` folders beside `dest` left by runs that were killed (their owner process is gone).

    Folders of live runs, and folders without an owner record, are left alone. Returns the folders removed."""
    removed = []
    prefix = f".{dest.name}."
    try:
        entries = list(os.scandir(dest.parent))
    except OSError:
        return removed
    for entry in entries:
        if not (entry.name.startswith(prefix) and entry.name.endswith(".tmp") and entry.is_dir(follow_symlinks=False)):
            continue
        try:
            owner = json.loads((Path(entry.path) / OWNER_FILE).read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(owner, dict) and _owner_gone(owner):
            shutil.rmtree(entry.path, ignore_errors=True)
            removed.append(Path(entry.path))
    return removed


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike) -> Iterator[Path]:
    """Yield a temp path beside `dest`; on success rename it onto `dest` (file or folder), on error remove it.

    Readers never see a half-written file or folder. A folder `dest` that already exists is replaced whole. The temp
    folder `.<name>.<random>.tmp` records its owner (pid, boot id, process start time), so the next run writing `dest`
    removes the ones whose owner was killed (SIGKILL, power loss) instead of leaving gigabytes behind.
    """
    dest = Path(dest).absolute()  # `.` and `x/..` get a real name
    dest.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(dest)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    target = tmp / dest.name
    try:
        (tmp / OWNER_FILE).write_text(json.dumps(_owner()), encoding="utf-8")
        yield target
        if dest.is_dir() and not dest.is_symlink():
            # The old folder is parked inside this run's unique temp folder, so a run killed while deleting it leaves
            # only a uniquely named `.<name>.*.tmp` behind, never a name the next run would collide with.
            dest.rename(tmp / "old")
            target.rename(dest)
        else:
            os.replace(target, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_REQUIRED = object()


def read_json(path: str | os.PathLike, *, fix: str, default: Any = _REQUIRED) -> Any:
    """Parse a JSON file. Missing: `default`, or a UserError saying `fix`; invalid: a UserError with the line and `fix`."""
    from textmill.errors import UserError

    path = Path(path)
    if not path.is_file():
        if default is _REQUIRED:
            raise UserError(f"{path}: not found; {fix}")
        return default
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: invalid JSON ({e.msg}); {fix}") from None


def write_text_atomic(dest: str | os.PathLike, text: str) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_json_atomic(dest: str | os.PathLike, obj: Any) -> None:
    """Deterministic JSON (sorted keys, 2-space indent, trailing newline) written atomically."""
    write_text_atomic(dest, json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
