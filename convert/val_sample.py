"""The validation sample an export carries (`val_sample.json`): the head of data/tokens/<model>/val.bin as token ids.

Serving scores each precision it may run a published version in (int8, bf16) against fp32 on this sample when the
version loads (serving/precision.py); it is published and verified like every other file of the export.
"""

from __future__ import annotations

import json
from pathlib import Path

from tokenizers import Tokenizer

from textmill import tokenizer as textmill_tok
from textmill.errors import UserError

SAMPLE_FILE = "val_sample.json"   # serving.precision.SAMPLE_FILE reads it
SAMPLE_TOKENS = 1024


def checked_val_ids(tok: Tokenizer, tokens_dir: str | Path, limit: int) -> list[int]:
    """The first `limit` ids of `tokens_dir`/val.bin, after checking they were made with `tok` (meta.json checksum,
    ids inside the vocabulary). Raises UserError naming the file and what to do."""
    from textmill.training.data import load_meta, open_tokens

    recorded = load_meta(tokens_dir).get("tokenizer_checksum")
    if recorded is not None and recorded != textmill_tok.checksum(tok):
        raise UserError(f"{tokens_dir}/meta.json: tokenizer_checksum differs from the checkpoint's encoder.json/vocab.bpe; "
                        f"these tokens were made with another tokenizer (pass the model's own data/tokens/<model>)")
    ids = open_tokens(tokens_dir, "val")[:limit]
    if len(ids) == 0:
        raise UserError(f"{tokens_dir}/val.bin: empty; drop --tokens or re-run `textmill prepare`")
    if int(ids.max()) >= textmill_tok.vocab_size(tok):
        raise UserError(f"{tokens_dir}/val.bin: holds id {int(ids.max())} beyond the model's vocabulary "
                        f"({textmill_tok.vocab_size(tok)}); these tokens were made with another tokenizer")
    return [int(i) for i in ids]


def write_val_sample(tok: Tokenizer, tokens_dir: str | Path, out: Path, n_tokens: int = SAMPLE_TOKENS) -> Path:
    """Write `out`/val_sample.json: {"source", "tokens", "ids"} with the first `n_tokens` validation ids (int list)."""
    ids = checked_val_ids(tok, tokens_dir, n_tokens)
    path = Path(out) / SAMPLE_FILE
    record = {"source": f"{Path(tokens_dir).name}/val.bin[:{len(ids)}]", "tokens": len(ids), "ids": ids}
    path.write_text(json.dumps(record, separators=(",", ":")) + "\n", encoding="utf-8")
    return path
