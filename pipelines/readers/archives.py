"""Archives as Kaggle ships them, read in place and streamed: `.zip` (also a zip inside a zip: a competition zip holding
`train.csv.zip`), `.tar`/`.tar.gz`/`.tgz`/`.tar.bz2`/`.tar.xz`, and single compressed files (`train.csv.gz`, `.bz2`, `.xz`).

Every archive is expanded into leaves (plain files, possibly several levels deep) labelled `<file>:<member>[:<member>]`;
junk that archivers add (`__MACOSX/`, `.DS_Store`, `Thumbs.db`, AppleDouble `._*`, other dot files) is skipped and counted.
Nothing is extracted to disk. Encrypted members and compression methods Python cannot read are refused up front.
"""

from __future__ import annotations

import bz2
import gzip
import lzma
import tarfile
import zipfile
import zlib
from contextlib import ExitStack
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import PurePosixPath
from typing import IO, Callable, Iterator

from textmill.errors import UserError

Opener = Callable[[], IO[bytes]]
JUNK_NAMES = {".ds_store", "thumbs.db", "ehthumbs.db", "desktop.ini", "icon\r"}
JUNK_DIRS = {"__macosx", ".git", ".svn", ".ipynb_checkpoints"}
TAR_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz")
COMPRESSED = {".gz": gzip, ".bz2": bz2, ".xz": lzma}
ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
MAX_DEPTH = 4
# What reading a damaged archive member can raise (checked CRCs, truncated streams, bad compressed data).
ARCHIVE_ERRORS = (zipfile.BadZipFile, tarfile.TarError, EOFError, lzma.LZMAError, zlib.error, OSError)


@dataclass
class Leaf:
    """One file to read records from: `label` names it for ids and messages, `name` gives its format by extension."""

    label: str
    name: str
    opener: Opener


def is_junk(path: str) -> bool:
    """Files archivers and desktops add that are never corpus data."""
    parts = [p.lower() for p in PurePosixPath(path.replace("\\", "/")).parts]
    name = parts[-1] if parts else ""
    return (any(p in JUNK_DIRS for p in parts[:-1]) or name in JUNK_NAMES or name.startswith("."))


def selected(label: str, include: list[str], exclude: list[str]) -> bool:
    """Whether a leaf passes the include/exclude globs, matched against its whole label (`a.zip:dir/train.csv`, where
    `*` also crosses `/` and `:`) and against its innermost path (`dir/train.csv`) and name (`train.csv`)."""
    inner = label.rsplit(":", 1)[-1]
    names = (label, inner, PurePosixPath(inner).name)
    if include and not any(fnmatchcase(n, g) for g in include for n in names):
        return False
    return not any(fnmatchcase(n, g) for g in exclude for n in names)


def is_archive(name: str) -> bool:
    low = name.lower()
    return low.endswith((".zip", *TAR_SUFFIXES)) or any(low.endswith(s) for s in COMPRESSED)


def _decompressing(opener: Opener, module) -> Opener:
    def open_() -> IO[bytes]:
        outer = opener()
        inner = module.open(outer, "rb")
        close_inner = inner.close

        def close() -> None:  # closing the decompressor leaves the stream under it open: close both
            try:
                close_inner()
            finally:
                outer.close()

        inner.close = close
        return inner

    return open_


def expand(opener: Opener, label: str, name: str, stack: ExitStack, skipped: dict, depth: int = 0) -> Iterator[Leaf]:
    """The leaves of one file: itself, or its archive members (recursively). Archives stay open in `stack`."""
    low = name.lower()
    if depth > MAX_DEPTH:
        raise UserError(f"{label}: archives nested more than {MAX_DEPTH} deep; extract the outer levels first")
    if low.endswith(".zip"):
        yield from _zip(opener, label, stack, skipped, depth)
    elif low.endswith(TAR_SUFFIXES):
        yield from _tar(opener, label, stack, skipped, depth)
    elif (suffix := next((s for s in COMPRESSED if low.endswith(s)), None)):
        yield from expand(_decompressing(opener, COMPRESSED[suffix]), label, name[: -len(suffix)], stack, skipped, depth + 1)
    else:
        yield Leaf(label, name, opener)


def _zip(opener: Opener, label: str, stack: ExitStack, skipped: dict, depth: int) -> Iterator[Leaf]:
    try:
        archive = stack.enter_context(zipfile.ZipFile(stack.enter_context(opener())))
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise UserError(f"{label}: corrupt or not a zip archive ({e}); re-download it or remove it from `files:`") from None
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        member = info.filename
        if info.is_dir():
            continue
        if is_junk(member):
            skipped["junk"] = skipped.get("junk", 0) + 1
            continue
        where = f"{label}:{member}"
        if info.flag_bits & 0x1:
            raise UserError(f"{where}: encrypted zip member; extract it with its password and point the corpus at the "
                            "extracted file")
        if info.compress_type not in ZIP_METHODS:
            raise UserError(f"{where}: zip compression method {info.compress_type} is not supported (Deflate64 and "
                            "others); re-create the archive with deflate (`zip -r`) or extract it")
        yield from expand(lambda i=info: archive.open(i), where, member, stack, skipped, depth + 1)


def _tar(opener: Opener, label: str, stack: ExitStack, skipped: dict, depth: int) -> Iterator[Leaf]:
    try:
        archive = stack.enter_context(tarfile.open(fileobj=stack.enter_context(opener()), mode="r:*"))
        members = sorted(archive.getmembers(), key=lambda m: m.name)
    except (tarfile.TarError, OSError, EOFError, lzma.LZMAError) as e:
        raise UserError(f"{label}: corrupt or not a tar archive ({e}); re-download it or remove it from `files:`") from None
    for info in members:
        if info.isdir():
            continue
        if not info.isfile():  # links and devices: never followed
            skipped["link"] = skipped.get("link", 0) + 1
            continue
        if is_junk(info.name):
            skipped["junk"] = skipped.get("junk", 0) + 1
            continue
        yield from expand(lambda i=info: archive.extractfile(i), f"{label}:{info.name}", info.name, stack, skipped,
                          depth + 1)
