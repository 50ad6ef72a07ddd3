"""textmill/tokenizer.py: OpenAI files <-> HF files <-> transformers.AutoTokenizer agree on ids, EOT and checksum."""

import pytest

from tests.fixtures.clean_corpora import make_docs
from textmill import tokenizer
from textmill.errors import UserError

TEXTS = [d["text"] for d in make_docs(300, seed=3)]
SAMPLES = ["Hello world, naïve café 🙂 数据 данные!", "  leading spaces\tand\ttabs\n\nnew lines  ",
           "Ünïcödé λόγος " * 3, "x" * 50, "emoji🙂🙂 mixed\r\nCRLF"]


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_bpe(TEXTS, 400)


@pytest.fixture(scope="module")
def folders(tok, tmp_path_factory):
    openai_dir, hf_dir = tmp_path_factory.mktemp("openai"), tmp_path_factory.mktemp("hf")
    tokenizer.save_openai(tok, openai_dir)
    tokenizer.save_hf(tok, hf_dir, model_max_length=128)
    return openai_dir, hf_dir


def test_training_is_deterministic_and_sized(tok):
    again = tokenizer.train_bpe(TEXTS, 400)
    assert tokenizer.vocab_size(tok) == 400
    assert tokenizer.eot_id(tok) == 399  # last id, as 50256 of 50257 in GPT-2
    assert tokenizer.checksum(again) == tokenizer.checksum(tok)


def test_eot_is_one_id_and_unicode_round_trips(tok):
    eot = tokenizer.eot_id(tok)
    assert tok.encode(tokenizer.EOT).ids == [eot]
    ids = tok.encode("first" + tokenizer.EOT + "second").ids
    assert ids.count(eot) == 1
    for text in SAMPLES:
        assert tok.decode(tok.encode(text).ids) == text


def test_openai_and_hf_files_load_to_the_same_tokenizer(tok, folders):
    openai_dir, hf_dir = folders
    assert sorted(p.name for p in openai_dir.iterdir()) == ["encoder.json", "vocab.bpe"]
    assert {p.name for p in hf_dir.iterdir()} == set(tokenizer.HF_FILES)
    from_openai, from_hf = tokenizer.load(openai_dir), tokenizer.load(hf_dir)
    assert tokenizer.checksum(from_openai) == tokenizer.checksum(from_hf) == tokenizer.checksum(tok)
    for text in SAMPLES + [tokenizer.EOT + SAMPLES[0]]:
        assert from_openai.encode(text).ids == from_hf.encode(text).ids == tok.encode(text).ids
    # OpenAI -> HF -> OpenAI keeps the bytes of both OpenAI files.
    back = openai_dir.parent / "back"
    tokenizer.save_openai(from_hf, back)
    for name in ("encoder.json", "vocab.bpe"):
        assert (back / name).read_bytes() == (openai_dir / name).read_bytes()


def test_transformers_autotokenizer_agrees(tok, folders):
    from transformers import AutoTokenizer

    _, hf_dir = folders
    auto = AutoTokenizer.from_pretrained(hf_dir)
    assert len(auto) == tokenizer.vocab_size(tok)
    assert auto.eos_token == tokenizer.EOT and auto.eos_token_id == tokenizer.eot_id(tok)
    assert auto(tokenizer.EOT)["input_ids"] == [tokenizer.eot_id(tok)]
    for text in SAMPLES:
        ids = auto(text)["input_ids"]
        assert ids == tok.encode(text).ids
        assert auto.decode(ids) == text
    assert auto.model_max_length == 128


def test_tokenizer_errors(tmp_path, folders):
    with pytest.raises(UserError, match="no tokenizer found"):
        tokenizer.load(tmp_path)
    openai_dir, _ = folders
    (tmp_path / "encoder.json").write_bytes((openai_dir / "encoder.json").read_bytes())
    with pytest.raises(UserError, match=r"vocab\.bpe: tokenizer file not found"):
        tokenizer.load(tmp_path)
    with pytest.raises(UserError, match="vocab_size=100 is too small"):
        tokenizer.train_bpe(TEXTS, 100)
