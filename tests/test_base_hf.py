"""`textmill base` with a Hugging Face base (base.uri = a folder with config.json + safetensors, or hf://org/name)."""

from __future__ import annotations

import json
import shutil

import pytest

from textmill.convert.cli import main as convert_main
from tests.fixtures.checkpoints import random_weights, tiny_hparams, tiny_tokenizer, write_openai_release
from tests.test_openai_layout import _cfg
from textmill import config as config_mod
from textmill.errors import UserError
from textmill.training import base, run


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory):
    """A tiny GPT-2 as `textmill convert` exports it (config.json, model.safetensors, vocab.json, merges.txt, ...)."""
    tmp = tmp_path_factory.mktemp("hf")
    tok = tiny_tokenizer()
    hp = tiny_hparams(tok)
    write_openai_release(tmp / "release", hp, tok, random_weights(hp, 5))
    assert convert_main([str(tmp / "release"), str(tmp / "hf")]) == 0
    return tmp / "hf", hp


def fetch_cfg(tmp_path, hp, uri):
    cfg = config_mod.to_dict(_cfg(tmp_path, hp))
    return config_mod.from_container({**cfg, "base": {"init": "fetch", "uri": str(uri)}})


def test_fetch_a_local_hf_folder_makes_a_pt_base(hf_folder, tmp_path):
    folder, hp = hf_folder
    out = base.make_base(fetch_cfg(tmp_path, hp, folder), "m", tmp_path / "base")
    assert run.base_layout(out) == "hf" and run.base_hparams(out) == hp
    assert {"config.json", "model.safetensors", "vocab.json", "merges.txt"} <= {p.name for p in out.iterdir()}
    assert not (out / "hparams.json").exists()


def test_hf_folder_of_another_shape_or_vocabulary_is_refused(hf_folder, tmp_path):
    folder, hp = hf_folder
    bad = tmp_path / "bad"
    shutil.copytree(folder, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "n_layer": 3}))
    with pytest.raises(UserError, match=r"is not model\.size=tiny"):
        base.make_base(fetch_cfg(tmp_path, hp, bad), "m", tmp_path / "b1")
    (bad / "config.json").write_text(json.dumps({**config, "vocab_size": hp.n_vocab + 1}))
    with pytest.raises(UserError, match=r"vocab\.json has \d+ tokens but config\.json vocab_size"):
        base.make_base(fetch_cfg(tmp_path, hp, bad), "m", tmp_path / "b2")
    assert not (tmp_path / "b1").exists() and not (tmp_path / "b2").exists()


def test_hub_download_failure_is_one_line_naming_the_uri(hf_folder, tmp_path, monkeypatch):
    import huggingface_hub

    def offline(*_a, **_k):
        raise huggingface_hub.errors.LocalEntryNotFoundError("Cannot find the requested files in the local cache")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    _, hp = hf_folder
    with pytest.raises(UserError, match=r"^hf://nobody/no-such-gpt2: cannot download from the Hugging Face Hub "
                                        r"\(LocalEntryNotFoundError[^\n]*$"):
        base.make_base(fetch_cfg(tmp_path, hp, "hf://nobody/no-such-gpt2"), "m", tmp_path / "b")
