"""`textmill prepare <model>`: split a model's clean corpora into train/val and tokenize them into data/tokens/<model>/.

Output: `train.bin` and `val.bin` (flat token ids, uint16 while every id fits, else uint32; each document followed by the
EOT id) and `meta.json` (dtype, vocab, EOT id, counts, tokenizer checksum, the split rule). Rules:

- Split by a stable hash of `<corpus>/<doc id>`, so a document keeps its split when its corpus grows (scheduled retrains
  never leak old val documents into train).
- A val document whose exact text also occurs in train is dropped from val (counted in meta.json): it would measure
  memorisation, not generalisation.
- A literal `<|endoftext|>` inside a document follows `prepare.eot_in_text` (see docs/data-and-base.md).
The output folder is written beside its destination and renamed into place; identical inputs give identical bytes.
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import BinaryIO, Iterable, Iterator

import numpy as np
from tqdm import tqdm

from textmill.pipelines.clean_io import docs_path, iter_docs
from textmill import config as config_mod
from textmill import storage, tokenizer
from textmill.errors import UserError

log = logging.getLogger(__name__)

SPLIT_RULE = "val if blake2b('<corpus>/<doc id>', digest_size=8) as big-endian uint64 / 2**64 < val_fraction"
BATCH_DOCS = 1024  # documents per encode_batch call: big enough for the Rust thread pool, small enough for memory


def val_score(corpus: str, doc_id: str) -> float:
    """A document's place in [0, 1): depends on nothing but its corpus and id, so it never changes split."""
    digest = hashlib.blake2b(f"{corpus}/{doc_id}".encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "big") / 2**64


def is_val(corpus: str, doc_id: str, val_fraction: float) -> bool:
    return val_score(corpus, doc_id) < val_fraction


def token_dtype(n_vocab: int) -> np.dtype:
    """uint16 while every id (0..n_vocab-1) fits, else uint32: half the disk and page cache of int32 for GPT-2."""
    return np.dtype(np.uint16 if n_vocab <= 2**16 else np.uint32)


def text_hash(text: str) -> bytes:
    return hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()


def apply_eot_rule(text: str, mode: str, where: str) -> list[str]:
    """The document's pieces after handling literal `<|endoftext|>`: split there, strip it, or reject the document."""
    if tokenizer.EOT not in text:
        return [text]
    if mode == "reject":
        raise UserError(f"{where}: document contains the literal {tokenizer.EOT!r}; remove it from the raw data or set "
                        f"prepare.eot_in_text=split (ends the document there) or strip")
    if mode == "strip":
        return [text.replace(tokenizer.EOT, "")]
    return text.split(tokenizer.EOT)


@dataclass
class SplitStats:
    docs: int = 0
    tokens: int = 0


@dataclass
class Report:
    train: SplitStats = field(default_factory=SplitStats)
    val: SplitStats = field(default_factory=SplitStats)
    cross_split_dropped: int = 0
    eot_docs: int = 0
    per_corpus: dict = field(default_factory=dict)


def _docs(cfg: config_mod.Config, corpora: list[str]) -> Iterator[tuple[str, int, dict]]:
    for corpus in corpora:
        folder = Path(cfg.paths.clean) / corpus
        docs_path(folder)  # fail early with the "run textmill clean" message
        for n, doc in enumerate(tqdm(iter_docs(folder), desc=f"prepare: {corpus}", unit="doc")):
            yield corpus, n, doc


def _train_hashes(cfg: config_mod.Config, corpora: list[str]) -> set[bytes]:
    """Pass 1: text hashes of train documents (to drop their exact copies from val)."""
    frac = cfg.prepare.val_fraction
    return {text_hash(doc["text"]) for corpus, _, doc in _docs(cfg, corpora) if not is_val(corpus, str(doc["id"]), frac)}


class Encoder:
    """Buffers document pieces and writes their ids, each followed by EOT, to one split's file."""

    def __init__(self, tok, out: BinaryIO, dtype: np.dtype, stats: SplitStats):
        self.tok, self.out, self.dtype, self.stats = tok, out, dtype, stats
        self.eot = np.array([tokenizer.eot_id(tok)], dtype)
        self.pending: list[str] = []

    def add(self, pieces: Iterable[str]) -> None:
        self.pending.extend(p for p in pieces if p.strip())
        if len(self.pending) >= BATCH_DOCS:
            self.flush()

    def flush(self) -> None:
        if not self.pending:
            return
        # encode_batch_fast: no offsets; tokenizers spreads the batch over its Rust thread pool.
        encodings = self.tok.encode_batch_fast(self.pending, add_special_tokens=False)
        chunks = []
        for enc in encodings:
            chunks += [np.asarray(enc.ids, self.dtype), self.eot]
        ids = np.concatenate(chunks)
        ids.tofile(self.out)
        self.stats.docs += len(self.pending)
        self.stats.tokens += len(ids)
        self.pending = []


def prepare(cfg: config_mod.Config, model: str, out: Path | None = None) -> Path:
    """Build `{paths.tokens}/<model>/` (or `out`) from the model's clean corpora and its base tokenizer."""
    corpora = list(cfg.model_spec(model).corpora)
    base_dir = Path(cfg.paths.base) / model
    tok = tokenizer.load(base_dir)
    n_vocab = tokenizer.vocab_size(tok)
    dtype = token_dtype(n_vocab)
    if cfg.prepare.workers > 0:
        os.environ["RAYON_NUM_THREADS"] = str(cfg.prepare.workers)
    train_hashes = _train_hashes(cfg, corpora)
    dest = Path(out) if out is not None else Path(cfg.paths.tokens) / model
    report = Report()
    with storage.atomic_path(dest) as tmp:
        tmp.mkdir()
        with open(tmp / "train.bin", "wb") as ftrain, open(tmp / "val.bin", "wb") as fval:
            enc = {"train": Encoder(tok, ftrain, dtype, report.train), "val": Encoder(tok, fval, dtype, report.val)}
            _encode_all(cfg, corpora, train_hashes, enc, report)
        _check_val(cfg, report)
        meta = _meta(cfg, model, corpora, tok, dtype, report)
        storage.write_json_atomic(tmp / "meta.json", meta)
    log.info("prepare %s: train %d docs / %d tokens, val %d docs / %d tokens, %d cross-split duplicates dropped",
             model, report.train.docs, report.train.tokens, report.val.docs, report.val.tokens, report.cross_split_dropped)
    return dest


def _encode_all(cfg, corpora, train_hashes, enc, report: Report) -> None:
    """Pass 2: assign each document its split, apply the EOT rule, drop val copies of train text, encode."""
    frac, mode = cfg.prepare.val_fraction, cfg.prepare.eot_in_text
    for corpus, n, doc in _docs(cfg, corpora):
        counts = report.per_corpus.setdefault(corpus, {"train": 0, "val": 0, "cross_split_dropped": 0})
        split = "val" if is_val(corpus, str(doc["id"]), frac) else "train"
        if split == "val" and text_hash(doc["text"]) in train_hashes:
            report.cross_split_dropped += 1
            counts["cross_split_dropped"] += 1
            continue
        pieces = [doc["text"]]
        if tokenizer.EOT in doc["text"]:
            where = f"{docs_path(Path(cfg.paths.clean) / corpus)}: document #{n + 1} (id {doc['id']!r})"
            pieces = apply_eot_rule(doc["text"], mode, where)
            report.eot_docs += 1
        enc[split].add(pieces)
        counts[split] += 1
    for e in enc.values():
        e.flush()


def _check_val(cfg: config_mod.Config, report: Report) -> None:
    if report.val.tokens < cfg.prepare.min_val_tokens:
        raise UserError(f"val split has {report.val.tokens} tokens < prepare.min_val_tokens={cfg.prepare.min_val_tokens};"
                        f" raise prepare.val_fraction or add documents")
    if report.val.tokens < 2:
        log.warning("val split is empty: validation loss cannot be measured; raise prepare.val_fraction")


def _meta(cfg, model: str, corpora: list[str], tok, dtype: np.dtype, report: Report) -> dict:
    return {
        "model": model,
        "dtype": dtype.name,
        "vocab_size": tokenizer.vocab_size(tok),
        "eot_id": tokenizer.eot_id(tok),
        "tokenizer_checksum": tokenizer.checksum(tok),
        "tokens": {"train": report.train.tokens, "val": report.val.tokens},
        "docs": {"train": report.train.docs, "val": report.val.docs},
        "split": {"rule": SPLIT_RULE, "val_fraction": cfg.prepare.val_fraction},
        "corpora": corpora,
        "per_corpus": report.per_corpus,
        "cross_split_dropped": report.cross_split_dropped,
        "eot_in_text": {"mode": cfg.prepare.eot_in_text, "docs": report.eot_docs},
    }


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(prog="textmill prepare", description=__doc__.splitlines()[0])
    p.add_argument("model", help="a model name from `models:` in the config")
    config_mod.add_cli_arguments(p, "prepare.val_fraction=0.1")
    p.add_argument("--out", type=Path, help="output folder (default {paths.tokens}/<model>)")
    args = p.parse_args(argv)
    cfg = config_mod.from_args(args)
    dest = prepare(cfg, args.model, args.out)
    print(f"prepare {args.model}: {dest}")
    return 0
