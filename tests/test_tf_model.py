"""The TF GPT-2: OpenAI names/shapes and math, gradient checkpointing, mixed precision, accumulation, AdamW, loss scaling."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import tensorflow as tf

from textmill import weights
from textmill.config import TrainingConfig
from textmill.errors import UserError
from textmill.sizes import Hparams
from textmill.training.tf.model import GPT2, load
from textmill.training.tf.optim import AdamW, Schedule
from textmill.training.tf.trainer import Trainer

HP = Hparams(n_vocab=300, n_ctx=32, n_embd=32, n_head=2, n_layer=2)
RNG = np.random.default_rng(0)
X = RNG.integers(0, HP.n_vocab, (4, 16)).astype(np.int32)
Y = RNG.integers(0, HP.n_vocab, (4, 16)).astype(np.int32)


def numpy_gpt2(w: dict[str, np.ndarray], hp: Hparams, tokens: np.ndarray) -> np.ndarray:
    """OpenAI's src/model.py transcribed to float64 numpy: the reference the TF model must match."""
    def norm(x, p):
        u = x.mean(-1, keepdims=True)
        s = ((x - u) ** 2).mean(-1, keepdims=True)
        return (x - u) / np.sqrt(s + 1e-5) * w[f"{p}/g"] + w[f"{p}/b"]

    def conv1d(x, p):
        return x @ w[f"{p}/w"][0] + w[f"{p}/b"]

    def softmax(x):
        e = np.exp(x - x.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    b, t = tokens.shape
    d = hp.n_embd // hp.n_head
    h = w["model/wte"][tokens] + w["model/wpe"][:t]
    mask = np.tril(np.ones((t, t)))
    for i in range(hp.n_layer):
        p = f"model/h{i}"
        q, k, v = np.split(conv1d(norm(h, f"{p}/ln_1"), f"{p}/attn/c_attn"), 3, axis=-1)
        q, k, v = (z.reshape(b, t, hp.n_head, d).transpose(0, 2, 1, 3) for z in (q, k, v))
        att = softmax((q @ k.transpose(0, 1, 3, 2)) / math.sqrt(d) * mask - 1e10 * (1 - mask))
        a = (att @ v).transpose(0, 2, 1, 3).reshape(b, t, hp.n_embd)
        h = h + conv1d(a, f"{p}/attn/c_proj")
        m = conv1d(norm(h, f"{p}/ln_2"), f"{p}/mlp/c_fc")
        m = 0.5 * m * (1 + np.tanh(math.sqrt(2 / math.pi) * (m + 0.044715 * m ** 3)))
        h = h + conv1d(m, f"{p}/mlp/c_proj")
    return norm(h, "model/ln_f") @ w["model/wte"].T


def test_variables_are_openai_names_and_shapes():
    model = GPT2(HP)
    assert {n: tuple(v.shape) for n, v in model.variables_by_name.items()} == weights.openai_shapes(HP)
    assert all(v.dtype == tf.float32 for v in model.variables_by_name.values())
    assert list(model.variables_by_name) == list(weights.openai_shapes(HP))


def test_logits_match_openai_math_in_numpy():
    init = {n: v.astype(np.float64) for n, v in weights.init_numpy(HP, 3)}
    for name in init:  # non-trivial LayerNorm/bias values, so a swapped g/b or a missing bias shows
        init[name] += np.random.default_rng(1).normal(0, 0.05, init[name].shape)
    model = GPT2(HP)
    model.assign(init)
    np.testing.assert_allclose(model(X).numpy(), numpy_gpt2(init, HP, X), atol=1e-4)


def test_assign_names_the_mismatched_variable():
    model = GPT2(HP)
    bad = {n: v.numpy() for n, v in model.variables_by_name.items()}
    bad["model/h1/mlp/c_fc/w"] = np.zeros((1, 32, 64), np.float32)
    with pytest.raises(UserError, match=r"model/h1/mlp/c_fc/w.*\(1, 32, 64\)"):
        model.assign(bad)
    del bad["model/ln_f/g"]
    with pytest.raises(UserError, match="model/ln_f/g"):
        model.assign(bad)


def test_load_restores_an_openai_layout_folder(tmp_path):
    from textmill.training.tf import checkpoint

    values = dict(weights.init_numpy(HP, 5))
    checkpoint.save({**values, "model/h0/attn/c_attn/w/Adam": np.zeros((1, 32, 96), np.float32)}, tmp_path / "model.ckpt")
    checkpoint.write_checkpoint_file(tmp_path, "model.ckpt", ["model.ckpt"])
    (tmp_path / "hparams.json").write_text(json.dumps(HP.to_json()))
    model = load(tmp_path)
    assert model.hp == HP
    for name, value in values.items():
        np.testing.assert_array_equal(model.variables_by_name[name].numpy(), value)


def grads_of(model: GPT2) -> tuple[float, list[np.ndarray]]:
    with tf.GradientTape() as tape:
        loss = model.loss(X, Y)
    return float(loss), [tf.convert_to_tensor(g).numpy() for g in tape.gradient(loss, model.ordered)]


def test_gradient_checkpointing_gives_identical_gradients():
    plain = GPT2(HP, seed=1)
    ckpt = GPT2(HP, seed=1, grad_checkpointing=True)
    (l1, g1), (l2, g2) = grads_of(plain), grads_of(ckpt)
    assert l1 == l2
    for a, b, name in zip(g1, g2, plain.variables_by_name):
        np.testing.assert_allclose(a, b, atol=1e-7, err_msg=name)
    assert any(np.abs(g).max() > 0 for g in g2)


def cfg(**kw) -> TrainingConfig:
    base = dict(steps=10, batch_size=4, grad_accum=1, learning_rate=1e-3, warmup_steps=0, weight_decay=0.1,
                beta1=0.9, beta2=0.95, grad_clip=1.0)
    return TrainingConfig(**{**base, **kw})


def trainer(**kw) -> Trainer:
    t = Trainer(HP, cfg(**kw), 16, tf.distribute.get_strategy())
    t.model.assign(dict(weights.init_numpy(HP, 2)))
    return t


def test_mixed_float16_step_is_finite_and_close_to_float32():
    fp16, fp32 = trainer(precision="mixed_float16"), trainer()
    out16, out32 = fp16.train_step(X[None], Y[None]), fp32.train_step(X[None], Y[None])
    assert np.isfinite(out16["loss"]) and out16["loss"] == pytest.approx(out32["loss"], abs=2e-2)
    assert out16["loss_scale"] == 2.0 ** 15 and out32["loss_scale"] == 1.0
    assert fp16.model(X).dtype == tf.float32
    assert all(v.dtype == tf.float32 for v in fp16.model.variables_by_name.values())
    assert int(fp16.opt.step.numpy()) == 1 and int(fp16.opt.skipped.numpy()) == 0


def test_gradient_accumulation_averages_micro_batches():
    one, two = trainer(batch_size=4, grad_accum=1), trainer(batch_size=2, grad_accum=2)
    a = one.train_step(X[None], Y[None])  # [1, 4, T]
    b = two.train_step(X.reshape(2, 2, -1), Y.reshape(2, 2, -1))  # [2, 2, T]: the same 4 rows as two micro-batches
    assert a["loss"] == pytest.approx(b["loss"], abs=1e-6)
    assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
    # Adam's first moment after one step is (1 - beta1) * the averaged gradient: compare that, not Adam's output, which
    # blows float noise on near-zero gradients (the key bias) up to +-lr.
    for name, m in one.opt.m.items():
        np.testing.assert_allclose(m.numpy(), two.opt.m[name].numpy(), atol=1e-8, rtol=1e-4, err_msg=name)


def test_adamw_decays_matrices_only():
    params = {n: tf.Variable(np.full(s, 2.0, np.float32)) for n, s in weights.openai_shapes(HP).items()}
    opt = AdamW(params, Schedule(0.1, 0, 10, 1.0), beta1=0.9, beta2=0.95, weight_decay=0.5, clip_norm=1.0,
                loss_scaling=False)
    opt.apply([tf.zeros_like(v) for v in params.values()])  # zero gradients: only weight decay can move a variable
    for name, var in params.items():
        expect = 2.0 - 0.1 * 0.5 * 2.0 if len(var.shape) >= 2 else 2.0
        np.testing.assert_allclose(var.numpy(), expect, err_msg=name)
    assert {n for n, v in params.items() if v.numpy().flat[0] != 2.0} >= {"model/wte", "model/h0/mlp/c_fc/w"}


def test_schedule_warms_up_then_decays_to_the_floor():
    s = Schedule(1.0, 10, 110, 0.1)
    assert float(s(0)) == pytest.approx(0.1) and float(s(9)) == pytest.approx(1.0)
    assert float(s(10)) == pytest.approx(1.0) and float(s(60)) == pytest.approx(0.55)
    assert float(s(110)) == pytest.approx(0.1) and float(s(500)) == pytest.approx(0.1)


def test_loss_scaling_skips_overflowed_steps_and_halves_the_scale():
    params = {"model/wte": tf.Variable(np.ones((3, 2), np.float32))}
    opt = AdamW(params, Schedule(0.1, 0, 10, 1.0), beta1=0.9, beta2=0.95, weight_decay=0.0, clip_norm=1.0,
                loss_scaling=True, growth_interval=2)
    opt.apply([tf.constant(np.full((3, 2), np.inf, np.float32))])
    np.testing.assert_array_equal(params["model/wte"].numpy(), 1.0)  # skipped
    assert float(opt.loss_scale.numpy()) == 2.0 ** 14 and int(opt.skipped.numpy()) == 1 and int(opt.step.numpy()) == 1
    for _ in range(2):
        opt.apply([tf.ones((3, 2)) * opt.loss_scale])
    assert float(opt.loss_scale.numpy()) == 2.0 ** 15  # grown back after `growth_interval` good steps
    assert (params["model/wte"].numpy() < 1.0).all()
