"""training.openai_layout, the one TF-free reader of OpenAI / gpt-2-simple folders: a `checkpoint` state file written on
another machine (Colab, Windows) names the checkpoint that sits beside it, for convert, base fetch and training."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from textmill.convert.sources import resolve
from tests.fixtures.checkpoints import random_weights, tiny_hparams, tiny_tokenizer, write_gpt2_simple_run
from textmill.errors import UserError
from textmill.training import openai_layout

# The same state file as written by gpt-2-simple on other machines (the proto's string values are C-escaped).
FOREIGN = {
    "colab": '/content/drive/MyDrive/checkpoint/run1/{name}',
    "windows": 'C:\\\\Users\\\\x\\\\checkpoint\\\\run1\\\\{name}',
    "windows-forward-slashes": 'D:/colab/checkpoint/run1/{name}',
    "other-linux-box": '/home/someone/gpt-2-simple/checkpoint/run1/{name}',
}


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tok = tiny_tokenizer()
    hp = tiny_hparams(tok)
    run = write_gpt2_simple_run(tmp_path_factory.mktemp("g2s"), hp, tok,
                                {100: random_weights(hp, 1), 200: random_weights(hp, 2)})
    return run, hp


def copied_from(pristine, tmp_path: Path, machine: str, *, timestamps: bool = False) -> Path:
    """The run folder as copied from `machine`: its state file names that machine's absolute paths."""
    run = Path(shutil.copytree(pristine[0], tmp_path / machine / "run1"))
    paths = [FOREIGN[machine].format(name=n) for n in ("model-100", "model-200")]
    lines = [f'model_checkpoint_path: "{paths[1]}"'] + [f'all_model_checkpoint_paths: "{p}"' for p in paths]
    if timestamps:  # TF >= 1.13 adds these numeric fields
        lines += ["all_model_checkpoint_timestamps: 1700000000.5", "all_model_checkpoint_timestamps: 1700000100.25",
                  "last_preserved_timestamp: 1699999999.0"]
    (run / "checkpoint").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return run


@pytest.mark.parametrize("machine", sorted(FOREIGN))
def test_foreign_state_file_resolves_to_the_checkpoint_beside_it(pristine, tmp_path, machine):
    run = copied_from(pristine, tmp_path, machine, timestamps=machine == "other-linux-box")
    assert openai_layout.resolve_prefix(run) == run / "model-200"      # training (base and TF model load)
    src = resolve(run)                                                  # convert
    assert src.prefix == run / "model-200" and src.step == 200 and src.layout == "gpt-2-simple"
    assert resolve(run, "100").prefix == run / "model-100"


def test_recorded_name_and_escapes():
    latest, names = openai_layout.parse_state(
        'model_checkpoint_path: "C:\\\\Users\\\\x\\\\run1\\\\model-5"\nall_model_checkpoint_paths: "model-5"\n',
        Path("checkpoint"))
    assert latest == "C:\\Users\\x\\run1\\model-5" and names == ["model-5"]
    assert openai_layout.recorded_name(latest) == "model-5"
    assert openai_layout.recorded_name("/content/drive/MyDrive/checkpoint/run1/model-500") == "model-500"
    assert openai_layout.recorded_name("model.ckpt") == "model.ckpt"


def test_missing_checkpoint_names_the_file_beside_the_state_file(pristine, tmp_path):
    run = copied_from(pristine, tmp_path, "windows")
    for f in run.glob("model-200.*"):
        f.unlink()
    with pytest.raises(UserError, match=r"run1/model-200\.index: no such checkpoint index"):
        openai_layout.resolve_prefix(run)


def test_unreadable_state_file_is_one_line_with_its_line_number(tmp_path):
    (tmp_path / "checkpoint").write_text('model_checkpoint_path: "model-1"\ngarbage here\n', encoding="utf-8")
    with pytest.raises(UserError, match=r"checkpoint:2: unreadable line 'garbage here'"):
        openai_layout.read_state(tmp_path)


@pytest.mark.parametrize("machine", ["colab", "windows"])
def test_base_fetch_of_a_foreign_run_uses_the_files_beside_it(pristine, tmp_path, machine):
    from tests.test_base import fetch_cfg
    from textmill.training import base
    from textmill.training.tf import checkpoint

    run = copied_from(pristine, tmp_path, machine)
    cfg = fetch_cfg((None, _cfg(tmp_path, pristine[1])), run)
    out = base.fetch(cfg, str(run), tmp_path / "fetched")
    assert out == pristine[1]
    assert (tmp_path / "fetched/checkpoint").read_text().splitlines()[0] == 'model_checkpoint_path: "model.ckpt"'
    assert checkpoint.list_variables(tmp_path / "fetched/model.ckpt")["global_step"] == ()


def _cfg(tmp_path: Path, hp):
    from textmill import config

    return config.from_container({"paths": {"clean": str(tmp_path / "clean")}, "corpora": {"c": {}},
                                  "models": {"m": {"corpora": ["c"]}},
                                  "model": {"size": "tiny", "n_ctx": hp.n_ctx, "vocab_size": hp.n_vocab}})
