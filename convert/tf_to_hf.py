"""TF GPT-2 checkpoint (OpenAI names) -> Hugging Face folder: streamed tensor by tensor, checked against the size table.

The output is written into a temporary folder beside DST and renamed into place only after every file (and, with
`verify`, the parity check) succeeded: a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import torch
from tqdm import tqdm

from textmill.convert.names import TIED, expected_key_count, hf_key, hf_shapes
from textmill.convert.sources import Source
from textmill.convert.stream import SafetensorsWriter
from textmill.convert.val_sample import write_val_sample
from textmill import tokenizer as textmill_tok
from textmill.errors import UserError
from textmill.sizes import Hparams, to_hf_config_kwargs
from textmill.storage import atomic_path
from textmill.weights import is_model_weight, openai_shapes

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
WEIGHTS_FILE = "model.safetensors"
PROVENANCE_FILE = "textmill.json"


def plan(src: Source, hp: Hparams, shapes: dict[str, tuple[int, ...]]) -> tuple[list[str], list[str]]:
    """(model variables to convert in OpenAI order, non-model variables skipped); UserError on any mismatch.

    Every check runs before a byte is written, from the index alone (names + shapes), so a wrong hparams.json or a
    checkpoint of another size fails in a second even for a 1.5B model.
    """
    expected = openai_shapes(hp)
    skipped = [n for n in shapes if not is_model_weight(n)]
    present = {n: s for n, s in shapes.items() if is_model_weight(n)}
    missing = [n for n in expected if n not in present]
    unknown = [n for n in present if n not in expected]
    fix = f"check that {src.hparams_path} belongs to this checkpoint ({hp.to_json()})"
    if missing or unknown:
        what = (f"missing {len(missing)} weight(s) e.g. {missing[:3]}" if missing else "") + \
               ("; " if missing and unknown else "") + \
               (f"{len(unknown)} weight(s) not in a {hp.n_layer}-layer GPT-2, e.g. {unknown[:3]}" if unknown else "")
        raise UserError(f"{src.prefix}: {what}; {fix}")
    for name, want in expected.items():
        if present[name] != want:
            raise UserError(f"{src.prefix}: weight {name} has shape {list(present[name])}, hparams say {list(want)}; {fix}")
    return list(expected), skipped


def load_tokenizer(src: Source, hp: Hparams):
    """The source's OpenAI tokenizer files, checked against the model's vocabulary size."""
    tok = textmill_tok.from_openai_files(src.encoder_path, src.vocab_path)
    n = textmill_tok.vocab_size(tok)
    if n != hp.n_vocab:
        raise UserError(f"{src.encoder_path}: has {n} tokens but {src.hparams_path} says n_vocab={hp.n_vocab}; "
                        f"use the encoder.json/vocab.bpe the model was trained with")
    return tok


@contextlib.contextmanager
def _torch_threads(n: int) -> Iterator[None]:
    """Cast with one intra-op thread: the reader and the hash/write threads already use the cores, and torch's own
    pool then only contends (a 355M float16 cast measured 0.13 s on one thread, 0.5-0.6 s on two of a busy 2-core VM)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def stored_bytes(array: np.ndarray, dtype: str) -> np.ndarray:
    """The tensor's bytes as stored: float32 as read (no copy), halves cast by torch (numpy's float16 cast is ~6x
    slower) and returned as their 16-bit patterns (numpy has no bfloat16)."""
    if dtype == "float32":
        return np.ascontiguousarray(array, dtype=np.float32)  # a no-op for TF's contiguous float32 tensors
    return torch.from_numpy(np.ascontiguousarray(array)).to(DTYPES[dtype]).view(torch.int16).numpy()


def write_weights(src: Source, hp: Hparams, names: list[str], out: Path, dtype: str) -> str:
    """Read one tensor at a time, map + reshape it, and stream it into model.safetensors; returns the file's sha256.

    Tensors are read in sorted HF-key order, which is also the order of the TF data file and of safetensors' layout, so
    the checkpoint is read front to back and each tensor can be appended as soon as it is read.
    """
    from textmill.training.tf.checkpoint import iter_tensors  # TF: imported only when a checkpoint is actually read

    want = hf_shapes(hp)
    assert len(names) == expected_key_count(hp) == len(want), (len(names), expected_key_count(hp))
    assert not set(TIED) & set(want), "tied weights are stored once, under their source key"
    by_key = sorted(names, key=lambda name: hf_key(name)[0])
    # metadata format=pt: transformers refuses safetensors files without it.
    with SafetensorsWriter(out / WEIGHTS_FILE, want, dtype, {"format": "pt"}) as writer, _torch_threads(1):
        for name, value in tqdm(iter_tensors(src.prefix, by_key), total=len(by_key), desc="convert", unit="tensor",
                                disable=None):
            key, drop_leading = hf_key(name)
            array = value.reshape(value.shape[1:]) if drop_leading else value  # [1, nx, nf] -> [nx, nf]: a view
            writer.add(key, stored_bytes(array, dtype))
            del value, array  # the writer thread holds the bytes until they are on disk; nothing else keeps them
    return writer.sha256


def write_configs(hp: Hparams, eot: int, out: Path, dtype_name: str) -> None:
    from transformers import GenerationConfig, GPT2Config

    config = GPT2Config(**to_hf_config_kwargs(hp, eot_id=eot), architectures=["GPT2LMHeadModel"], dtype=dtype_name)
    config.save_pretrained(out)
    GenerationConfig.from_model_config(config).save_pretrained(out)


def training_losses(src: Source) -> dict[str, Any]:
    """Train/val loss at the converted step, from the run's textmill_state.json (absent for OpenAI releases)."""
    state, step = src.state, src.step
    if not state or step is None:
        return {}
    out: dict[str, Any] = {k: state.get(k) for k in ("best_step", "best_val_loss", "initial_val_loss", "fingerprint")}
    val = (state.get("val_loss_by_step") or {}).get(str(step))
    out["val_loss"] = None if val is None else float(val)
    # The state keeps the latest training loss only; it belongs to the converted step when that is the last one.
    out["train_loss"] = state.get("train_loss") if state.get("step") == step else None
    return out


def hash_files(paths: list[Path]) -> dict[str, str]:
    """sha256 of each file, biggest first; file_digest reads into one reused buffer and releases the GIL while hashing."""
    out = {}
    for path in sorted(paths, key=lambda p: -p.stat().st_size):
        with open(path, "rb") as f:
            out[path.name] = hashlib.file_digest(f, "sha256").hexdigest()
    return dict(sorted(out.items()))


def provenance(src: Source, hp: Hparams, tokenizer_sha256: str, dtype: str, skipped: list[str],
               source_hashes: dict[str, str], written_hashes: dict[str, str]) -> dict[str, Any]:
    losses = training_losses(src)
    tokenizer_files = {src.encoder_path.name, src.vocab_path.name}
    return {
        # Top-level keys other packages read (publish's metrics, serving's model card): same names as the test fixture.
        "val_loss": losses.get("val_loss"), "train_loss": losses.get("train_loss"), "step": src.step,
        "tokenizer_sha256": tokenizer_sha256,
        "source": {"path": str(src.path), "layout": src.layout, "prefix": str(src.prefix), "step": src.step,
                   "files": {k: v for k, v in source_hashes.items() if k not in tokenizer_files},
                   "tokenizer_files": {k: v for k, v in source_hashes.items() if k in tokenizer_files}},
        "hparams": hp.to_json(),
        "dtype": dtype,
        "skipped_variables": skipped,
        "training": losses,
        "files": dict(sorted(written_hashes.items())),
    }


def source_files_to_hash(src: Source, hash_source: bool) -> tuple[list[Path], dict[str, Any]]:
    """Which source files get a sha256, and how the rest is covered.

    A TF checkpoint's `.index` holds the CRC32C of every tensor, and TF checks it on every read ("Checksum does not match"),
    so the sha256 of the small `.index` fingerprints the weights' content and the conversion itself verifies the data
    bytes. A full sha256 of the multi-GB `.data` files (`hash_source`) costs more CPU than reading them.
    """
    data = [p for p in src.checkpoint_files() if ".data-" in p.name]
    index = [p for p in src.checkpoint_files() if p not in data]
    files = [*index, *(data if hash_source else []), src.encoder_path, src.vocab_path]
    coverage = {"data_sha256": hash_source, "data_sizes": {p.name: p.stat().st_size for p in data},
                "data_integrity": "sha256 of every file" if hash_source else
                "sha256 of .index, which holds each tensor's CRC32C; TF verified every tensor read against it"}
    return files, coverage


def convert(src: Source, dst: str | Path, *, dtype: str = "float32", verify: bool = False,
            tokens_dir: str | Path | None = None, hash_source: bool = False) -> dict[str, Any]:
    """Convert `src` into the HF folder `dst` (must not exist); returns the provenance written to textmill.json."""
    from textmill.training.tf.checkpoint import list_variables

    dst = Path(dst)
    if dst.exists():
        raise UserError(f"{dst}: already exists; remove it or choose another destination (nothing was written)")
    if dtype not in DTYPES:
        raise UserError(f"--dtype {dtype}: choose one of {sorted(DTYPES)}")
    hp = src.hparams()
    tok = load_tokenizer(src, hp)
    names, skipped = plan(src, hp, list_variables(src.prefix))
    log.info("converting %s (%s, step %s): %d weights, %d non-model variables skipped",
             src.prefix, src.layout, src.step, len(names), len(skipped))
    # The source files are hashed on a second thread while TF reads the same data file (the page cache serves the second
    # reader); the output is hashed by the writer thread from the bytes it writes. No file is read back for its sha256.
    # The small files are written first: their ~0.5 s of Python (transformers' config import, tokenizer export) then
    # overlaps the source hash, which would otherwise be the last thing running.
    with atomic_path(dst) as tmp, ThreadPoolExecutor(max_workers=1, thread_name_prefix="source-sha256") as hasher:
        tmp.mkdir()
        to_hash, coverage = source_files_to_hash(src, hash_source)
        source_hashes = hasher.submit(hash_files, to_hash)
        write_configs(hp, textmill_tok.eot_id(tok), tmp, dtype)
        textmill_tok.save_hf(tok, tmp, model_max_length=hp.n_ctx)
        if tokens_dir is not None:  # the sample serving checks reduced precisions on (convert/val_sample.py)
            write_val_sample(tok, tokens_dir, tmp)
        small = hash_files(list(tmp.iterdir()))
        tok_sha256 = textmill_tok.checksum(tok)
        weights_sha256 = write_weights(src, hp, names, tmp, dtype)
        record = provenance(src, hp, tok_sha256, dtype, skipped, source_hashes.result(),
                            {**small, WEIGHTS_FILE: weights_sha256})
        record["source"].update(coverage)
        if verify:
            from textmill.convert.verify import verify as run_verify

            record["verify"] = run_verify(src, tmp, hp, tok, dtype=dtype, tokens_dir=tokens_dir)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record
