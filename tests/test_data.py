"""training/data.py: stateless resumable train batches, the validation-window protocol, meta/dtype handling."""

import json

import numpy as np
import pytest

from textmill.errors import UserError
from textmill.training import data


def write_tokens(folder, train, val, dtype="uint16"):
    folder.mkdir(parents=True, exist_ok=True)
    np.asarray(train, dtype).tofile(folder / "train.bin")
    np.asarray(val, dtype).tofile(folder / "val.bin")
    meta = {"dtype": dtype, "vocab_size": 70000 if dtype == "uint32" else 500, "eot_id": 0,
            "tokens": {"train": len(train), "val": len(val)}}
    (folder / "meta.json").write_text(json.dumps(meta))
    return folder


def test_open_tokens_reads_dtype_from_meta(tmp_path):
    d = write_tokens(tmp_path / "t", np.arange(1000) + 66000, np.arange(10), dtype="uint32")
    train = data.open_tokens(d, "train")
    assert train.dtype == np.uint32 and len(train) == 1000 and int(train[5]) == 66005
    assert data.load_meta(d)["vocab_size"] == 70000


def test_open_tokens_rejects_length_mismatch_and_missing(tmp_path):
    d = write_tokens(tmp_path / "t", np.arange(100), np.arange(10))
    (d / "val.bin").write_bytes((d / "val.bin").read_bytes()[:-2])
    with pytest.raises(UserError, match="val.bin: holds 9 tokens but meta.json says 10"):
        data.open_tokens(d, "val")
    with pytest.raises(UserError, match="run `textmill prepare"):
        data.load_meta(tmp_path / "nothing")


def test_resumed_batches_equal_uninterrupted_run():
    tokens = np.random.default_rng(0).integers(0, 500, 5000).astype(np.uint16)
    kw = dict(batch_size=4, n_ctx=32, seed=7)
    full = [data.train_batch(tokens, step=s, micro=m, **kw) for s in range(10) for m in range(2)]
    # A "new process" resuming at step 6 only knows the step: it reproduces steps 6..9 exactly.
    resumed = [data.train_batch(tokens, step=s, micro=m, **kw) for s in range(6, 10) for m in range(2)]
    for (x1, y1), (x2, y2) in zip(full[12:], resumed):
        np.testing.assert_array_equal(x1, x2)
        np.testing.assert_array_equal(y1, y2)
    # Different steps, micro-batches and seeds draw different windows.
    assert not np.array_equal(full[0][0], full[1][0]) and not np.array_equal(full[0][0], full[2][0])
    other = data.train_batch(tokens, step=0, micro=0, batch_size=4, n_ctx=32, seed=8)[0]
    assert not np.array_equal(full[0][0], other)


def test_train_batch_shapes_shift_and_bounds():
    tokens = np.arange(41, dtype=np.uint16)  # exactly one window of n_ctx+1 = 41 tokens
    x, y = data.train_batch(tokens, step=3, micro=0, batch_size=5, n_ctx=40, seed=1)
    assert x.dtype == np.int32 and x.shape == (5, 40) and y.shape == (5, 40)
    np.testing.assert_array_equal(x[0], np.arange(40))
    np.testing.assert_array_equal(y, x + 1)
    with pytest.raises(UserError, match="fewer than one window"):
        data.train_batch(tokens[:40], step=0, micro=0, batch_size=1, n_ctx=40, seed=1)


@pytest.mark.parametrize("n", [2, 17, 64, 65, 66, 1000])
def test_eval_windows_predict_every_token_once(n):
    tokens = np.arange(n, dtype=np.uint16) + 1
    windows = list(data.eval_windows(tokens, 32))
    ys = np.concatenate([y for _, y in windows])
    np.testing.assert_array_equal(ys, tokens[1:])  # every token from the second on, once, in order
    for x, y in windows:
        assert len(x) <= 32 and np.array_equal(x + 1, y)
    assert all(len(x) == 32 for x, _ in windows[:-1])
    assert data.eval_token_count(tokens) == n - 1


def test_eval_batches_fixed_shape_and_mask_matches_windows():
    tokens = np.arange(300, dtype=np.uint16)
    batches = list(data.eval_batches(tokens, 32, 4))
    assert all(x.shape == (4, 32) and w.shape == (4, 32) for x, _, w in batches)
    assert sum(float(w.sum()) for _, _, w in batches) == 299
    ys = np.concatenate([y[w > 0] for _, y, w in batches])
    np.testing.assert_array_equal(ys, tokens[1:])
    # The reduction: a per-token "loss" equal to the target id averages to the mean of tokens 1..299.
    assert data.mean_loss((y.astype(np.float64), w) for _, y, w in batches) == pytest.approx(150.0)
