"""convert.stream: the streamed safetensors file is byte-identical to safetensors' own, its sha256 is the file's, and a
tensor out of order, of the wrong shape or missing never produces a file that disagrees with its header."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save as torch_save

from textmill.convert import names
from textmill.convert.stream import SafetensorsWriter
from textmill.convert.tf_to_hf import DTYPES, stored_bytes
from textmill.sizes import Hparams
from textmill.weights import openai_shapes

HP = Hparams(n_vocab=96, n_ctx=16, n_embd=8, n_head=2, n_layer=11)  # 11 layers: h.10 sorts between h.1 and h.2


def model_tensors() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(3)
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in names.hf_shapes(HP).items()}


def stream(path: Path, tensors: dict[str, np.ndarray], dtype: str) -> str:
    shapes = {k: v.shape for k, v in tensors.items()}
    with SafetensorsWriter(path, shapes, dtype, {"format": "pt"}) as writer:
        for key in sorted(tensors):
            writer.add(key, stored_bytes(tensors[key], dtype))
    return writer.sha256


@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16"])
def test_streamed_file_is_byte_identical_to_safetensors(tmp_path, dtype):
    tensors = model_tensors()
    sha = stream(tmp_path / "w.safetensors", tensors, dtype)
    reference = torch_save({k: torch.from_numpy(v).to(DTYPES[dtype]) for k, v in tensors.items()},
                           metadata={"format": "pt"})
    written = (tmp_path / "w.safetensors").read_bytes()
    assert written == reference
    assert sha == hashlib.sha256(written).hexdigest()


def test_key_order_matches_the_tf_data_file_order():
    """Reading in sorted HF-key order reads the checkpoint front to back: both sort the same way, h10 included."""
    openai = sorted(openai_shapes(HP))
    assert [names.hf_key(n)[0] for n in openai] == sorted(names.hf_shapes(HP))


def test_half_precision_bytes_round_trip():
    x = np.array([[1.0, -2.5, 3.14159, 65504.0]], dtype=np.float32)
    np.testing.assert_array_equal(stored_bytes(x, "float16").view(np.float16), x.astype(np.float16))
    bf16 = torch.from_numpy(stored_bytes(x, "bfloat16")).view(torch.bfloat16).float().numpy()
    np.testing.assert_allclose(bf16, x, rtol=1e-2)
    assert stored_bytes(x, "float32") is x  # float32 is written from TF's own buffer, not copied


def test_out_of_order_wrong_shape_and_missing_tensors_fail(tmp_path):
    tensors = model_tensors()
    keys = sorted(tensors)
    shapes = {k: v.shape for k, v in tensors.items()}
    with pytest.raises(AssertionError, match="expected transformer.h.0"):
        with SafetensorsWriter(tmp_path / "a", shapes, "float32", {}) as w:
            w.add(keys[1], tensors[keys[1]])
    with pytest.raises(AssertionError):
        with SafetensorsWriter(tmp_path / "b", shapes, "float32", {}) as w:
            w.add(keys[0], np.zeros((3, 3), np.float32))
    with pytest.raises(AssertionError, match="never written"):
        with SafetensorsWriter(tmp_path / "c", shapes, "float32", {}) as w:
            w.add(keys[0], tensors[keys[0]])
    assert w.sha256 is None


def test_header_declares_every_tensor(tmp_path):
    tensors = model_tensors()
    stream(tmp_path / "w", tensors, "float16")
    raw = (tmp_path / "w").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    head = json.loads(raw[8:8 + n])
    assert head.pop("__metadata__") == {"format": "pt"}
    assert set(head) == set(tensors) and (8 + n) % 8 == 0
    assert max(e["data_offsets"][1] for e in head.values()) == len(raw) - 8 - n
