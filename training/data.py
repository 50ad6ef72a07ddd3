"""Token-stream loader shared by every trainer and by `textmill evaluate`: numpy only (no TensorFlow, no torch).

Reads `data/tokens/<model>/{train,val}.bin` + `meta.json` (written by `textmill prepare`) through `np.memmap`.

Training batches are random windows whose offsets depend only on (seed, step, micro): there is no iterator state, so the
"data position" a trainer stores for resuming is just the optimizer step. Resuming at step k draws exactly the batches an
uninterrupted run would have drawn at steps k, k+1, ... With several replicas, draw the global batch
(`batch_size` = per-replica size x replicas) and give replica r rows [r*b, (r+1)*b): the data then does not depend on
how many devices share it.

Validation is one protocol for everyone (TF trainer, torch trainer, `textmill evaluate`): `eval_batches` covers the val
split with non-overlapping windows, every token from the second on is predicted exactly once, and

    val_loss = sum(cross_entropy(logits(x), y) * w) / sum(w)     over all batches

which is the mean token cross-entropy over all `len(val) - 1` predicted tokens. Padding (w == 0) sits at the end of a row,
where a causal model cannot let it influence the real positions before it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterator

import numpy as np

from textmill.errors import UserError
from textmill.storage import read_json

META_FILE = "meta.json"
SPLITS = ("train", "val")
DTYPES = {"uint16": np.uint16, "uint32": np.uint32}


def load_meta(tokens_dir: str | Path) -> dict:
    """The token dataset's meta.json (dtype, vocab_size, eot_id, counts, tokenizer checksum, split rule)."""
    path = Path(tokens_dir) / META_FILE
    meta = read_json(path, fix="no token dataset here: run `textmill prepare <model>` first")
    if meta.get("dtype") not in DTYPES:
        raise UserError(f"{path}: dtype {meta.get('dtype')!r} is not one of {sorted(DTYPES)}; rerun `textmill prepare`")
    return meta


def open_tokens(tokens_dir: str | Path, split: str) -> np.ndarray:
    """The split's flat token ids, memory-mapped read-only (an empty split gives an empty array)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    meta = load_meta(tokens_dir)
    dtype = np.dtype(DTYPES[meta["dtype"]])
    path = Path(tokens_dir) / f"{split}.bin"
    if not path.is_file():
        raise UserError(f"{path}: missing (meta.json is there); rerun `textmill prepare`")
    size = path.stat().st_size
    if size % dtype.itemsize:
        raise UserError(f"{path}: {size} bytes is not a whole number of {meta['dtype']} ids; the file is truncated, "
                        f"rerun `textmill prepare`")
    expected = meta.get("tokens", {}).get(split)
    if expected is not None and size // dtype.itemsize != expected:
        raise UserError(f"{path}: holds {size // dtype.itemsize} tokens but meta.json says {expected}; rerun "
                        f"`textmill prepare`")
    if size == 0:
        return np.zeros(0, dtype)  # mmap cannot map an empty file
    return np.memmap(path, dtype=dtype, mode="r")


def _check_length(tokens: np.ndarray, n_ctx: int, what: str) -> None:
    if n_ctx <= 0:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    if len(tokens) < n_ctx + 1:
        raise UserError(f"{what} has {len(tokens)} tokens, fewer than one window of n_ctx+1={n_ctx + 1}; add documents "
                        f"to the corpora, raise prepare.val_fraction (for val), or lower training.n_ctx")


def batch_offsets(n_tokens: int, *, step: int, micro: int, batch_size: int, n_ctx: int, seed: int) -> np.ndarray:
    """Window start offsets for one micro-batch: a pure function of (seed, step, micro)."""
    # SeedSequence mixes the three integers into independent streams: no two (step, micro) pairs share one.
    rng = np.random.default_rng(np.random.SeedSequence([int(seed), int(step), int(micro)]))
    return rng.integers(0, n_tokens - n_ctx, size=batch_size, dtype=np.int64)


def train_batch(tokens: np.ndarray, *, step: int, micro: int, batch_size: int, n_ctx: int,
                seed: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) int32 [batch_size, n_ctx]: random windows, y is x shifted by one token."""
    _check_length(tokens, n_ctx, "the train split")
    offsets = batch_offsets(len(tokens), step=step, micro=micro, batch_size=batch_size, n_ctx=n_ctx, seed=seed)
    # One fancy-index gather reads only the touched pages of the memmap.
    rows = np.asarray(tokens[offsets[:, None] + np.arange(n_ctx + 1)], dtype=np.int32)
    return rows[:, :-1], rows[:, 1:]


def eval_windows(tokens: np.ndarray, n_ctx: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Non-overlapping (x, y) int32 windows [L] (L <= n_ctx; only the last is shorter) predicting tokens 1..N-1 once."""
    _check_length(tokens, 1, "the val split")
    if n_ctx <= 0:
        raise ValueError(f"n_ctx must be positive, got {n_ctx}")
    n_pred = len(tokens) - 1
    for start in range(0, n_pred, n_ctx):
        length = min(n_ctx, n_pred - start)
        window = np.asarray(tokens[start:start + length + 1], dtype=np.int32)
        yield window[:-1], window[1:]


def eval_batches(tokens: np.ndarray, n_ctx: int,
                 batch_size: int) -> Iterator[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(x, y, w) batches of fixed shape [batch_size, n_ctx] over `eval_windows`; w is 1.0 on real tokens, 0.0 on padding.

    The fixed shape keeps compiled graphs (tf.function, XLA, CUDA graphs) from retracing on the last, short batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive, got {batch_size}")
    x = np.zeros((batch_size, n_ctx), np.int32)
    y = np.zeros((batch_size, n_ctx), np.int32)
    w = np.zeros((batch_size, n_ctx), np.float32)
    row = 0
    for wx, wy in eval_windows(tokens, n_ctx):
        x[row, :len(wx)], y[row, :len(wy)], w[row, :len(wx)] = wx, wy, 1.0
        row += 1
        if row == batch_size:
            yield x.copy(), y.copy(), w.copy()
            x[:], y[:], w[:] = 0, 0, 0.0
            row = 0
    if row:
        yield x, y, w


def eval_token_count(tokens: np.ndarray) -> int:
    """How many tokens the validation loss averages over (every token but the first)."""
    return max(len(tokens) - 1, 0)


def mean_loss(per_token_losses: Iterator[tuple[np.ndarray, np.ndarray]]) -> float:
    """The protocol's reduction: sum(loss * w) / sum(w) over (loss [B, T], w [B, T]) pairs, accumulated in float64."""
    total, count = 0.0, 0.0
    for loss, w in per_token_losses:
        w64 = np.asarray(w, np.float64)
        total += float(np.sum(np.asarray(loss, np.float64) * w64))
        count += float(np.sum(w64))
    if count == 0:
        raise UserError("validation loss over zero tokens: the val split is empty; raise prepare.val_fraction")
    return total / count
