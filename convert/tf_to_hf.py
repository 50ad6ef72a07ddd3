"""TF GPT-2 checkpoint (OpenAI names) -> Hugging Face folder: streamed tensor by tensor, checked against the size table.

The output is written into a temporary folder beside DST and renamed into place only after every file (and, with
`verify`, the parity check) succeeded: a failed conversion leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file
from tqdm import tqdm

from convert.names import TIED, expected_key_count, hf_key, hf_shapes
from convert.sources import Source
from textmill import tokenizer as textmill_tok
from textmill.errors import UserError
from textmill.sizes import Hparams, to_hf_config_kwargs
from textmill.storage import atomic_path, sha256_file
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


def write_weights(src: Source, hp: Hparams, names: list[str], out: Path, dtype: torch.dtype) -> None:
    """Read one tensor at a time, map + reshape it, and write model.safetensors; only the converted copy is kept."""
    from training.tf.checkpoint import iter_tensors  # TF: imported only when a checkpoint is actually read

    tensors: dict[str, torch.Tensor] = {}
    for name, value in tqdm(iter_tensors(src.prefix, names), total=len(names), desc="convert", unit="tensor",
                            disable=None):
        key, drop_leading = hf_key(name)
        array = value[0] if drop_leading else value  # [1, nx, nf] -> [nx, nf]: a view, no copy
        tensors[key] = torch.from_numpy(np.ascontiguousarray(array)).to(dtype)
        del value, array
    want = hf_shapes(hp)
    assert len(tensors) == expected_key_count(hp) == len(want), (len(tensors), expected_key_count(hp))
    for key, tensor in tensors.items():
        assert tuple(tensor.shape) == want[key], (key, tuple(tensor.shape), want[key])
    assert not set(TIED) & set(tensors), "tied weights are stored once, under their source key"
    # metadata format=pt: transformers refuses safetensors files without it.
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})


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
    return {p.name: sha256_file(p) for p in paths}


def provenance(src: Source, hp: Hparams, tok, dtype: str, skipped: list[str], source_hashes: dict[str, str],
               written_hashes: dict[str, str]) -> dict[str, Any]:
    losses = training_losses(src)
    tokenizer_files = {src.encoder_path.name, src.vocab_path.name}
    return {
        # Top-level keys other packages read (publish's metrics, serving's model card): same names as the test fixture.
        "val_loss": losses.get("val_loss"), "train_loss": losses.get("train_loss"), "step": src.step,
        "tokenizer_sha256": textmill_tok.checksum(tok),
        "source": {"path": str(src.path), "layout": src.layout, "prefix": str(src.prefix), "step": src.step,
                   "files": {k: v for k, v in source_hashes.items() if k not in tokenizer_files},
                   "tokenizer_files": {k: v for k, v in source_hashes.items() if k in tokenizer_files}},
        "hparams": hp.to_json(),
        "dtype": dtype,
        "skipped_variables": skipped,
        "training": losses,
        "files": dict(sorted(written_hashes.items())),
    }


def convert(src: Source, dst: str | Path, *, dtype: str = "float32", verify: bool = False,
            tokens_dir: str | Path | None = None) -> dict[str, Any]:
    """Convert `src` into the HF folder `dst` (must not exist); returns the provenance written to textmill.json."""
    from training.tf.checkpoint import list_variables

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
    # sha256 of the inputs and of the big output run on a second thread (hashlib releases the GIL), overlapping the
    # conversion: hashing is two more passes over the model's bytes and would otherwise double the conversion time.
    with atomic_path(dst) as tmp, ThreadPoolExecutor(max_workers=1) as hasher:
        tmp.mkdir()
        source_hashes = hasher.submit(hash_files, [*src.checkpoint_files(), src.encoder_path, src.vocab_path])
        write_weights(src, hp, names, tmp, DTYPES[dtype])
        weights_hash = hasher.submit(hash_files, [tmp / WEIGHTS_FILE])
        write_configs(hp, textmill_tok.eot_id(tok), tmp, dtype)
        textmill_tok.save_hf(tok, tmp, model_max_length=hp.n_ctx)
        small = hash_files([p for p in sorted(tmp.iterdir()) if p.name != WEIGHTS_FILE])
        record = provenance(src, hp, tok, dtype, skipped, source_hashes.result(), {**small, **weights_hash.result()})
        if verify:
            from convert.verify import verify as run_verify

            record["verify"] = run_verify(src, tmp, hp, tok, dtype=dtype, tokens_dir=tokens_dir)
        (tmp / PROVENANCE_FILE).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return record
