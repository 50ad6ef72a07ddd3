"""Storage URIs through fsspec (gs://, https://, local paths) and atomic local writes (temp path, then rename).

Credentials for gs:// follow Google's order (see README "Publishing to GCS"): `GOOGLE_APPLICATION_CREDENTIALS` (a service
account JSON), then Application Default Credentials (gcloud / metadata server); `STORAGE_EMULATOR_HOST` switches to an
emulator with anonymous access.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import shutil
import socket
import tempfile
from pathlib import Path
from typing import Any, Iterator

# gcsfs probes the experimental hierarchical-namespace API on every call; an emulator does not answer it and each call then
# hangs ~60 s. This must be set before gcsfs is first imported, so it lives at import time of the module that imports it.
if os.environ.get("STORAGE_EMULATOR_HOST"):
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")

import fsspec  # noqa: E402
from fsspec.core import url_to_fs  # noqa: E402

from textmill.errors import UserError  # noqa: E402

CHUNK = 8 * 1024 * 1024


def storage_options(uri: str) -> dict[str, Any]:
    """fsspec options for a URI: anonymous access against an emulator, the default credential chain otherwise."""
    if uri.startswith(("gs://", "gcs://")):
        if os.environ.get("STORAGE_EMULATOR_HOST"):
            return {"token": "anon"}
        if os.environ.get("GOOGLE_APPLICATION_CREDENTIALS"):
            key = os.environ["GOOGLE_APPLICATION_CREDENTIALS"]
            if not Path(key).is_file():  # gcsfs would take the path for an access token and fail obscurely later
                raise RemoteAccessDenied(f"{uri}: GOOGLE_APPLICATION_CREDENTIALS={key} is not a file; point it at a "
                                         "service account JSON key, or unset it to use `gcloud auth "
                                         "application-default login` credentials")
            return {"token": key}
        return {"token": "google_default"}
    return {}


class RemoteUnavailable(UserError, ConnectionError):
    """A remote URI could not be reached (DNS, refused, timeout): one line naming the URI and what to do. Still a
    ConnectionError, so callers that retry transient network errors keep doing so."""


class RemoteAccessDenied(UserError, PermissionError):
    """No usable credentials for a remote URI, or the account may not do this: one line naming the URI and the fix."""


_CREDENTIALS_FIX = ("run `gcloud auth application-default login`, or set GOOGLE_APPLICATION_CREDENTIALS to a service "
                    "account JSON key (see README \"Publishing to GCS\")")


def _remote_error(e: BaseException, uri: str) -> Exception | None:
    """The one-line error for a network or credential failure on `uri`, or None when `e` is something else."""
    import asyncio

    try:
        from google.auth import exceptions as gauth
    except ImportError:  # pragma: no cover - google-auth comes with gcsfs
        gauth = None
    if gauth is not None and isinstance(e, gauth.DefaultCredentialsError):
        return RemoteAccessDenied(f"{uri}: no Google Cloud credentials found; {_CREDENTIALS_FIX}")
    if gauth is not None and isinstance(e, (gauth.RefreshError, gauth.TransportError)):
        first = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
        return RemoteAccessDenied(f"{uri}: the Google Cloud credentials were refused ({first}); {_CREDENTIALS_FIX}")
    code = getattr(e, "code", None) or getattr(e, "status", None)
    if code in (401, 403):
        return RemoteAccessDenied(f"{uri}: access denied (HTTP {code}); use an account that may read/write it "
                                  f"(roles/storage.objectViewer to read, objectAdmin to publish) or {_CREDENTIALS_FIX}")
    network: tuple = ()
    try:
        import aiohttp

        network += (aiohttp.ClientConnectionError, aiohttp.ServerTimeoutError)
    except ImportError:  # pragma: no cover
        pass
    try:
        import requests  # google.auth fetches tokens through it

        network += (requests.exceptions.ConnectionError, requests.exceptions.Timeout)
    except ImportError:  # pragma: no cover
        pass
    if isinstance(e, (*network, ConnectionError, TimeoutError, asyncio.TimeoutError, socket.gaierror)):
        reason = str(e).splitlines()[0][:200] if str(e) else type(e).__name__
        hint = " (STORAGE_EMULATOR_HOST points there)" if os.environ.get("STORAGE_EMULATOR_HOST") and \
            uri.startswith(("gs://", "gcs://")) else ""
        return RemoteUnavailable(f"{uri}: cannot reach the server{hint}: {reason}; check the network connection, proxy "
                                 "and the URI, then rerun")
    return None


@contextlib.contextmanager
def remote_errors(uri: str) -> Iterator[None]:
    """Turn network and credential failures inside the block into one-line UserErrors naming `uri`."""
    try:
        yield
    except UserError:
        raise
    except Exception as e:
        mapped = _remote_error(e, uri)
        if mapped is None:
            raise
        raise mapped from e


class _Guarded:
    """A remote fsspec filesystem whose method calls raise `remote_errors` instead of aiohttp / google.auth tracebacks.
    Everything else (attributes, results, file objects) is the filesystem's own."""

    def __init__(self, fs: fsspec.AbstractFileSystem, uri: str):
        self._fs, self._uri = fs, uri

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._fs, name)
        if not callable(attr) or name.startswith("__"):
            return attr

        def call(*args: Any, **kwargs: Any) -> Any:
            with remote_errors(self._uri):
                return attr(*args, **kwargs)

        return call

    def __repr__(self) -> str:
        return f"guarded {self._fs!r}"


class _NoTraceback(logging.Filter):
    """gcsfs logs its give-up with a traceback before raising; the raised error is reported (one line), so drop it."""

    def filter(self, record: logging.LogRecord) -> bool:
        record.exc_info, record.exc_text = None, None
        return True


def filesystem(uri: str) -> tuple[fsspec.AbstractFileSystem, str]:
    """(filesystem, path inside it) for any fsspec URI or local path.

    Remote filesystems come guarded: a network or credential failure in any call is a one-line `RemoteUnavailable` /
    `RemoteAccessDenied` (UserErrors) naming the URI and what to do, for every verb that opens storage here (base
    fetch, publish, sync, models ls, ...)."""
    uri = str(uri)
    with remote_errors(uri):
        fs, path = url_to_fs(uri, **storage_options(uri))
    path = path.rstrip("/") if path not in ("/", "") else path
    if is_local(uri):
        return fs, path
    logging.getLogger("gcsfs").addFilter(_NO_TRACEBACK)
    return _Guarded(fs, uri), path  # type: ignore[return-value]


_NO_TRACEBACK = _NoTraceback()


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
