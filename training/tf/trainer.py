"""The TensorFlow backend: a GPT-2 + AdamW under a tf.distribute strategy, checkpoints in gpt-2-simple's layout.

The run itself (folder, resume state and commit, fingerprint, retention, evaluation / early stopping, samples, dvclive,
report) is `training.run`, shared with the PyTorch backend. A checkpoint `model-<step>` here is a name-based TF checkpoint
holding the model weights (OpenAI names) plus every piece of optimizer state (`textmill/...` names), and TF's
`checkpoint` state file names the latest one, so gpt-2-simple and the converter read the run folder as is.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import tensorflow as tf

from textmill.config import Config, TrainingConfig
from textmill.errors import UserError
from textmill.sizes import Hparams
from textmill.training import data, openai_layout, run
from textmill.training.run import (OBSERVATIONAL, SAMPLE_HEADER, SAMPLES_FILE, STATE_FILE, RunPaths, RunState,  # noqa: F401
                          copy_run_files, fingerprint, open_run, truncate_after)
from textmill.training.tf import checkpoint
from textmill.training.tf.model import GPT2
from textmill.training.tf.optim import AdamW, Schedule

log = logging.getLogger(__name__)

PRECISION_DTYPE = {"float32": "float32", "mixed_float16": "float16", "bfloat16": "bfloat16"}


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """`none`: one device; `mirrored`: every GPU (or every logical CPU without GPUs); `auto`: mirrored iff >1 GPU."""
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "none" or (kind == "auto" and len(gpus) <= 1):
        return tf.distribute.get_strategy()
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=None if gpus else tf.distribute.ReductionToOneDevice())


class Trainer:
    """The TF backend of `training.run`: one model + optimizer under a distribution strategy, with compiled train / eval
    / logits functions."""

    name = "tf"
    is_writer = True

    def __init__(self, hp: Hparams, tc: TrainingConfig, n_ctx: int, strategy: tf.distribute.Strategy):
        self.hp, self.tc, self.n_ctx, self.strategy = hp, tc, n_ctx, strategy
        self.replicas = strategy.num_replicas_in_sync
        with strategy.scope():
            self.model = GPT2(hp, grad_checkpointing=tc.grad_checkpointing, init=False,
                              compute_dtype=PRECISION_DTYPE[tc.precision])
            schedule = Schedule(tc.learning_rate, tc.warmup_steps, tc.steps, tc.min_lr_ratio)
            self.opt = AdamW(self.model.variables_by_name, schedule, beta1=tc.beta1, beta2=tc.beta2,
                             weight_decay=tc.weight_decay, clip_norm=tc.grad_clip,
                             loss_scaling=tc.precision == "mixed_float16")
        self._step_fn = tf.function(lambda x, y: strategy.run(self._replica_step, args=(x, y)))
        self._eval_fn = tf.function(self._token_losses)
        self._logits_fn = tf.function(self.model)

    @property
    def tokens_per_step(self) -> int:
        return self.tc.grad_accum * self.tc.batch_size * self.replicas * self.n_ctx

    def all_variables(self) -> dict[str, tf.Variable]:
        return {**self.model.variables_by_name, **self.opt.state()}

    def _micro_grads(self, x: tf.Tensor, y: tf.Tensor) -> tuple[tf.Tensor, list[tf.Tensor]]:
        with tf.GradientTape() as tape:
            loss = self.model.loss(x, y)
            scaled = loss * self.opt.loss_scale  # 1.0 unless float16: keeps small gradients from flushing to zero
        grads = tape.gradient(scaled, self.model.ordered)
        return loss, [tf.convert_to_tensor(g) for g in grads]  # wpe's gather gives IndexedSlices

    def _replica_step(self, x: tf.Tensor, y: tf.Tensor) -> dict[str, tf.Tensor]:
        """x, y [accum, b, T] on this replica: sum micro-batch grads, all-reduce, average, one optimizer update."""
        accum = self.tc.grad_accum

        def body(i, loss_sum, acc):
            loss, grads = self._micro_grads(x[i], y[i])
            return i + 1, loss_sum + loss, [a + g for a, g in zip(acc, grads)]

        acc0 = [tf.zeros(v.shape, tf.float32) for v in self.model.ordered]
        # parallel_iterations=1: micro-batches run one after another, so only one micro-batch's activations are alive.
        _, loss_sum, acc = tf.while_loop(lambda i, *_: i < accum, body, (tf.constant(0), tf.constant(0.0), acc0),
                                         parallel_iterations=1)
        ctx = tf.distribute.get_replica_context()
        n = float(accum * ctx.num_replicas_in_sync)  # equal-sized micro-batches: mean of means == mean over all tokens
        grads = [g / n for g in ctx.all_reduce(tf.distribute.ReduceOp.SUM, acc)]
        loss = ctx.all_reduce(tf.distribute.ReduceOp.SUM, loss_sum) / n
        info = self.opt.apply(grads)
        return {"loss": loss, "lr": info["lr"], "grad_norm": info["grad_norm"], "loss_scale": self.opt.loss_scale + 0.0}

    def train_step(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """One optimizer step on the global batch x, y [accum, batch_size * replicas, T]."""
        if self.replicas > 1:
            b = self.tc.batch_size
            split = lambda a: self.strategy.experimental_distribute_values_from_function(  # noqa: E731
                lambda ctx: tf.constant(a[:, ctx.replica_id_in_sync_group * b:(ctx.replica_id_in_sync_group + 1) * b]))
            x, y = split(x), split(y)
        out = self._step_fn(x, y)
        return {k: float(self.strategy.experimental_local_results(v)[0]) for k, v in out.items()}

    def _token_losses(self, x: tf.Tensor, y: tf.Tensor) -> tf.Tensor:
        with self.model.computing_in("float32"):
            return tf.nn.sparse_softmax_cross_entropy_with_logits(labels=y, logits=self.model(x))

    def val_loss(self, tokens: np.ndarray) -> float:
        """THE validation protocol (training.data): mean token cross-entropy over the whole val split."""
        batches = data.eval_batches(tokens, self.n_ctx, self.tc.batch_size)
        return data.mean_loss((self._eval_fn(x, y).numpy(), w) for x, y, w in batches)

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        """float64 [V] logits after `ids`; a fixed-shape window (zero-padded on the right, which a causal model cannot
        see) so the compiled function is traced once."""
        window = min(self.n_ctx, self.tc.sample_length + 1)
        ctx = ids[-window:]
        x = np.zeros((1, window), np.int32)
        x[0, :len(ctx)] = ctx
        return self._logits_fn(x)[0, len(ctx) - 1].numpy().astype(np.float64)

    def sample(self, rng: np.random.Generator, start: int, length: int, top_k: int = 40) -> list[int]:
        """Top-k sampling from `start` (EOT), `length` tokens."""
        ids = [start]
        for _ in range(length):
            ids.append(run.top_k_sample(self.next_token_logits(ids), rng, top_k))
        return ids[1:]

    def batch(self, tokens: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The global batch for `step`: [grad_accum, batch_size * replicas, n_ctx], a pure function of (seed, step);
        replica r trains on rows [r*b, (r+1)*b) (training.data)."""
        b = self.tc.batch_size * self.replicas
        pairs = [data.train_batch(tokens, step=step, micro=m, batch_size=b, n_ctx=self.n_ctx, seed=self.tc.seed)
                 for m in range(self.tc.grad_accum)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def restore_base(self, base: Path) -> None:
        """The model weights of the base folder's latest checkpoint (OpenAI layout only)."""
        if run.base_layout(base) == "hf":
            raise UserError(f"{base}: a Hugging Face base (config.json + safetensors); the TensorFlow backend reads "
                            f"OpenAI-layout checkpoints only: train it with --set training.backend=pt, or fetch an "
                            f"OpenAI-layout base (base.init=fetch, base.uri=<folder with model.ckpt.*>)")
        self.load(openai_layout.resolve_prefix(base), with_optimizer=False)

    def restore(self, run_dir: Path, name: str) -> int:  # type: ignore[override]
        self.load(run_dir / name, with_optimizer=True)
        return int(self.opt.step.numpy())

    def load(self, prefix: Path, *, with_optimizer: bool) -> None:
        """Assign the model (and optimizer) variables from a name-based checkpoint."""
        names = list(self.all_variables() if with_optimizer else self.model.variables_by_name)
        values = checkpoint.read(prefix, names=names)
        self.model.assign(values)
        if with_optimizer:
            for name, var in self.opt.state().items():
                var.assign(values[name])

    def save(self, run_dir: Path, name: str) -> None:
        variables = self.all_variables()
        if self.replicas > 1:  # the Saver wants plain variables; mirrored ones are read once from the first replica
            variables = {k: v.numpy() for k, v in variables.items()}
        checkpoint.save(variables, run_dir / name)

    def after_commit(self, run_dir: Path, name: str, kept: list[str]) -> None:
        """TF's `checkpoint` state file, for gpt-2-simple and tf.train.latest_checkpoint."""
        openai_layout.write_state(run_dir, name, kept)

    def peak_memory_bytes(self) -> int | None:
        return peak_memory_bytes()

    def barrier(self) -> None:
        pass  # one process (MirroredStrategy keeps its replicas in it)


def peak_memory_bytes() -> int | None:
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return None
    return int(max(tf.config.experimental.get_memory_info(d.name)["peak"] for d in gpus))


class Session(run.Session):
    """A run of the TensorFlow backend (`training.run.Session` with a `Trainer`)."""

    def __init__(self, cfg: Config, name: str, *, restart: bool = False, restart_if_stale: bool = False,
                 progress: bool = True):
        strategy = make_strategy(cfg.training.distribute)
        super().__init__(cfg, name, lambda hp, n_ctx, _paths: Trainer(hp, cfg.training, n_ctx, strategy),
                         restart=restart, restart_if_stale=restart_if_stale, progress=progress)


def train(cfg: Config, name: str, *, restart: bool = False, restart_if_stale: bool = False,
          progress: bool = True) -> dict:
    """Train model `name` (cfg.models[name]) from its base checkpoint on its token dataset; returns the report."""
    cfg.model_spec(name)
    return Session(cfg, name, restart=restart, restart_if_stale=restart_if_stale, progress=progress).run()
