"""`textmill prepare`: EOT after every document, dtype + meta, split stability as corpora grow, cross-split dedup,
`<|endoftext|>` inside documents, byte determinism, and the CLI."""

import json

import numpy as np
import pytest
import yaml

from textmill.pipelines import prepare
from tests.fixtures.clean_corpora import make_config, make_docs, write_clean
from textmill import cli, config as config_mod, tokenizer
from textmill.errors import UserError
from textmill.training import data

EOT = tokenizer.EOT


@pytest.fixture(scope="module")
def tok():
    return tokenizer.train_bpe([d["text"] for d in make_docs(300, seed=9)], 400)


def setup(tmp_path, tok, corpora: dict[str, list[dict]], **prepare_cfg):
    for name, docs in corpora.items():
        write_clean(tmp_path / "clean", name, docs)
    tokenizer.save_openai(tok, tmp_path / "base" / "m")
    return make_config(tmp_path, {"m": list(corpora)}, prepare={"val_fraction": 0.25, **prepare_cfg})


def documents(tok, folder, split) -> list[str]:
    """Decode a split back into its documents (text between EOT ids); asserts the stream ends with EOT."""
    ids = data.open_tokens(folder, split)
    eot = tokenizer.eot_id(tok)
    if len(ids) == 0:
        return []
    assert ids[-1] == eot
    cuts = np.flatnonzero(ids == eot)
    starts = np.concatenate([[0], cuts[:-1] + 1])
    return [tok.decode(ids[s:e].tolist(), skip_special_tokens=False) for s, e in zip(starts, cuts)]


def test_every_document_once_followed_by_eot_and_meta(tmp_path, tok):
    a, b = make_docs(120, seed=1, prefix="a"), make_docs(80, seed=2, prefix="b")
    cfg = setup(tmp_path, tok, {"a": a, "b": b})
    out = prepare.prepare(cfg, "m")
    train, val = documents(tok, out, "train"), documents(tok, out, "val")
    assert sorted(train + val) == sorted(d["text"] for d in a + b)  # exact text round trip, nothing lost
    want_val = [d["text"] for c, docs in (("a", a), ("b", b)) for d in docs if prepare.is_val(c, d["id"], 0.25)]
    assert val == want_val and 25 < len(val) < 75
    meta = json.loads((out / "meta.json").read_text())
    assert meta["dtype"] == "uint16" and (out / "train.bin").stat().st_size == 2 * meta["tokens"]["train"]
    assert meta["vocab_size"] == 400 and meta["eot_id"] == 399 == tokenizer.eot_id(tok)
    assert meta["docs"] == {"train": len(train), "val": len(val)}
    assert meta["tokenizer_checksum"] == tokenizer.checksum(tok)
    assert meta["split"]["val_fraction"] == 0.25 and "blake2b" in meta["split"]["rule"]
    assert meta["corpora"] == ["a", "b"] and meta["cross_split_dropped"] == 0
    assert meta["per_corpus"]["b"]["train"] + meta["per_corpus"]["b"]["val"] == 80


def test_token_dtype_follows_largest_id():
    assert prepare.token_dtype(50257) == np.uint16
    assert prepare.token_dtype(65536) == np.uint16  # ids 0..65535 still fit
    assert prepare.token_dtype(65537) == np.uint32


def test_old_documents_keep_their_split_when_corpus_grows(tmp_path, tok):
    old = make_docs(200, seed=1)
    cfg = setup(tmp_path, tok, {"a": old})
    first = prepare.prepare(cfg, "m", tmp_path / "v1")
    grown = old[:50] + make_docs(150, seed=5, prefix="new") + old[50:]  # new documents, also in the middle
    write_clean(tmp_path / "clean", "a", grown)
    second = prepare.prepare(cfg, "m", tmp_path / "v2")
    old_texts = {d["text"] for d in old}
    for split in ("train", "val"):
        before = documents(tok, first, split)
        after = [t for t in documents(tok, second, split) if t in old_texts]
        assert after == before, split


def test_val_copy_of_train_text_is_dropped_and_counted(tmp_path, tok):
    docs = make_docs(100, seed=3)
    val_id = next(d["id"] for d in docs if prepare.is_val("a", d["id"], 0.25))
    train_id = next(d["id"] for d in docs if not prepare.is_val("a", d["id"], 0.25))
    dup_text = next(d["text"] for d in docs if d["id"] == train_id)
    for d in docs:
        if d["id"] == val_id:
            d["text"] = dup_text
    cfg = setup(tmp_path, tok, {"a": docs})
    out = prepare.prepare(cfg, "m")
    assert dup_text in documents(tok, out, "train") and dup_text not in documents(tok, out, "val")
    meta = json.loads((out / "meta.json").read_text())
    assert meta["cross_split_dropped"] == 1 == meta["per_corpus"]["a"]["cross_split_dropped"]


def eot_docs():
    docs = make_docs(40, seed=4)
    train_doc = next(d for d in docs if not prepare.is_val("a", d["id"], 0.25))
    train_doc["text"] = f"Alpha part one.{EOT}Beta part two."
    return docs


@pytest.mark.parametrize("mode,expected", [("split", ["Alpha part one.", "Beta part two."]),
                                           ("strip", ["Alpha part one.Beta part two."])])
def test_literal_eot_in_text(tmp_path, tok, mode, expected):
    cfg = setup(tmp_path, tok, {"a": eot_docs()}, eot_in_text=mode)
    out = prepare.prepare(cfg, "m")
    train = documents(tok, out, "train")
    assert [t for t in train if "part" in t] == expected
    assert not any(EOT in t for t in train)
    assert json.loads((out / "meta.json").read_text())["eot_in_text"] == {"mode": mode, "docs": 1}


def test_literal_eot_reject_names_document(tmp_path, tok):
    cfg = setup(tmp_path, tok, {"a": eot_docs()}, eot_in_text="reject")
    with pytest.raises(UserError, match=r"a/docs\.jsonl: document #\d+ \(id 'd\d+'\): document contains the literal"):
        prepare.prepare(cfg, "m")
    assert not (tmp_path / "tokens" / "m").exists()


def test_bytes_are_deterministic_and_min_val_tokens(tmp_path, tok):
    cfg = setup(tmp_path, tok, {"a": make_docs(150, seed=6)})
    one, two = prepare.prepare(cfg, "m", tmp_path / "one"), prepare.prepare(cfg, "m", tmp_path / "two")
    for name in ("train.bin", "val.bin", "meta.json"):
        assert (one / name).read_bytes() == (two / name).read_bytes()
    strict = config_mod.from_container({**config_mod.to_dict(cfg), "prepare": {"min_val_tokens": 10**9}})
    with pytest.raises(UserError, match="prepare.min_val_tokens"):
        prepare.prepare(strict, "m", tmp_path / "three")


def test_cli_runs_and_reports_missing_inputs(tmp_path, tok, capsys):
    cfg = setup(tmp_path, tok, {"a": make_docs(50, seed=7)})
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config_mod.to_dict(cfg)))
    assert cli.main(["prepare", "m", "--params", str(params)]) == 0
    assert data.load_meta(tmp_path / "tokens" / "m")["docs"]["train"] > 0
    (tmp_path / "clean" / "a" / "docs.jsonl").unlink()
    capsys.readouterr()
    assert cli.main(["prepare", "m", "--params", str(params)]) == 2
    assert "no clean corpus here" in capsys.readouterr().err
