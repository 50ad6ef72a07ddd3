"""`textmill convert` on bad input: each mistake is a UserError naming the file and the fix, and nothing is written."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from textmill.convert.cli import main as convert_main
from textmill import tokenizer as textmill_tok
from textmill.errors import UserError
from textmill.storage import sha256_file as textmill_sha256
from tests.fixtures.checkpoints import (random_weights, tiny_hparams, tiny_tokenizer, write_openai_release,
                                        write_tokens)


@pytest.fixture(scope="module")
def pristine(tmp_path_factory):
    tok = tiny_tokenizer()
    hp = tiny_hparams(tok)
    return write_openai_release(tmp_path_factory.mktemp("pristine") / "release", hp, tok, random_weights(hp, 7))


@pytest.fixture
def release(pristine, tmp_path):
    """A private copy of the release for a test to damage."""
    return Path(shutil.copytree(pristine, tmp_path / "src"))


def convert_fails(src: Path, match: str, *extra: str) -> None:
    out = src.parent / "out"
    before = sorted(src.parent.iterdir())
    with pytest.raises(UserError, match=match):
        convert_main([str(src), str(out), *extra])
    assert not out.exists()
    assert sorted(src.parent.iterdir()) == before, "a temp folder was left behind"


def test_truncated_data_file(release):
    data = release / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[: data.stat().st_size // 2])
    convert_fails(release, r"model\.ckpt\.data-00000-of-00001: cannot read variable .*truncated or corrupt", "--verify")



def test_flipped_byte_in_data_file_fails_on_crc(release):
    # Same size, one bit changed: only the per-tensor CRC32C in the .index can catch it, and TF checks it on every read.
    data = release / "model.ckpt.data-00000-of-00001"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 0x01
    data.write_bytes(bytes(raw))
    convert_fails(release, r"model\.ckpt\.data-00000-of-00001: cannot read variable .*truncated or corrupt")


def test_provenance_says_how_source_data_was_checked(pristine, tmp_path):
    src = Path(shutil.copytree(pristine, tmp_path / "src"))
    convert_main([str(src), str(tmp_path / "fast")])
    convert_main([str(src), str(tmp_path / "full"), "--hash-source"])
    fast = json.loads((tmp_path / "fast/textmill.json").read_text())["source"]
    full = json.loads((tmp_path / "full/textmill.json").read_text())["source"]
    assert "model.ckpt.index" in fast["files"] and "model.ckpt.data-00000-of-00001" not in fast["files"]
    assert not fast["data_sha256"] and "CRC32C" in fast["data_integrity"]
    assert fast["data_sizes"]["model.ckpt.data-00000-of-00001"] == (src / "model.ckpt.data-00000-of-00001").stat().st_size
    assert full["data_sha256"] and full["files"]["model.ckpt.data-00000-of-00001"] == \
        textmill_sha256(src / "model.ckpt.data-00000-of-00001")

def test_missing_index(release):
    (release / "model.ckpt.index").unlink()
    convert_fails(release, r"model\.ckpt\.index: checkpoint index missing .*copy the \.index file")


def test_missing_data_file(release):
    (release / "model.ckpt.data-00000-of-00001").unlink()
    convert_fails(release, r"model\.ckpt\.data-00000-of-00001: checkpoint data file missing")


@pytest.mark.parametrize("change, match", [
    ({"n_layer": 3}, r"missing 12 weight\(s\) e\.g\. \['model/h2/ln_1/g'"),
    ({"n_layer": 1}, r"12 weight\(s\) not in a 1-layer GPT-2"),
    ({"n_embd": 32}, r"weight model/wpe has shape \[64, 64\], hparams say \[64, 32\]"),
    ({"n_ctx": 128}, r"weight model/wpe has shape \[64, 64\], hparams say \[128, 64\]"),
])
def test_hparams_that_do_not_match_the_weights(release, change, match):
    path = release / "hparams.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **change}))
    convert_fails(release, match + r".*hparams\.json belongs to this checkpoint")


def test_encoder_size_differs_from_n_vocab(release):
    textmill_tok.save_openai(textmill_tok.train_bpe(["some other text for a smaller vocabulary"] * 5, 280), release)
    convert_fails(release, r"encoder\.json: has \d+ tokens but .*hparams\.json says n_vocab=\d+")


def test_invalid_hparams_json(release):
    (release / "hparams.json").write_text('{"n_vocab": 10, "n_ctx": 64, "n_embd": 64, "n_head": 3, "n_layer": 2}')
    convert_fails(release, r"hparams\.json: invalid hparams\.json .*divisible by n_head")


def test_folder_without_checkpoint(tmp_path):
    (tmp_path / "src").mkdir()
    convert_fails(tmp_path / "src", r"src: no checkpoint here .*pass an OpenAI release folder")


def test_hf_folder_is_not_a_source(tmp_path):
    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "config.json").write_text("{}")
    convert_fails(tmp_path / "src", "already a Hugging Face folder")


def test_destination_exists(pristine, tmp_path):
    dst = tmp_path / "export"
    dst.mkdir()
    (dst / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match="export: already exists; remove it"):
        convert_main([str(pristine), str(dst)])
    assert [p.name for p in dst.iterdir()] == ["keep.txt"] and sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_verify_catches_a_wrong_mapping(release, monkeypatch):
    """Swap LayerNorm gain and bias in the name map: shapes still fit, so only the parity check can notice."""
    from textmill.convert import names

    monkeypatch.setitem(names.PER_BLOCK, "ln_1/g", "ln_1.bias")
    monkeypatch.setitem(names.PER_BLOCK, "ln_1/b", "ln_1.weight")
    convert_fails(release, r"verify failed: max \|logit diff\| TF vs transformers = .* > 0\.0001", "--verify")


def test_verify_tokens_from_another_tokenizer(release, tmp_path):
    other = textmill_tok.train_bpe(["a different corpus, a different tokenizer"] * 5, 280)
    tokens = write_tokens(tmp_path / "tokens", other, ["some training text"] * 5, ["some validation text"] * 5)
    convert_fails(release, r"meta\.json: tokenizer_checksum differs", "--verify", "--tokens", str(tokens))
