"""textmill/sizes.py + weights.py: the size table <-> hparams.json <-> transformers.GPT2Config <-> OpenAI variable shapes."""

import json
import re

import numpy as np
import pytest

from textmill import sizes, weights


def test_aliases_and_overrides():
    assert sizes.from_name("gpt2-medium") == sizes.from_name("355M") == sizes.SIZES["355M"]
    hp = sizes.from_name("tiny", n_vocab=400, n_ctx=None)
    assert (hp.n_vocab, hp.n_ctx, hp.n_embd, hp.n_layer) == (400, 128, 64, 2)
    with pytest.raises(ValueError, match="unknown model size 'huge'"):
        sizes.from_name("huge")
    with pytest.raises(ValueError, match="divisible by n_head"):
        sizes.Hparams(n_embd=65, n_head=2)


@pytest.mark.parametrize("name,params", [("124M", 124_439_808), ("355M", 354_823_168), ("774M", 774_030_080),
                                         ("1558M", 1_557_611_200)])
def test_parameter_counts_match_openai_releases(name, params):
    hp = sizes.from_name(name)
    assert hp.n_params == params
    assert sum(int(np.prod(s)) for s in weights.openai_shapes(hp).values()) == params


def test_hparams_json_round_trip(tmp_path):
    hp = sizes.from_name("355M")
    path = tmp_path / "hparams.json"
    path.write_text(json.dumps(hp.to_json()))
    assert list(json.loads(path.read_text())) == ["n_vocab", "n_ctx", "n_embd", "n_head", "n_layer"]  # OpenAI's order
    assert sizes.Hparams.from_json(json.loads(path.read_text())) == hp
    with pytest.raises(ValueError, match="unknown keys"):
        sizes.Hparams.from_json({**hp.to_json(), "n_embed": 1})


def test_gpt2config_round_trip_and_shapes_match_transformers():
    from transformers import GPT2Config, GPT2LMHeadModel

    hp = sizes.from_name("tiny", n_vocab=300, n_ctx=32)
    cfg = GPT2Config(**sizes.to_hf_config_kwargs(hp, eot_id=299))
    assert sizes.from_hf_config(cfg) == hp == sizes.from_hf_config(cfg.to_dict())
    model = GPT2LMHeadModel(cfg)
    assert model.num_parameters() == hp.n_params  # tied lm_head counted once, as in hparams' count
    state = model.state_dict()
    for name, shape in weights.openai_shapes(hp).items():
        # model/h0/ln_1/g -> transformer.h.0.ln_1.weight; OpenAI's Conv1D [1, nx, nf] is transformers' [nx, nf].
        hf = re.sub(r"^h(\d+)/", r"h.\1/", name.removeprefix("model/")).replace("/", ".")
        hf = "transformer." + re.sub(r"\.(g|w)$", ".weight", re.sub(r"\.b$", ".bias", hf))
        hf = hf + ".weight" if hf.endswith((".wte", ".wpe")) else hf
        want = shape[1:] if len(shape) == 3 else shape
        assert tuple(state[hf].shape) == want, (name, hf)


def test_init_is_openai_and_seeded():
    hp = sizes.from_name("tiny", n_vocab=300, n_ctx=32)
    a, b = dict(weights.init_numpy(hp, 1)), dict(weights.init_numpy(hp, 1))
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert not np.array_equal(a["model/wte"], dict(weights.init_numpy(hp, 2))["model/wte"])
    assert a["model/wte"].std() == pytest.approx(0.02, rel=0.05)
    assert a["model/wpe"].std() == pytest.approx(0.01, rel=0.1)
    assert np.all(a["model/h1/ln_2/g"] == 1) and np.all(a["model/h0/attn/c_attn/b"] == 0)
    assert weights.is_model_weight("model/h0/attn/c_attn/w") and not weights.is_model_weight("model/h0/attn/c_attn/w/Adam")
