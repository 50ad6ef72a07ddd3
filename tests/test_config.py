"""The config schema, Hydra composition and params.yaml stay one source of truth."""

import subprocess
import sys

import pytest
from omegaconf import OmegaConf

from textmill import config as C
from textmill.errors import UserError
from tests.conftest import REPO


def test_params_yaml_equals_hydra_composition():
    committed = (REPO / "params.yaml").read_text(encoding="utf-8")
    assert committed == OmegaConf.to_yaml(C.compose(), resolve=True), "params.yaml is stale: run `textmill params`"


def test_composition_spells_out_every_schema_key():
    # `dvc exp run -S training.steps=10` only works for keys present in the composition, so none may be left to defaults.
    composed = OmegaConf.to_container(C.compose(), resolve=True)
    full = C.to_dict(C.from_container(composed))
    assert composed == full


@pytest.mark.parametrize("overrides", [["model=gpt2-355M", "training=p100", "base.uri=gs://b/gpt2/355M"],
                                       ["publish=gcs"], ["corpus@corpora.abstracts=legal"]])
def test_other_presets_compose_and_validate(overrides):
    cfg = C.from_container(C.compose(overrides))
    assert cfg.models and cfg.corpora


def test_p100_preset_turns_on_checkpointing_and_fp16():
    cfg = C.from_container(C.compose(["model=gpt2-355M", "training=p100", "base.uri=/x"]))
    assert cfg.training.grad_checkpointing and cfg.training.precision == "mixed_float16"
    assert cfg.model.size == "355M" and cfg.base.init == "fetch"


def test_fetch_without_uri_is_a_clear_error():
    with pytest.raises(UserError, match="base.uri is required"):
        C.from_container(C.compose(["model=gpt2-355M"]))


def test_unknown_key_names_the_key(tmp_path):
    p = tmp_path / "params.yaml"
    p.write_text((REPO / "params.yaml").read_text() + "\ntraining_typo: 1\n")
    with pytest.raises(UserError, match="training_typo"):
        C.load(p)


def test_mistyped_value_names_the_key():
    with pytest.raises(UserError, match="training.steps"):
        C.load(REPO / "params.yaml", ["training.steps=many"])


def test_overrides_apply():
    cfg = C.load(REPO / "params.yaml", ["training.steps=7"])
    assert cfg.training.steps == 7


def test_cli_prints_one_line_error_for_user_mistakes(tmp_path):
    r = subprocess.run([sys.executable, "-m", "textmill.cli", "params", "--check", "--out", str(tmp_path / "p.yaml")],
                       capture_output=True, text=True, cwd=REPO)
    assert r.returncode == 1 and "stale" in r.stdout
    r = subprocess.run([sys.executable, "-m", "textmill.cli", "nosuchverb"], capture_output=True, text=True)
    assert r.returncode == 2 and "unknown verb" in r.stderr


def test_core_package_stays_import_light():
    code = ("import sys, textmill.cli, textmill.config, textmill.sizes, textmill.storage, textmill.tokenizer;"
            "heavy = [m for m in ('tensorflow', 'torch', 'fastapi', 'transformers') if m in sys.modules];"
            "print(','.join(heavy))")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert r.stdout.strip() == ""
