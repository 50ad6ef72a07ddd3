"""Find what a user's SRC path is (OpenAI release, gpt-2-simple run, textmill run, bare prefix) and which checkpoint to read.

No TensorFlow here: detection reads only file names, the `checkpoint` state file and JSON, so a wrong path fails fast with
a message saying which path to pass instead.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from textmill.errors import UserError
from textmill.sizes import Hparams
from textmill.storage import read_json
from textmill.training import openai_layout
from textmill.training.openai_layout import META_FILES, step_of

INDEX, DATA = openai_layout.INDEX_SUFFIX, openai_layout.DATA_SUFFIX
STATE_FILE = "textmill_state.json"


@dataclass
class Source:
    """A resolved conversion source: the checkpoint prefix plus the files that describe it."""

    path: Path                    # what the user passed
    layout: str                   # openai | gpt-2-simple | textmill | prefix
    prefix: Path                  # checkpoint prefix (…/model.ckpt, …/model-1200)
    step: Optional[int]           # None for OpenAI releases (model.ckpt)
    meta_dir: Path                # folder holding hparams.json, encoder.json, vocab.bpe
    state: dict[str, Any] = field(default_factory=dict)  # textmill_state.json when present

    @property
    def hparams_path(self) -> Path:
        return self.meta_dir / "hparams.json"

    @property
    def encoder_path(self) -> Path:
        return self.meta_dir / "encoder.json"

    @property
    def vocab_path(self) -> Path:
        return self.meta_dir / "vocab.bpe"

    def checkpoint_files(self) -> list[Path]:
        return sorted([Path(f"{self.prefix}{INDEX}"), *self.prefix.parent.glob(f"{self.prefix.name}.data-*")])

    def hparams(self) -> Hparams:
        return openai_layout.read_hparams(self.hparams_path)


_steps_in = openai_layout.steps_in


def _check_prefix(prefix: Path) -> None:
    if Path(f"{prefix}{INDEX}").is_file():
        if not any(prefix.parent.glob(f"{prefix.name}.data-*")):
            raise UserError(f"{prefix}{DATA}: checkpoint data file missing next to {prefix.name}{INDEX}; copy it again")
        return
    if any(prefix.parent.glob(f"{prefix.name}.data-*")):
        raise UserError(f"{prefix}{INDEX}: checkpoint index missing (the data file is there: an interrupted save or "
                        f"copy); copy the .index file too")
    raise UserError(f"{prefix}{INDEX}: no such checkpoint")


def _find_meta(prefix: Path) -> Path:
    """hparams/encoder/vocab sit beside the checkpoint, or in its parent (gpt-2-simple keeps a copy in models/<size>)."""
    for folder in (prefix.parent, prefix.parent.parent):
        if all((folder / f).is_file() for f in META_FILES):
            return folder
    missing = [f for f in META_FILES if not (prefix.parent / f).is_file()]
    raise UserError(f"{prefix.parent}: missing {', '.join(missing)} beside the checkpoint; copy them from the model's "
                    f"base folder (models/base/<model>/) or the OpenAI release")


def _wrong_folder_hint(folder: Path) -> str:
    runs = sorted(p.parent for p in folder.glob("*/checkpoint") if p.is_file())
    if runs:
        return f"; this looks like gpt-2-simple's checkpoint/ folder, pass a run folder such as {runs[0]}"
    if (folder / "model.safetensors").is_file() or (folder / "config.json").is_file():
        return "; it is already a Hugging Face folder (nothing to convert)"
    return ("; pass an OpenAI release folder (model.ckpt.*), a gpt-2-simple run (checkpoint/run1), a textmill run "
            "(models/runs/<model>) or a prefix (…/model-1200)")


def _folder_prefix(folder: Path, step: str) -> Path:
    latest_path = openai_layout.latest_prefix(folder)  # a Colab / Windows path recorded there -> the file beside it
    if latest_path is None and (folder / f"model.ckpt{INDEX}").is_file():
        latest_path = folder / "model.ckpt"
    if latest_path is None and (steps := _steps_in(folder)):
        latest_path = folder / f"model-{steps[-1]}"  # a `checkpoint` file lost in a copy: the highest step is the latest
    if latest_path is None:
        raise UserError(f"{folder}: no checkpoint here (no `checkpoint` file, no *.index){_wrong_folder_hint(folder)}")
    if step == "latest":
        return latest_path
    if latest_path.name == "model.ckpt":
        raise UserError(f"{folder}: an OpenAI release has one checkpoint (model.ckpt); drop --step {step}")
    wanted = int(step)
    if not Path(f"{folder / f'model-{wanted}'}{INDEX}").is_file():
        raise UserError(f"{folder}: no checkpoint for step {wanted}; available steps: {_steps_in(folder) or 'none'}")
    return folder / f"model-{wanted}"


def _read_state(folder: Path) -> dict[str, Any]:
    return read_json(folder / STATE_FILE, default={}, fix="the run's state file is corrupt; re-run `textmill train`")


def _best_step(folder: Path, state: dict[str, Any]) -> str:
    if not state:
        raise UserError(f"{folder}: --step best needs {STATE_FILE} (written by `textmill train`); pass --step N or latest")
    if state.get("best_step") is None:
        raise UserError(f"{folder / STATE_FILE}: has no best_step yet (no validation pass ran); pass --step latest")
    return str(int(state["best_step"]))


def resolve(path: str | Path, step: str | None = None) -> Source:
    """Resolve SRC + --step (None | latest | best | N) to a Source; UserError naming the path to pass instead."""
    path = Path(path)
    if step is not None and step not in ("latest", "best") and not step.isdigit():
        raise UserError(f"--step {step!r}: expected a step number, `best` or `latest`")
    if path.is_dir():
        state = _read_state(path)
        chosen = _best_step(path, state) if step == "best" else (step or "latest")
        prefix = _folder_prefix(path, chosen)
    else:
        for suffix in (INDEX, DATA):  # a user may point at one of the two files: use their prefix
            if path.name.endswith(suffix):
                path = path.with_name(path.name[: -len(suffix)])
        if not path.parent.is_dir():
            raise UserError(f"{path}: no such file or folder")
        state = _read_state(path.parent)
        prefix = path
        if step not in (None, "latest") and str(step_of(path)) != step:
            raise UserError(f"{path}: a checkpoint prefix names its step already; drop --step {step} or pass the folder")
    _check_prefix(prefix)
    return Source(path=path, layout=_layout(path, prefix, state), prefix=prefix, step=step_of(prefix),
                  meta_dir=_find_meta(prefix), state=state)


def _layout(path: Path, prefix: Path, state: dict[str, Any]) -> str:
    if not path.is_dir():
        return "prefix"
    if state:
        return "textmill"
    return "openai" if prefix.name == "model.ckpt" else "gpt-2-simple"
