"""GPT-2 in TensorFlow 2 with OpenAI's variable names and math (openai/gpt-2 `src/model.py`), for training and verification.

Variables are float32 and named exactly as in OpenAI's releases (`model/h0/attn/c_attn/w` with shape [1, nx, 3nx]), so a
release, a gpt-2-simple run and a textmill run all load with `assign()`. With `compute_dtype="float16"` (mixed precision)
matmuls run in float16 while LayerNorm statistics, attention softmax and the output logits stay in float32: float16 cannot
hold the -1e10 mask, and a softmax over 50k logits in float16 loses the small probabilities the loss is made of.
"""

from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
import tensorflow as tf

from textmill import weights
from textmill.errors import UserError
from textmill.training import openai_layout
from textmill.sizes import Hparams

COMPUTE_DTYPES = ("float32", "float16", "bfloat16")


def gelu(x: tf.Tensor) -> tf.Tensor:
    """OpenAI's tanh approximation (what `gelu_new` means in transformers)."""
    return 0.5 * x * (1.0 + tf.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * tf.pow(x, 3))))


def layer_norm(x: tf.Tensor, g: tf.Variable, b: tf.Variable, eps: float = 1e-5) -> tf.Tensor:
    """OpenAI's `norm`: (x-u) * rsqrt(s+eps) * g + b, computed in float32 whatever the compute dtype."""
    dtype = x.dtype
    x = tf.cast(x, tf.float32)
    u = tf.reduce_mean(x, axis=-1, keepdims=True)
    s = tf.reduce_mean(tf.square(x - u), axis=-1, keepdims=True)
    x = (x - u) * tf.math.rsqrt(s + eps)
    return tf.cast(x * g + b, dtype)


def softmax(x: tf.Tensor) -> tf.Tensor:
    x = x - tf.reduce_max(x, axis=-1, keepdims=True)
    ex = tf.exp(x)
    return ex / tf.reduce_sum(ex, axis=-1, keepdims=True)


class GPT2(tf.Module):
    """OpenAI GPT-2 (no dropout, as OpenAI and gpt-2-simple fine-tune it). Call with int tokens [B, T] -> float32 logits."""

    def __init__(self, hp: Hparams, *, grad_checkpointing: bool = False, compute_dtype: str = "float32", seed: int = 0,
                 init: bool = True):
        super().__init__(name="gpt2")
        if compute_dtype not in COMPUTE_DTYPES:
            raise ValueError(f"compute_dtype={compute_dtype!r}; choose one of {COMPUTE_DTYPES}")
        self.hp = hp
        self.compute_dtype = tf.as_dtype(compute_dtype)
        self.grad_checkpointing = grad_checkpointing
        shapes = weights.openai_shapes(hp)
        values = weights.init_numpy(hp, seed) if init else ((n, np.zeros(s, np.float32)) for n, s in shapes.items())
        # ONLY_FIRST_REPLICA: under MirroredStrategy every replica computes the same update after the all-reduce, so an
        # assign in replica context takes the first replica's value instead of failing for want of an aggregation.
        self.variables_by_name: dict[str, tf.Variable] = {
            name: tf.Variable(value, name=name.replace("/", "."), trainable=True,
                              aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            for name, value in values
        }
        self.ordered = [self.variables_by_name[n] for n in shapes]  # OpenAI's order, for gradients and optimizers
        # One function per block; recompute_grad differentiates w.r.t. tensor args only, so the layer index is bound here.
        # With checkpointing only each block's input is kept; its activations are recomputed in the backward pass.
        self._blocks = [self._layer_fn(i) for i in range(hp.n_layer)]

    def _layer_fn(self, i: int):
        fn = lambda x: self._block(x, i)  # noqa: E731
        return tf.recompute_grad(fn) if self.grad_checkpointing else fn

    def v(self, name: str) -> tf.Variable:
        return self.variables_by_name[name]

    def assign(self, weights_by_name: Mapping[str, np.ndarray]) -> None:
        """Set every model variable from `weights_by_name` (extra names are ignored); shapes are checked first."""
        missing = [n for n in self.variables_by_name if n not in weights_by_name]
        if missing:
            raise UserError(f"checkpoint lacks model variable(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}; "
                            f"is it a GPT-2 checkpoint of this size (n_layer={self.hp.n_layer})?")
        for name, var in self.variables_by_name.items():
            value = np.asarray(weights_by_name[name])
            if tuple(value.shape) != tuple(var.shape):
                raise UserError(f"variable {name}: checkpoint shape {tuple(value.shape)} != model shape "
                                f"{tuple(var.shape)} for hparams {self.hp.to_json()}; check hparams.json")
        for name, var in self.variables_by_name.items():
            var.assign(np.asarray(weights_by_name[name], np.float32))

    @contextlib.contextmanager
    def computing_in(self, dtype: str) -> Iterator[None]:
        """Trace the code inside with another compute dtype (the variables stay float32): validation runs in float32
        whatever the training precision, so `textmill evaluate` (transformers, float32) reproduces it."""
        saved, self.compute_dtype = self.compute_dtype, tf.as_dtype(dtype)
        try:
            yield
        finally:
            self.compute_dtype = saved

    def _w(self, name: str) -> tf.Tensor:
        return tf.cast(self.variables_by_name[name], self.compute_dtype)

    def _conv1d(self, x: tf.Tensor, scope: str) -> tf.Tensor:
        """OpenAI's conv1d: a matmul with the [nx, nf] slice of the [1, nx, nf] kernel."""
        w = self._w(f"{scope}/w")
        nx, nf = int(w.shape[1]), int(w.shape[2])
        y = tf.matmul(tf.reshape(x, [-1, nx]), tf.reshape(w, [nx, nf])) + self._w(f"{scope}/b")
        return tf.reshape(y, tf.concat([tf.shape(x)[:-1], [nf]], axis=0))

    def _attn(self, x: tf.Tensor, scope: str) -> tf.Tensor:
        h, e = self.hp.n_head, self.hp.n_embd
        b, t = tf.shape(x)[0], tf.shape(x)[1]
        qkv = self._conv1d(x, f"{scope}/c_attn")
        q, k, v = (tf.transpose(tf.reshape(z, [b, t, h, e // h]), [0, 2, 1, 3]) for z in tf.split(qkv, 3, axis=2))
        w = tf.cast(tf.matmul(q, k, transpose_b=True), tf.float32) * (1.0 / math.sqrt(e // h))
        # OpenAI's mask: w*b - 1e10*(1-b), in float32 (float16 cannot represent 1e10).
        mask = tf.cast(tf.range(t)[:, None] >= tf.range(t)[None, :], tf.float32)[None, None]
        w = softmax(w * mask - 1e10 * (1.0 - mask))
        a = tf.matmul(tf.cast(w, self.compute_dtype), v)
        a = tf.reshape(tf.transpose(a, [0, 2, 1, 3]), [b, t, e])
        return self._conv1d(a, f"{scope}/c_proj")

    def _block(self, x: tf.Tensor, layer: int) -> tf.Tensor:
        p = f"model/h{layer}"
        x = x + self._attn(layer_norm(x, self.v(f"{p}/ln_1/g"), self.v(f"{p}/ln_1/b")), f"{p}/attn")
        m = layer_norm(x, self.v(f"{p}/ln_2/g"), self.v(f"{p}/ln_2/b"))
        m = self._conv1d(gelu(self._conv1d(m, f"{p}/mlp/c_fc")), f"{p}/mlp/c_proj")
        return x + m

    def hidden(self, tokens: tf.Tensor) -> tf.Tensor:
        """Final LayerNorm output [B, T, n_embd] in float32."""
        tokens = tf.convert_to_tensor(tokens, tf.int32)
        t = tf.shape(tokens)[1]
        h = tf.gather(self._w("model/wte"), tokens) + tf.gather(self._w("model/wpe"), tf.range(t))[None]
        for block in self._blocks:
            h = block(h)
        return tf.cast(layer_norm(h, self.v("model/ln_f/g"), self.v("model/ln_f/b")), tf.float32)

    def __call__(self, tokens: tf.Tensor, training: bool = False) -> tf.Tensor:
        """Logits float32 [B, T, n_vocab]; tied embeddings: logits = h @ wte^T (in float32)."""
        h = self.hidden(tokens)
        b, t = tf.shape(h)[0], tf.shape(h)[1]
        logits = tf.matmul(tf.reshape(h, [-1, self.hp.n_embd]), self.variables_by_name["model/wte"], transpose_b=True)
        return tf.reshape(logits, [b, t, self.hp.n_vocab])

    def loss(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        """Mean next-token cross-entropy (nats) over every position of the batch."""
        logits = self(x, training=True)
        ce = tf.nn.sparse_softmax_cross_entropy_with_logits(labels=tf.cast(y, tf.int32), logits=logits)
        return tf.reduce_mean(ce)


read_hparams = openai_layout.read_hparams  # the one hparams.json reader (TF-free)


def load(folder_or_prefix: str | Path, hp: Hparams | None = None, **kwargs) -> GPT2:
    """A GPT2 restored from an OpenAI release, a gpt-2-simple run or a textmill run (folder = its latest checkpoint)."""
    from textmill.training.tf import checkpoint

    path = Path(folder_or_prefix)
    prefix = checkpoint.resolve_prefix(path)
    hp = hp or read_hparams(path if path.is_dir() else prefix.parent)
    model = GPT2(hp, init=False, **kwargs)
    model.assign(checkpoint.read(prefix, names=list(model.variables_by_name)))
    return model
