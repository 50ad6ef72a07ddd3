"""training/tf/checkpoint.py against real TF checkpoint files: save/read/list, state file, and damaged-file errors."""

import os

import numpy as np
import pytest
import tensorflow as tf

from textmill.errors import UserError
from textmill.training.tf import checkpoint as ck


@pytest.fixture()
def saved(tmp_path):
    values = {"model/wte": np.arange(12, dtype=np.float32).reshape(3, 4),
              "model/h0/attn/c_attn/w": np.random.default_rng(0).normal(size=(1, 4, 12)).astype(np.float32),
              "global_step": np.int64(42)}
    variables = {"model/wte": tf.Variable(values["model/wte"]), "model/h0/attn/c_attn/w": values["model/h0/attn/c_attn/w"],
                 "global_step": tf.Variable(values["global_step"])}
    ck.save(variables, tmp_path / "model-3")
    return tmp_path / "model-3", values


def test_save_writes_openai_layout_and_reads_back(saved):
    prefix, values = saved
    assert sorted(os.listdir(prefix.parent)) == ["model-3.data-00000-of-00001", "model-3.index"]  # no temp leftovers
    assert ck.list_variables(prefix) == {"global_step": (), "model/h0/attn/c_attn/w": (1, 4, 12), "model/wte": (3, 4)}
    got = ck.read(prefix)
    for name, value in values.items():
        np.testing.assert_array_equal(got[name], value)
    # TF's own reader sees the same names (what OpenAI's and gpt-2-simple's code restore by).
    assert dict(tf.train.list_variables(str(prefix))) == {k: list(v.shape) for k, v in values.items()}
    assert [n for n, _ in ck.iter_tensors(prefix, ["model/wte", "global_step"])] == ["model/wte", "global_step"]


def test_state_file_round_trip_and_latest(tmp_path, saved):
    prefix, _ = saved
    assert ck.latest_prefix(tmp_path) is None
    ck.write_checkpoint_file(tmp_path, "model-3", ["model-1", "model-3"])
    text = (tmp_path / "checkpoint").read_text()
    assert text.splitlines() == ['model_checkpoint_path: "model-3"', 'all_model_checkpoint_paths: "model-1"',
                                 'all_model_checkpoint_paths: "model-3"']
    assert ck.latest_prefix(tmp_path) == prefix
    assert ck.resolve_prefix(tmp_path) == prefix
    assert tf.train.latest_checkpoint(str(tmp_path)) == str(prefix)  # TF agrees on the file we wrote


def test_missing_index_and_truncated_data_are_user_errors(tmp_path, saved):
    prefix, _ = saved
    with pytest.raises(UserError, match=r"model-9\.index: no such checkpoint index"):
        ck.list_variables(tmp_path / "model-9")
    data = tmp_path / "model-3.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:20])
    with pytest.raises(UserError, match=r"data-00000-of-00001: cannot read variable .* truncated"):
        ck.read(prefix)
    (tmp_path / "model-3.index").unlink()
    with pytest.raises(UserError, match="without its index"):
        ck.read(prefix)


def test_folder_without_state_file_and_unknown_variable(tmp_path, saved):
    prefix, _ = saved
    with pytest.raises(UserError, match="no checkpoint state file"):
        ck.resolve_prefix(tmp_path)
    with pytest.raises(UserError, match=r"no variable\(s\) \['model/h7/mlp/c_fc/w'\]"):
        ck.read(prefix, ["model/h7/mlp/c_fc/w"])


def test_save_replaces_atomically(tmp_path, saved):
    prefix, _ = saved
    ck.save({"model/wte": np.zeros((2, 2), np.float32)}, prefix)
    assert ck.list_variables(prefix) == {"model/wte": (2, 2)}
    assert sorted(os.listdir(tmp_path)) == ["model-3.data-00000-of-00001", "model-3.index"]
