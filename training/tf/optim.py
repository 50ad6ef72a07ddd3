"""AdamW with warmup + cosine schedule, global-norm clipping and dynamic loss scaling, as named variables for checkpoints.

Written out rather than taken from Keras because the resume contract needs every piece of optimizer state as a plain,
named variable in the OpenAI-layout checkpoint (`textmill/opt/m/<var>`, `textmill/opt/v/<var>`, `textmill/step`,
`textmill/loss_scale`, ...), and Keras 3 optimizers and `LossScaleOptimizer` track their state by object graph instead.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import tensorflow as tf

STEP = "textmill/step"
LOSS_SCALE = "textmill/loss_scale"
GOOD_STEPS = "textmill/loss_scale_good_steps"
SKIPPED = "textmill/skipped_steps"


@dataclass(frozen=True)
class Schedule:
    """Linear warmup from 0 to `lr` over `warmup` steps, then cosine decay to `lr * min_ratio` at `total` steps."""

    lr: float
    warmup: int
    total: int
    min_ratio: float

    def __call__(self, step: tf.Tensor) -> tf.Tensor:
        """Learning rate for the update that takes the model from `step` to `step + 1` (step counts from 0)."""
        s = tf.cast(step, tf.float32)
        warm = self.lr * (s + 1.0) / float(max(self.warmup, 1))
        span = float(max(self.total - self.warmup, 1))
        progress = tf.clip_by_value((s - self.warmup) / span, 0.0, 1.0)
        cosine = self.lr * (self.min_ratio + (1.0 - self.min_ratio) * 0.5 * (1.0 + tf.cos(math.pi * progress)))
        return tf.where(s < self.warmup, warm, cosine)


def _state_var(value, dtype, name: str) -> tf.Variable:
    return tf.Variable(tf.constant(value, dtype), trainable=False, name=name.replace("/", "."),
                       aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)


class AdamW:
    """Decoupled weight decay (Loshchilov & Hutter) on matrices only: LayerNorm gains and biases are never decayed."""

    def __init__(self, params: dict[str, tf.Variable], schedule: Schedule, *, beta1: float, beta2: float,
                 weight_decay: float, clip_norm: float, loss_scaling: bool, eps: float = 1e-8,
                 initial_scale: float = 2.0 ** 15, growth_interval: int = 2000):
        self.params, self.schedule = params, schedule
        self.beta1, self.beta2, self.eps = beta1, beta2, eps
        self.weight_decay, self.clip_norm = weight_decay, clip_norm
        self.loss_scaling, self.growth_interval = loss_scaling, growth_interval
        self.m = {n: self._slot(v, f"textmill/opt/m/{n}") for n, v in params.items()}
        self.v = {n: self._slot(v, f"textmill/opt/v/{n}") for n, v in params.items()}
        self.step = _state_var(0, tf.int64, STEP)
        self.loss_scale = _state_var(initial_scale if loss_scaling else 1.0, tf.float32, LOSS_SCALE)
        self.good_steps = _state_var(0, tf.int64, GOOD_STEPS)
        self.skipped = _state_var(0, tf.int64, SKIPPED)

    @staticmethod
    def _slot(var: tf.Variable, name: str) -> tf.Variable:
        return tf.Variable(tf.zeros_like(var), trainable=False, name=name.replace("/", "."),
                           aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)

    def state(self) -> dict[str, tf.Variable]:
        """Every optimizer variable by its checkpoint name (none starts with `model/`)."""
        out = {f"textmill/opt/m/{n}": v for n, v in self.m.items()}
        out.update({f"textmill/opt/v/{n}": v for n, v in self.v.items()})
        out.update({STEP: self.step, LOSS_SCALE: self.loss_scale, GOOD_STEPS: self.good_steps, SKIPPED: self.skipped})
        return out

    @staticmethod
    def decays(name: str, var: tf.Variable) -> bool:
        return len(var.shape) >= 2  # wte, wpe and the conv kernels; not ln_*/g, ln_*/b or */b

    def apply(self, grads: list[tf.Tensor]) -> dict[str, tf.Tensor]:
        """One update from already-averaged, still loss-scaled gradients (in `params` order); returns lr and grad norm."""
        grads = [tf.convert_to_tensor(g) / self.loss_scale for g in grads]
        norm = tf.linalg.global_norm(grads)
        finite = tf.math.is_finite(norm)
        lr = self.schedule(self.step)
        if self.loss_scaling:
            # Overflowed float16 gradients: skip this update, halve the scale; grow it after a run of good steps.
            self._update_scale(finite)
        # A non-finite gradient (fp16 overflow, or a bad batch in any precision) skips the update instead of writing NaN
        # weights. Selected with tf.where, not tf.cond: under MirroredStrategy an assign inside control flow is a
        # cross-replica sync point TF refuses.
        self._update(grads, norm, lr, finite)
        self.skipped.assign_add(tf.cast(tf.logical_not(finite), tf.int64))
        # The step always advances (it is the data position and the schedule's clock), even when an update was skipped.
        self.step.assign_add(1)
        return {"lr": lr, "grad_norm": norm}

    def _update(self, grads: list[tf.Tensor], norm: tf.Tensor, lr: tf.Tensor, finite: tf.Tensor) -> None:
        if self.clip_norm > 0:
            grads, _ = tf.clip_by_global_norm(grads, self.clip_norm, use_norm=tf.where(finite, norm, 1.0))
        t = tf.cast(self.step - self.skipped + 1, tf.float32)  # updates actually applied, for Adam's bias correction
        c1, c2 = 1.0 - tf.pow(self.beta1, t), 1.0 - tf.pow(self.beta2, t)
        for (name, var), g in zip(self.params.items(), grads):
            m, v = self.m[name], self.v[name]
            g = tf.where(finite, g, tf.zeros_like(g))  # keep inf/NaN out of the arithmetic below
            new_m = self.beta1 * m + (1.0 - self.beta1) * g
            new_v = self.beta2 * v + (1.0 - self.beta2) * tf.square(g)
            update = (new_m / c1) / (tf.sqrt(new_v / c2) + self.eps)
            if self.weight_decay and self.decays(name, var):
                update += self.weight_decay * var
            m.assign(tf.where(finite, new_m, m))
            v.assign(tf.where(finite, new_v, v))
            var.assign_sub(tf.where(finite, lr * update, tf.zeros_like(update)))

    def _update_scale(self, finite: tf.Tensor) -> None:
        grow = tf.logical_and(finite, self.good_steps + 1 >= self.growth_interval)
        new_scale = tf.where(finite, tf.where(grow, self.loss_scale * 2.0, self.loss_scale),
                             tf.maximum(self.loss_scale / 2.0, 1.0))
        self.good_steps.assign(tf.where(tf.logical_and(finite, tf.logical_not(grow)), self.good_steps + 1, 0))
        self.loss_scale.assign(new_scale)
