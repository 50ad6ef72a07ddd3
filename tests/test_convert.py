"""`textmill convert`: real TF checkpoints (OpenAI release, gpt-2-simple run, prefix) -> HF folders transformers loads."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors import safe_open

from textmill.convert import names
from textmill.convert.cli import main as convert_main
from textmill import tokenizer as textmill_tok
from textmill.cli import main as textmill_main
from textmill.errors import UserError
from textmill.sizes import to_hf_config_kwargs
from textmill.storage import sha256_file
from tests.fixtures.checkpoints import (random_weights, tiny_hparams, tiny_tokenizer, write_gpt2_simple_run,
                                        write_openai_release)
from tests.fixtures.models import EXPORT_FILES


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """One tokenizer + hparams, an OpenAI release and a gpt-2-simple run with two steps (different weights)."""
    root = tmp_path_factory.mktemp("convert")
    tok = tiny_tokenizer()
    hp = tiny_hparams(tok)
    weights = {0: random_weights(hp, 0), 100: random_weights(hp, 100), 200: random_weights(hp, 200)}
    release = write_openai_release(root / "release", hp, tok, weights[0])
    run = write_gpt2_simple_run(root / "g2s", hp, tok, {100: weights[100], 200: weights[200]})
    return {"root": root, "tok": tok, "hp": hp, "weights": weights, "release": release, "run": run}


def stored(dst: Path) -> dict[str, np.ndarray]:
    with safe_open(str(dst / "model.safetensors"), "np") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def test_name_map_matches_transformers_gpt2(tiny):
    """Every HF key except the tied lm_head comes from exactly one OpenAI variable, with HF's own shape."""
    from transformers import GPT2Config, GPT2LMHeadModel

    hp = tiny["hp"]
    model = GPT2LMHeadModel(GPT2Config(**to_hf_config_kwargs(hp, eot_id=textmill_tok.eot_id(tiny["tok"]))))
    hf = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert set(hf) - set(names.hf_shapes(hp)) == set(names.TIED)
    assert {k: hf[k] for k in names.hf_shapes(hp)} == names.hf_shapes(hp)
    assert len(names.hf_shapes(hp)) == names.expected_key_count(hp) == 4 + 12 * hp.n_layer
    assert names.hf_key("model/h1/mlp/c_fc/w") == ("transformer.h.1.mlp.c_fc.weight", True)
    assert names.hf_key("model/h1/ln_2/g") == ("transformer.h.1.ln_2.weight", False)
    with pytest.raises(KeyError):
        names.hf_key("model/h0/attn/c_attn/w/Adam")


def test_openai_release_converts_loads_and_matches_tf(tiny, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from textmill.training.tf.model import load as load_tf

    dst = tmp_path / "export"
    assert convert_main([str(tiny["release"]), str(dst), "--verify"]) == 0
    assert {p.name for p in dst.iterdir()} == EXPORT_FILES
    # Weights: exact copies, conv weights without their leading axis, lm_head stored once (tied).
    tensors, w = stored(dst), tiny["weights"][0]
    assert "lm_head.weight" not in tensors
    np.testing.assert_array_equal(tensors["transformer.h.1.attn.c_attn.weight"], w["model/h1/attn/c_attn/w"][0])
    np.testing.assert_array_equal(tensors["transformer.ln_f.bias"], w["model/ln_f/b"])
    # Loads unchanged with transformers, and gives TF's logits.
    model = AutoModelForCausalLM.from_pretrained(dst).eval()
    hf_tok = AutoTokenizer.from_pretrained(dst)
    assert model.config.model_type == "gpt2" and model.config.architectures == ["GPT2LMHeadModel"]
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()
    ids = np.array([hf_tok("Das Paket enthält Werkzeuge. The quick brown fox<|endoftext|>Le paquet")["input_ids"]])
    assert ids.shape[1] > 10 and list(ids[0]).count(textmill_tok.eot_id(tiny["tok"])) == 1
    tf_logits = load_tf(tiny["release"]).__call__(ids).numpy()
    with torch.inference_mode():
        hf_logits = model(torch.from_numpy(ids)).logits
    torch.testing.assert_close(hf_logits, torch.from_numpy(tf_logits), atol=1e-4, rtol=1e-4)
    # Provenance: layout, verify numbers, and a sha256 for every written file.
    record = json.loads((dst / "textmill.json").read_text())
    assert record["source"]["layout"] == "openai" and record["source"]["step"] is None
    assert record["verify"]["models"]["logits_max_abs_diff"] < 1e-4
    assert record["verify"]["models"]["greedy_match"] and record["verify"]["tokenizer"]["sample"] == "builtin"
    assert set(record["files"]) == EXPORT_FILES - {"textmill.json"}
    assert all(sha256_file(dst / f) == h for f, h in record["files"].items())
    assert record["source"]["files"]["model.ckpt.index"] == sha256_file(tiny["release"] / "model.ckpt.index")


def test_gpt2_simple_run_latest_and_step_skip_optimizer_state(tiny, tmp_path):
    latest, older = tmp_path / "latest", tmp_path / "step100"
    assert convert_main([str(tiny["run"]), str(latest)]) == 0
    assert convert_main([str(tiny["run"]), str(older), "--step", "100"]) == 0
    for dst, step in ((latest, 200), (older, 100)):
        np.testing.assert_array_equal(stored(dst)["transformer.wte.weight"], tiny["weights"][step]["model/wte"])
        record = json.loads((dst / "textmill.json").read_text())
        assert (record["source"]["layout"], record["source"]["step"]) == ("gpt-2-simple", step)
        skipped = record["skipped_variables"]
        assert {"beta1_power", "beta2_power", "global_step", "model/wte/Adam", "model/h0/mlp/c_fc/w/Adam_1"} <= set(skipped)
        assert len(skipped) == 3 + 2 * len(names.hf_shapes(tiny["hp"]))
        assert "verify" not in record


def test_prefix_source_half_precision_verifies(tiny, tmp_path, capsys):
    dst = tmp_path / "fp16"
    prefix = tiny["run"] / "model-100"
    assert convert_main([str(prefix), str(dst), "--dtype", "float16", "--verify"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["layout"] == "prefix" and summary["step"] == 100 and summary["skipped_variables"] > 0
    tensors = stored(dst)
    assert {t.dtype for t in tensors.values()} == {np.dtype(np.float16)}
    np.testing.assert_allclose(tensors["transformer.wpe.weight"], tiny["weights"][100]["model/wpe"], atol=1e-3)
    assert json.loads((dst / "config.json").read_text())["dtype"] == "float16"
    assert 0 < summary["verify"]["logits_max_abs_diff"] < 5e-2


def test_wrong_paths_name_the_path_to_pass(tiny, tmp_path):
    with pytest.raises(UserError, match=r"pass a run folder such as .*checkpoint/run1"):
        convert_main([str(tiny["run"].parent), str(tmp_path / "a")])
    with pytest.raises(UserError, match="no checkpoint for step 150; available steps: \\[100, 200\\]"):
        convert_main([str(tiny["run"]), str(tmp_path / "b"), "--step", "150"])
    with pytest.raises(UserError, match="--step best needs textmill_state.json"):
        convert_main([str(tiny["run"]), str(tmp_path / "c"), "--step", "best"])
    with pytest.raises(UserError, match="OpenAI release has one checkpoint"):
        convert_main([str(tiny["release"]), str(tmp_path / "d"), "--step", "3"])
    assert not any(tmp_path.iterdir())


def test_cli_reports_user_error_in_one_line(tiny, tmp_path, capsys):
    code = textmill_main(["convert", str(tiny["run"]), str(tmp_path / "x"), "--step", "150"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("textmill convert: error:") and "\n" not in err and "Traceback" not in err
