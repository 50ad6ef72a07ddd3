"""OpenAI / gpt-2-simple checkpoint I/O: name-based TF checkpoints (`prefix.index` + `prefix.data-00000-of-00001`).

Writing goes through `tf.compat.v1.train.Saver(var_list={name: var})`, which works in eager TF2 and produces exactly the
name-based layout of OpenAI's releases (no object graph, no `.meta` needed). Reading goes through
`tf.train.load_checkpoint`, one tensor at a time, so converting a 1.5B checkpoint never holds it twice in memory.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterable, Iterator, Mapping

import numpy as np
import tensorflow as tf

from textmill.errors import UserError
from textmill.training import openai_layout

DATA_SUFFIX = openai_layout.DATA_SUFFIX
INDEX_SUFFIX = openai_layout.INDEX_SUFFIX
STATE_FILE = openai_layout.STATE_FILE



class _SaverDeprecationFilter(logging.Filter):
    """Saver is deprecated in favour of object-based checkpoints, but it is the one TF2 API that writes OpenAI's
    name-based layout; the warning it logs on every save would only tell users to do something they must not."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Saver is deprecated")


logging.getLogger("tensorflow").addFilter(_SaverDeprecationFilter())



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


# The state file and prefix resolution are TF-free and shared with convert and base: training.openai_layout.
write_checkpoint_file = openai_layout.write_state
latest_prefix = openai_layout.latest_prefix
resolve_prefix = openai_layout.resolve_prefix
_check_files = openai_layout.check_files


def read_checkpoint_file(folder: str | Path) -> tuple[str, list[str]]:
    """(latest name, all names) from a folder's `checkpoint` file, exactly as written there; UserError if absent."""
    state = openai_layout.read_state(folder)
    if state is None:
        raise UserError(f"{Path(folder) / STATE_FILE}: no checkpoint state file; this folder holds no saved checkpoint "
                        f"(train or fetch one first)")
    return state


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
