"""`textmill base`: scratch init (exact OpenAI file set, names, shapes, determinism) and fetch (local, gs://, errors)."""

import json
import shutil

import numpy as np
import pytest
import yaml

from tests.fixtures.clean_corpora import make_config, make_docs, write_clean
from textmill import cli, config as config_mod, sizes, tokenizer, weights
from textmill.errors import UserError
from textmill.training import base
from textmill.training.tf import checkpoint


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A scratch base for model `m` over two corpora, and its config."""
    tmp = tmp_path_factory.mktemp("base")
    write_clean(tmp / "clean", "a", make_docs(150, seed=1, prefix="a"))
    write_clean(tmp / "clean", "b", make_docs(150, seed=2, prefix="b"))
    cfg = make_config(tmp, {"m": ["a", "b"]})
    return base.make_base(cfg, "m", show_progress=False), cfg


def test_scratch_writes_exact_openai_file_set(built):
    folder, cfg = built
    assert sorted(p.name for p in folder.iterdir()) == sorted(base.FILES)
    assert (folder / "checkpoint").read_text().splitlines()[0] == 'model_checkpoint_path: "model.ckpt"'
    hp = base.read_hparams(folder / "hparams.json")
    tok = tokenizer.load(folder)
    assert hp == sizes.from_name("tiny", n_ctx=32, n_vocab=tokenizer.vocab_size(tok))
    assert hp.n_vocab == cfg.model.vocab_size == 400
    assert [p.name for p in folder.parent.iterdir()] == ["m"]  # no temp folder left behind


def test_scratch_variables_are_openai_names_shapes_and_init(built):
    folder, cfg = built
    hp = base.read_hparams(folder / "hparams.json")
    assert checkpoint.list_variables(folder / "model.ckpt") == dict(sorted(weights.openai_shapes(hp).items()))
    values = checkpoint.read(folder / "model.ckpt")
    expected = dict(weights.init_numpy(hp, cfg.base.seed))
    for name in expected:
        np.testing.assert_array_equal(values[name], expected[name])


def test_scratch_is_byte_deterministic(built, tmp_path):
    folder, cfg = built
    again = base.make_base(cfg, "m", tmp_path / "again", show_progress=False)
    for name in base.FILES:
        assert (again / name).read_bytes() == (folder / name).read_bytes(), name


def fetch_cfg(built, uri):
    _, cfg = built
    return config_mod.from_container({**config_mod.to_dict(cfg), "base": {"init": "fetch", "uri": str(uri)}})


def test_fetch_local_folder_copies_and_checks(built, tmp_path):
    folder, _ = built
    out = base.make_base(fetch_cfg(built, folder), "m", tmp_path / "fetched")
    for name in base.FILES:
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name


def test_fetch_gpt2_simple_run_with_extra_variables(built, tmp_path):
    """A gpt-2-simple run folder (model-300 + optimizer slots) is accepted and normalised to model.ckpt."""
    folder, _ = built
    src = tmp_path / "run"
    src.mkdir()
    for name in ("hparams.json", "encoder.json", "vocab.bpe"):
        shutil.copy(folder / name, src / name)
    values = checkpoint.read(folder / "model.ckpt")
    checkpoint.save({**values, "model/wte/Adam": np.zeros_like(values["model/wte"]), "global_step": np.int64(300)},
                    src / "model-300")
    checkpoint.write_checkpoint_file(src, "model-300", ["model-300"])
    out = base.make_base(fetch_cfg(built, src), "m", tmp_path / "fetched")
    assert sorted(p.name for p in out.iterdir()) == sorted(base.FILES)
    assert "global_step" in checkpoint.list_variables(out / "model.ckpt")


def test_fetch_from_gcs_emulator(built, gcs_bucket, tmp_path):
    import gcsfs

    folder, _ = built
    fs = gcsfs.GCSFileSystem(token="anon", skip_instance_cache=True)
    for name in base.FILES:
        fs.put_file(str(folder / name), f"{gcs_bucket}/gpt2/tiny/{name}")
    out = base.make_base(fetch_cfg(built, f"{gcs_bucket}/gpt2/tiny"), "m", tmp_path / "fetched")
    for name in base.FILES:
        assert (out / name).read_bytes() == (folder / name).read_bytes(), name


def copy_base(folder, dest):
    shutil.copytree(folder, dest)
    return dest


def test_fetch_misshaped_variable_names_it(built, tmp_path):
    folder, _ = built
    src = copy_base(folder, tmp_path / "bad")
    values = checkpoint.read(src / "model.ckpt")
    values["model/h1/mlp/c_fc/w"] = np.zeros((1, 64, 128), np.float32)
    checkpoint.save(values, src / "model.ckpt")
    with pytest.raises(UserError, match=r"variable 'model/h1/mlp/c_fc/w' has shape \[1, 64, 128\], expected \[1, 64, 256\]"):
        base.make_base(fetch_cfg(built, src), "m", tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing half-written


def test_fetch_errors_name_the_file(built, tmp_path):
    folder, _ = built
    src = copy_base(folder, tmp_path / "src")
    (src / "vocab.bpe").unlink()
    with pytest.raises(UserError, match=r"src/vocab\.bpe: not found"):
        base.make_base(fetch_cfg(built, src), "m", tmp_path / "out")
    shutil.copy(folder / "vocab.bpe", src / "vocab.bpe")
    (src / "hparams.json").write_text(json.dumps({**json.loads((folder / "hparams.json").read_text()), "n_vocab": 401}))
    with pytest.raises(UserError, match="encoder.json has 400 tokens but hparams.json n_vocab=401"):
        base.make_base(fetch_cfg(built, src), "m", tmp_path / "out")
    (src / "hparams.json").write_text(json.dumps({**json.loads((folder / "hparams.json").read_text()), "n_layer": 3}))
    with pytest.raises(UserError, match="is not model.size=tiny"):
        base.make_base(fetch_cfg(built, src), "m", tmp_path / "out")
    shutil.copy(folder / "hparams.json", src / "hparams.json")
    data = src / "model.ckpt.data-00000-of-00001"
    data.write_bytes(data.read_bytes()[:1000])
    with pytest.raises(UserError, match="truncated or corrupt"):
        base.make_base(fetch_cfg(built, src), "m", tmp_path / "out")


def test_cli_builds_and_reports_user_errors_in_one_line(built, tmp_path, capsys):
    _, cfg = built
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump(config_mod.to_dict(cfg)))
    assert cli.main(["base", "m", "--params", str(params), "--out", str(tmp_path / "cli")]) == 0
    assert sorted(p.name for p in (tmp_path / "cli").iterdir()) == sorted(base.FILES)
    capsys.readouterr()
    assert cli.main(["base", "nope", "--params", str(params)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"textmill base: error: unknown model 'nope'; configured models: ['m'] (see `models:` in "
                   f"configs/config.yaml)"]
    assert cli.main(["base", "m", "--params", str(params), "--set", "base.init=fetch"]) == 2
    assert "base.uri is required" in capsys.readouterr().err
