"""OpenAI / gpt-2-simple checkpoint I/O: name-based TF checkpoints (`prefix.index` + `prefix.data-00000-of-00001`).

Writing goes through `tf.compat.v1.train.Saver(var_list={name: var})`, which works in eager TF2 and produces exactly the
name-based layout of OpenAI's releases (no object graph, no `.meta` needed). Reading goes through
`tf.train.load_checkpoint`, one tensor at a time, so converting a 1.5B checkpoint never holds it twice in memory.
"""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import tensorflow as tf

from textmill import storage
from textmill.errors import UserError

DATA_SUFFIX = ".data-00000-of-00001"
INDEX_SUFFIX = ".index"
STATE_FILE = "checkpoint"



class _SaverDeprecationFilter(logging.Filter):
    """Saver is deprecated in favour of object-based checkpoints, but it is the one TF2 API that writes OpenAI's
    name-based layout; the warning it logs on every save would only tell users to do something they must not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Saver is deprecated")


logging.getLogger("tensorflow").addFilter(_SaverDeprecationFilter())

# The `checkpoint` state file is a text proto with two fields; a regex reads it without pulling in TF's proto parser.
_STATE_LINE = re.compile(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"((?:[^"\\]|\\.)*)"\s*$')


def _as_variable(value: tf.Variable | np.ndarray) -> tf.Variable:
    if isinstance(value, tf.Variable):
        return value
    # Saver only saves variables; numpy arrays (scratch init) are wrapped on the CPU so no accelerator memory is used.
    with tf.device("/CPU:0"):
        return tf.Variable(np.asarray(value), trainable=False)


def save(variables: Mapping[str, tf.Variable | np.ndarray], prefix: str | Path) -> None:
    """Write `prefix.index` + `prefix.data-00000-of-00001` with one entry per name, atomically.

    Both files are written under a temporary prefix in the same folder and renamed into place, the data file first and
    the index last: a reader that finds the index always finds the matching data beside it.
    """
    prefix = Path(prefix)
    if not variables:
        raise ValueError("checkpoint.save: no variables to save")
    prefix.parent.mkdir(parents=True, exist_ok=True)
    tmp = prefix.with_name(f".{prefix.name}.tmp-{os.getpid()}")
    var_list = {name: _as_variable(v) for name, v in variables.items()}
    try:
        saver = tf.compat.v1.train.Saver(var_list=var_list, sharded=False, save_relative_paths=True)
        saver.save(None, str(tmp), write_meta_graph=False, write_state=False)
        os.replace(f"{tmp}{DATA_SUFFIX}", f"{prefix}{DATA_SUFFIX}")
        os.replace(f"{tmp}{INDEX_SUFFIX}", f"{prefix}{INDEX_SUFFIX}")
    finally:
        for suffix in (DATA_SUFFIX, INDEX_SUFFIX):
            Path(f"{tmp}{suffix}").unlink(missing_ok=True)


def write_checkpoint_file(folder: str | Path, latest_name: str, all_names: Iterable[str]) -> None:
    """Write the `checkpoint` state file (what `tf.train.latest_checkpoint` and gpt-2-simple read), atomically.

    Names are relative to the folder (e.g. "model-300"), so the folder can be moved or synced elsewhere.
    """
    folder = Path(folder)
    names = list(all_names)
    if latest_name not in names:
        names.append(latest_name)
    lines = [f'model_checkpoint_path: "{latest_name}"'] + [f'all_model_checkpoint_paths: "{n}"' for n in names]
    storage.write_text_atomic(folder / STATE_FILE, "\n".join(lines) + "\n")


def read_checkpoint_file(folder: str | Path) -> tuple[str, list[str]]:
    """(latest name, all names) from a folder's `checkpoint` file, exactly as written there."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        raise UserError(f"{path}: no checkpoint state file; this folder holds no saved checkpoint (train or fetch one first)")
    latest, names = None, []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        m = _STATE_LINE.match(line)
        if not m:
            raise UserError(f"{path}:{lineno}: unreadable line {line!r} (expected model_checkpoint_path: \"NAME\")")
        key, value = m.group(1), m.group(2).encode().decode("unicode_escape")
        if key == "model_checkpoint_path":
            latest = value
        else:
            names.append(value)
    if latest is None:
        raise UserError(f"{path}: has no model_checkpoint_path line; rewrite it or delete it and pass a prefix explicitly")
    return latest, names


def latest_prefix(folder: str | Path) -> Path | None:
    """The newest checkpoint prefix named by the folder's `checkpoint` file, or None when the folder has none yet.

    A relative path (gpt-2-simple and textmill write those) resolves against the folder; an absolute one is kept.
    """
    folder = Path(folder)
    if not (folder / STATE_FILE).is_file():
        return None
    latest, _ = read_checkpoint_file(folder)
    path = Path(latest)
    return path if path.is_absolute() else folder / path


def resolve_prefix(path: str | Path) -> Path:
    """A checkpoint prefix from a prefix or a folder (folder -> its `checkpoint` file's latest); UserError if none."""
    path = Path(path)
    if path.is_dir():
        prefix = latest_prefix(path)
        if prefix is None:
            raise UserError(f"{path / STATE_FILE}: no checkpoint state file in this folder; pass a prefix such as "
                            f"{path}/model-300 or train/fetch a checkpoint first")
        path = prefix
    _check_files(path)
    return path


def _check_files(prefix: Path) -> None:
    index, data = Path(f"{prefix}{INDEX_SUFFIX}"), Path(f"{prefix}{DATA_SUFFIX}")
    if not index.is_file():
        hint = f" (found {data.name} without its index: the save was interrupted; re-save it)" if data.is_file() else ""
        raise UserError(f"{index}: no such checkpoint index{hint}; pass a prefix like models/runs/<model>/model-300")
    if not data.is_file() and not any(prefix.parent.glob(f"{prefix.name}.data-*")):
        raise UserError(f"{data}: checkpoint data file missing next to {index.name}; copy it again")


def _first_line(e: BaseException) -> str:
    text = getattr(e, "message", None) or str(e)
    return text.strip().splitlines()[0] if text.strip() else type(e).__name__


def _reader(prefix: str | Path):  # -> CheckpointReader (TF's pywrap type)
    prefix = Path(prefix)
    _check_files(prefix)
    try:
        return tf.train.load_checkpoint(str(prefix))
    except (tf.errors.OpError, ValueError) as e:
        raise UserError(f"{prefix}{INDEX_SUFFIX}: not a readable TF checkpoint ({_first_line(e)}); copy it again") from None


def list_variables(prefix: str | Path) -> dict[str, tuple[int, ...]]:
    """Every variable name in the checkpoint with its shape, sorted by name."""
    shapes = _reader(prefix).get_variable_to_shape_map()
    return {name: tuple(int(d) for d in shapes[name]) for name in sorted(shapes)}


def iter_tensors(prefix: str | Path, names: Iterable[str] | None = None) -> Iterator[tuple[str, np.ndarray]]:
    """Yield (name, value) one tensor at a time: all variables sorted by name, or `names` in the given order."""
    reader = _reader(prefix)
    known = reader.get_variable_to_shape_map()
    wanted = sorted(known) if names is None else list(names)
    missing = [n for n in wanted if n not in known]
    if missing:
        raise UserError(f"{prefix}: checkpoint has no variable(s) {missing[:5]}{' ...' if len(missing) > 5 else ''} "
                        f"({len(known)} variables present); is this the right model size?")
    for name in wanted:
        try:
            value = reader.get_tensor(name)
        except (tf.errors.OpError, IndexError) as e:  # TF's reader raises IndexError for a short read
            raise UserError(f"{prefix}{DATA_SUFFIX}: cannot read variable {name!r}, the data file is truncated or "
                            f"corrupt ({_first_line(e)}); copy the checkpoint again") from None
        yield name, np.asarray(value)


def read(prefix: str | Path, names: Iterable[str] | None = None) -> dict[str, np.ndarray]:
    """All (or the named) variables as numpy arrays."""
    return dict(iter_tensors(prefix, names))
