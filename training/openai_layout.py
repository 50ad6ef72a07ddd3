"""OpenAI / gpt-2-simple checkpoint folders without TensorFlow: the `checkpoint` state file, prefix resolution, hparams.

The one reader of these folders for `textmill base` (fetch), `textmill train` (base and resume, both backends) and
`textmill convert`. A folder holds `checkpoint` (a two-field text proto naming the latest prefix), `hparams.json`,
`encoder.json`, `vocab.bpe` and one or more name-based TF checkpoints (`<prefix>.index` + `<prefix>.data-*`).

Paths recorded in a `checkpoint` file belong to the machine that wrote it: gpt-2-simple on Colab records
`/content/drive/MyDrive/checkpoint/run1/model-500`, on Windows `C:\\Users\\x\\checkpoint\\run1\\model-500`. TF itself only
resolves relative names against the folder, so such a folder copied elsewhere reads as "no such checkpoint". The rule
here (`local_prefix`): a checkpoint sits beside its state file, so the recorded name's last component (POSIX or Windows
separators) is looked up in the state file's folder first; a recorded path is used as is only when nothing is there.
"""

from __future__ import annotations

import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Iterable

from textmill import storage
from textmill.errors import UserError
from textmill.sizes import Hparams

STATE_FILE = "checkpoint"
HPARAMS_FILE = "hparams.json"
INDEX_SUFFIX = ".index"
DATA_SUFFIX = ".data-00000-of-00001"
META_FILES = (HPARAMS_FILE, "encoder.json", "vocab.bpe")
OPENAI_PREFIX = "model.ckpt"

# The state file is a text proto with two string fields (tensorflow/core/protobuf/checkpoint_state.proto); one regex reads
# both without pulling in TF's proto parser. Values are C-escaped (a Windows path's backslashes are doubled).
_STATE_LINE = re.compile(r'^\s*(model_checkpoint_path|all_model_checkpoint_paths)\s*:\s*"((?:[^"\\]|\\.)*)"\s*$')
# Other fields of the proto are numbers (TF >= 1.13 adds all_model_checkpoint_timestamps, last_preserved_timestamp).
_NUMBER_FIELD = re.compile(r"^\s*[a-z_]+\s*:\s*[-+0-9.eE]+\s*$")
_STEP = re.compile(r"^model-(\d+)$")
_WINDOWS = re.compile(r"^[A-Za-z]:[\\/]|\\")


def _unescape(value: str) -> str:
    return value.encode("latin-1", "backslashreplace").decode("unicode_escape")


def parse_state(text: str, path: Path) -> tuple[str, list[str]]:
    """(latest, all) recorded names from a `checkpoint` file's text; UserError naming `path:line` on anything else."""
    latest, names = None, []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        m = _STATE_LINE.match(line)
        if not m and _NUMBER_FIELD.match(line):
            continue
        if not m:
            raise UserError(f"{path}:{lineno}: unreadable line {line[:80]!r} (expected model_checkpoint_path: \"NAME\"); "
                            f"fix or delete the file and pass a checkpoint prefix")
        if m.group(1) == "model_checkpoint_path":
            latest = _unescape(m.group(2))
        else:
            names.append(_unescape(m.group(2)))
    if latest is None:
        raise UserError(f"{path}: has no model_checkpoint_path line; rewrite it or delete it and pass a checkpoint prefix "
                        f"such as {path.parent}/model-1200")
    return latest, names


def read_state(folder: str | Path) -> tuple[str, list[str]] | None:
    """(latest, all) names exactly as recorded in the folder's `checkpoint` file; None when there is no such file."""
    path = Path(folder) / STATE_FILE
    if not path.is_file():
        return None
    return parse_state(path.read_text(encoding="utf-8", errors="replace"), path)


def write_state(folder: str | Path, latest_name: str, all_names: Iterable[str]) -> None:
    """Write the `checkpoint` state file (what `tf.train.latest_checkpoint` and gpt-2-simple read), atomically.

    Names are relative to the folder (e.g. "model-300"), so the folder can be moved or synced elsewhere.
    """
    names = list(all_names)
    if latest_name not in names:
        names.append(latest_name)
    lines = [f'model_checkpoint_path: "{latest_name}"'] + [f'all_model_checkpoint_paths: "{n}"' for n in names]
    storage.write_text_atomic(Path(folder) / STATE_FILE, "\n".join(lines) + "\n")


def recorded_name(recorded: str) -> str:
    """The last component of a recorded checkpoint path, whether it was written with POSIX or Windows separators."""
    pure = PureWindowsPath(recorded) if _WINDOWS.search(recorded) else PurePosixPath(recorded)
    return pure.name


def has_checkpoint(prefix: Path) -> bool:
    """True when `<prefix>.index` or a `<prefix>.data-*` file exists."""
    return Path(f"{prefix}{INDEX_SUFFIX}").is_file() or any(prefix.parent.glob(f"{prefix.name}.data-*"))


def local_prefix(folder: str | Path, recorded: str) -> Path:
    """Where the checkpoint a state file in `folder` names really is (see the module docstring for the rule)."""
    folder = Path(folder)
    beside = folder / recorded_name(recorded)
    if has_checkpoint(beside):
        return beside
    if _WINDOWS.search(recorded):
        return beside  # a Windows path means nothing on this machine; the error will name the file beside it
    path = Path(recorded)
    return path if path.is_absolute() else folder / path


def latest_prefix(folder: str | Path) -> Path | None:
    """The newest checkpoint prefix of a folder (by its `checkpoint` file), or None when the folder has no state file."""
    state = read_state(folder)
    return None if state is None else local_prefix(folder, state[0])


def step_of(prefix: Path) -> int | None:
    """N for a `model-N` prefix (gpt-2-simple, textmill), None otherwise (OpenAI's `model.ckpt`)."""
    m = _STEP.match(prefix.name)
    return int(m.group(1)) if m else None


def steps_in(folder: Path) -> list[int]:
    """Steps of every `model-N.index` in the folder, ascending."""
    return sorted(s for p in folder.glob(f"*{INDEX_SUFFIX}")
                  if (s := step_of(Path(p.name[: -len(INDEX_SUFFIX)]))) is not None)


def check_files(prefix: Path) -> None:
    """UserError unless `<prefix>.index` and its data file(s) are both there, saying which one is missing."""
    index, data = Path(f"{prefix}{INDEX_SUFFIX}"), Path(f"{prefix}{DATA_SUFFIX}")
    has_data = data.is_file() or any(prefix.parent.glob(f"{prefix.name}.data-*"))
    if not index.is_file():
        hint = (f" (found {data.name} without its index: an interrupted save or copy; copy the .index file too)"
                if has_data else "")
        raise UserError(f"{index}: no such checkpoint index{hint}; pass a prefix like models/runs/<model>/model-300")
    if not has_data:
        raise UserError(f"{data}: checkpoint data file missing next to {index.name}; copy it again")


def resolve_prefix(path: str | Path) -> Path:
    """A checkpoint prefix from a prefix or a folder (folder -> its `checkpoint` file's latest); UserError if none."""
    path = Path(path)
    if path.is_dir():
        prefix = latest_prefix(path)
        if prefix is None:
            raise UserError(f"{path / STATE_FILE}: no checkpoint state file in this folder; pass a prefix such as "
                            f"{path}/model-300 or train/fetch a checkpoint first")
        path = prefix
    check_files(path)
    return path


def read_hparams(path: str | Path) -> Hparams:
    """OpenAI's hparams.json (a folder holding one, or the file itself) as Hparams; UserError naming the file."""
    path = Path(path)
    if path.is_dir() or not path.name.endswith(".json"):
        path = path / HPARAMS_FILE
    if not path.is_file():
        raise UserError(f"{path}: not found; a GPT-2 checkpoint folder has hparams.json (n_vocab, n_ctx, n_embd, n_head, "
                        f"n_layer)")
    try:
        return Hparams.from_json(json.loads(path.read_text(encoding="utf-8")))
    except json.JSONDecodeError as e:
        raise UserError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None
    except (TypeError, ValueError, AttributeError) as e:
        raise UserError(f"{path}: invalid hparams.json ({e}); expected n_vocab, n_ctx, n_embd, n_head, n_layer") from None


def write_hparams(hp: Hparams, folder: str | Path) -> None:
    """hparams.json in OpenAI's key order (n_vocab, n_ctx, n_embd, n_head, n_layer), atomically."""
    storage.write_text_atomic(Path(folder) / HPARAMS_FILE, json.dumps(hp.to_json(), indent=2) + "\n")
