"""GPT-2 byte-level BPE on the `tokenizers` library: load OpenAI or Hugging Face files, train for scratch models, write both.

OpenAI's `encoder.json` is HF's `vocab.json` and `vocab.bpe` is `merges.txt` (same content, `#version: 0.2` header), so one
`tokenizers.Tokenizer` serves both layouts. `<|endoftext|>` is registered as a special token: it encodes to one id (50256 for
GPT-2), never to the 7 pieces of its characters.
"""

from __future__ import annotations

import hashlib
import json
import tempfile
from pathlib import Path
from typing import Iterable

from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
from tokenizers.models import BPE

from textmill.errors import UserError

EOT = "<|endoftext|>"
OPENAI_FILES = ("encoder.json", "vocab.bpe")
HF_FILES = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json")


def _finish(tok: Tokenizer) -> Tokenizer:
    """GPT-2's pipeline: byte-level pre-tokenizer (GPT-2's regex, no prefix space), byte-level decoder, EOT special."""
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.add_special_tokens([EOT])
    return tok


def from_openai_files(encoder_json: str | Path, vocab_bpe: str | Path) -> Tokenizer:
    """OpenAI's release files (also gpt-2-simple's run folder)."""
    for p in (encoder_json, vocab_bpe):
        if not Path(p).is_file():
            raise UserError(f"{p}: tokenizer file not found (an OpenAI-layout folder has encoder.json and vocab.bpe)")
    try:
        model = BPE.from_file(str(encoder_json), str(vocab_bpe), fuse_unk=False)
    except Exception as e:
        raise UserError(f"{encoder_json}, {vocab_bpe}: cannot read as GPT-2 BPE files: {e}") from None
    tok = _finish(Tokenizer(model))
    if tok.token_to_id(EOT) is None:
        raise UserError(f"{encoder_json}: has no {EOT!r} entry; GPT-2 tokenizers need it")
    return tok


def load(folder: str | Path) -> Tokenizer:
    """Load from a folder holding either `tokenizer.json` (HF) or `encoder.json` + `vocab.bpe` (OpenAI)."""
    folder = Path(folder)
    if (folder / "tokenizer.json").is_file():
        return _finish(Tokenizer.from_file(str(folder / "tokenizer.json")))
    if (folder / "encoder.json").is_file():
        return from_openai_files(folder / "encoder.json", folder / "vocab.bpe")
    raise UserError(f"{folder}: no tokenizer found (expected tokenizer.json, or encoder.json + vocab.bpe)")


def train_bpe(texts: Iterable[str], vocab_size: int, *, show_progress: bool = False) -> Tokenizer:
    """Train a GPT-2-style byte-level BPE; `<|endoftext|>` gets the last id, as in GPT-2 (50256 of 50257)."""
    if vocab_size < 257 + 1:
        raise UserError(f"vocab_size={vocab_size} is too small: byte-level BPE needs at least 258 (256 bytes + EOT + merges)")
    tok = Tokenizer(BPE(fuse_unk=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size - 1, min_frequency=2, show_progress=show_progress,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[],
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return _finish(tok)


def eot_id(tok: Tokenizer) -> int:
    i = tok.token_to_id(EOT)
    if i is None:
        raise UserError(f"tokenizer has no {EOT!r} token")
    return i


def vocab_size(tok: Tokenizer) -> int:
    return tok.get_vocab_size(with_added_tokens=True)


def _merges(tok: Tokenizer) -> bytes:
    """The BPE merges file (`merges.txt` = OpenAI's `vocab.bpe`); `tokenizers` only writes it through `model.save`."""
    with tempfile.TemporaryDirectory() as d:
        tok.model.save(d)
        return Path(d, "merges.txt").read_bytes()


def _vocab_json(tok: Tokenizer) -> str:
    """token -> id including <|endoftext|>, in id order (`vocab.json` = OpenAI's `encoder.json`)."""
    vocab = dict(sorted(tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1]))
    return json.dumps(vocab, ensure_ascii=False)


def checksum(tok: Tokenizer) -> str:
    """sha256 of the vocabulary and merges: equal for the same tokenizer whichever files it was loaded from."""
    vocab = json.dumps(tok.get_vocab(with_added_tokens=True), sort_keys=True).encode()
    return hashlib.sha256(vocab + b"\0" + _merges(tok)).hexdigest()


def save_openai(tok: Tokenizer, folder: str | Path) -> None:
    """Write `encoder.json` and `vocab.bpe` (OpenAI / gpt-2-simple layout)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.bpe").write_bytes(_merges(tok))
    (folder / "encoder.json").write_text(_vocab_json(tok), encoding="utf-8")


def save_hf(tok: Tokenizer, folder: str | Path, *, model_max_length: int) -> None:
    """Write the files `transformers.AutoTokenizer.from_pretrained` loads unchanged (GPT2TokenizerFast)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "merges.txt").write_bytes(_merges(tok))
    (folder / "vocab.json").write_text(_vocab_json(tok), encoding="utf-8")
    special = {"bos_token": EOT, "eos_token": EOT, "unk_token": EOT}
    config = {
        "tokenizer_class": "GPT2Tokenizer", "model_max_length": int(model_max_length), "add_prefix_space": False,
        "add_bos_token": False, "clean_up_tokenization_spaces": False, **special,
        "added_tokens_decoder": {str(eot_id(tok)): {"content": EOT, "special": True, "lstrip": False, "rstrip": False,
                                                     "normalized": False, "single_word": False}},
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    (folder / "special_tokens_map.json").write_text(json.dumps(special, indent=2) + "\n", encoding="utf-8")
