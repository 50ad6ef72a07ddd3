"""The TensorFlow trainer: base checkpoint + token dataset -> a resumable gpt-2-simple-layout run folder, reports and logs.

Resume contract: a checkpoint `model-<step>` holds the model weights (OpenAI names) plus every piece of optimizer state
(`textmill/...` names); `textmill_state.json`, written after the checkpoint files are in place, is the commit point and
holds the rest (step = data position, since batches are a pure function of (seed, step, micro); the sampling RNG; the
validation history). A run killed at any moment resumes from the last committed step and continues exactly as an
uninterrupted run would have.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import tensorflow as tf

from textmill import storage
from textmill import tokenizer as tokenizer_io
from textmill.config import Config, TrainingConfig, to_dict
from textmill.errors import UserError
from textmill.sizes import Hparams
from training import data
from training.tf import checkpoint
from training.tf.model import GPT2, read_hparams
from training.tf.optim import AdamW, Schedule

log = logging.getLogger(__name__)

STATE_FILE = "textmill_state.json"
SAMPLES_FILE = "samples.txt"
# Settings that change what is observed or kept, not the optimisation trajectory: changing them keeps a run resumable.
OBSERVATIONAL = {"log_interval", "sample_interval", "sample_length", "checkpoint_interval", "max_to_keep",
                 "eval_interval", "early_stopping_patience", "distribute"}
PRECISION_DTYPE = {"float32": "float32", "mixed_float16": "float16", "bfloat16": "bfloat16"}


@dataclass(frozen=True)
class RunPaths:
    tokens: Path
    base: Path
    run: Path
    live: Path
    report: Path

    @classmethod
    def of(cls, cfg: Config, name: str) -> "RunPaths":
        p, reports = cfg.paths, Path(cfg.paths.reports) / "train"
        return cls(Path(p.tokens) / name, Path(p.base) / name, Path(p.runs) / name, reports / name, reports / f"{name}.json")


def make_strategy(kind: str) -> tf.distribute.Strategy:
    """`none`: one device; `mirrored`: every GPU (or every logical CPU without GPUs); `auto`: mirrored iff >1 GPU."""
    gpus = tf.config.list_logical_devices("GPU")
    if kind == "none" or (kind == "auto" and len(gpus) <= 1):
        return tf.distribute.get_strategy()
    devices = [d.name for d in (gpus or tf.config.list_logical_devices("CPU"))]
    return tf.distribute.MirroredStrategy(devices, cross_device_ops=None if gpus else tf.distribute.ReductionToOneDevice())


def fingerprint(hp: Hparams, tc: TrainingConfig, n_ctx: int, replicas: int, meta_path: Path, base_index: Path) -> str:
    """What makes two runs the same trajectory: model shape, training settings, the data (by meta.json's checksum) and
    the starting weights (by the base checkpoint's .index, which holds every tensor's CRC32C)."""
    training = {k: v for k, v in to_dict(Config(training=tc))["training"].items() if k not in OBSERVATIONAL}
    blob = json.dumps({"hparams": hp.to_json(), "training": training, "n_ctx": n_ctx, "replicas": replicas,
                       "tokens_meta_sha256": storage.sha256_file(meta_path),
                       "base_index_sha256": storage.sha256_file(base_index)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class Trainer:
    """One model + optimizer under a distribution strategy, with compiled train / eval / sample functions."""

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

    def sample(self, rng: np.random.Generator, start: int, length: int, top_k: int = 40) -> list[int]:
        """Top-k sampling from `start` (EOT); fixed-shape windows so the compiled function is traced once."""
        window = min(self.n_ctx, length + 1)
        ids = [start]
        for _ in range(length):
            ctx = ids[-window:]
            x = np.zeros((1, window), np.int32)
            x[0, :len(ctx)] = ctx
            logits = self._logits_fn(x)[0, len(ctx) - 1].numpy().astype(np.float64)
            top = np.argpartition(-logits, min(top_k, len(logits) - 1))[:top_k]
            p = np.exp(logits[top] - logits[top].max())
            ids.append(int(top[rng.choice(len(top), p=p / p.sum())]))
        return ids[1:]

    def restore(self, prefix: Path, *, with_optimizer: bool) -> None:
        names = list(self.all_variables() if with_optimizer else self.model.variables_by_name)
        values = checkpoint.read(prefix, names=names)
        self.model.assign(values)
        if with_optimizer:
            for name, var in self.opt.state().items():
                var.assign(values[name])

    def save(self, prefix: Path) -> None:
        variables = self.all_variables()
        if self.replicas > 1:  # the Saver wants plain variables; mirrored ones are read once from the first replica
            variables = {k: v.numpy() for k, v in variables.items()}
        checkpoint.save(variables, prefix)


def peak_memory_bytes() -> int | None:
    gpus = tf.config.list_logical_devices("GPU")
    if not gpus:
        return None
    return int(max(tf.config.experimental.get_memory_info(d.name)["peak"] for d in gpus))


def copy_run_files(paths: RunPaths, hp: Hparams) -> None:
    """hparams.json + tokenizer files, as gpt-2-simple's run folder has them."""
    paths.run.mkdir(parents=True, exist_ok=True)
    storage.write_json_atomic(paths.run / "hparams.json", hp.to_json())
    for name in tokenizer_io.OPENAI_FILES:
        src = paths.base / name
        if not src.is_file():
            raise UserError(f"{src}: missing; the base folder needs the tokenizer files (rerun `textmill base`)")
        with storage.atomic_path(paths.run / name) as tmp:
            shutil.copyfile(src, tmp)


class RunState:
    """textmill_state.json: the commit point of a checkpoint, plus validation history and best tracking."""

    def __init__(self, fp: str, seed: int):
        self.d: dict = {"fingerprint": fp, "step": 0, "checkpoint": None, "best_step": None, "best_val_loss": None,
                        "val_loss_by_step": {}, "initial_val_loss": None, "evals_since_best": 0, "kept": [],
                        "stopped_early": False, "train_loss": None,
                        "rng": np.random.default_rng(seed).bit_generator.state}

    @classmethod
    def read(cls, path: Path) -> dict | None:
        return storage.read_json(path, default=None, fix="corrupt run state: delete the run folder or pass --restart")

    def record_val(self, step: int, loss: float) -> bool:
        """Store a validation loss; True when it is a new best."""
        self.d["val_loss_by_step"][str(step)] = loss
        best = self.d["best_val_loss"]
        if best is None or loss < best:
            self.d.update(best_step=step, best_val_loss=loss, evals_since_best=0)
            return True
        self.d["evals_since_best"] += 1
        return False


def open_run(paths: RunPaths, fp: str, seed: int, restart: bool,
             restart_if_stale: bool = False) -> tuple[RunState, bool]:
    """(state, resuming). Refuses to mix a run folder with different settings unless `restart`.

    `restart_if_stale` is for `dvc repro`: the run folder is `persist: true` so a killed run resumes, but when DVC reruns the
    stage because data or settings changed, the old run is stale and training starts over from the base checkpoint.
    """
    state_path = paths.run / STATE_FILE
    old = RunState.read(state_path)
    if restart_if_stale and old is not None and old.get("fingerprint") != fp:
        log.warning("%s: settings, data or model changed since this run started; starting over", paths.run)
        restart = True
    if restart and paths.run.exists():
        shutil.rmtree(paths.run)
        old = None
    state = RunState(fp, seed)
    if old is None:
        return state, False
    if old.get("fingerprint") != fp:
        raise UserError(f"{state_path}: this run folder was trained with other settings, data or model (fingerprint "
                        f"{old.get('fingerprint')} != {fp}); delete {paths.run} or pass --restart to start over")
    state.d.update(old)
    return state, True


class Session:
    """One `textmill train` invocation: the loop, its checkpoints, samples, logs and report."""

    def __init__(self, cfg: Config, name: str, *, restart: bool = False, restart_if_stale: bool = False,
                 progress: bool = True):
        self.tc, self.paths, self.progress = cfg.training, RunPaths.of(cfg, name), progress
        self.meta = data.load_meta(self.paths.tokens)
        self.train_tokens = data.open_tokens(self.paths.tokens, "train")
        self.val_tokens = data.open_tokens(self.paths.tokens, "val")
        self.hp = read_hparams(self.paths.base)
        self.n_ctx = self._check_shapes()
        self.strategy = make_strategy(self.tc.distribute)
        replicas = self.strategy.num_replicas_in_sync
        base_index = Path(f"{checkpoint.resolve_prefix(self.paths.base)}.index")
        fp = fingerprint(self.hp, self.tc, self.n_ctx, replicas, self.paths.tokens / data.META_FILE, base_index)
        self.state, self.resuming = open_run(self.paths, fp, self.tc.seed, restart, restart_if_stale)
        self.trainer = Trainer(self.hp, self.tc, self.n_ctx, self.strategy)
        if self.resuming:
            self.trainer.restore(self.paths.run / self.state.d["checkpoint"], with_optimizer=True)
            restored = int(self.trainer.opt.step.numpy())
            if restored != self.state.d["step"]:
                raise UserError(f"{self.paths.run / STATE_FILE}: says step {self.state.d['step']} but its checkpoint "
                                f"holds step {restored}; delete the run folder or pass --restart")
        else:
            self.trainer.restore(checkpoint.resolve_prefix(self.paths.base), with_optimizer=False)
            copy_run_files(self.paths, self.hp)
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = self.state.d["rng"]
        self.tokenizer = tokenizer_io.load(self.paths.run)
        self.eot = int(self.meta.get("eot_id", tokenizer_io.eot_id(self.tokenizer)))

    def _check_shapes(self) -> int:
        n_ctx = int(self.tc.n_ctx or self.hp.n_ctx)
        if n_ctx > self.hp.n_ctx:
            raise UserError(f"config key training.n_ctx={n_ctx} exceeds the model's n_ctx={self.hp.n_ctx} "
                            f"({self.paths.base / 'hparams.json'}); lower training.n_ctx")
        vocab = int(self.meta.get("vocab_size", 0))
        if vocab > self.hp.n_vocab:
            raise UserError(f"{self.paths.tokens / data.META_FILE}: vocab_size {vocab} > model n_vocab {self.hp.n_vocab}; "
                            f"the tokens were made with another tokenizer, rerun `textmill prepare`")
        for key in ("batch_size", "grad_accum", "steps"):
            if getattr(self.tc, key) < 1:
                raise UserError(f"config key training.{key}={getattr(self.tc, key)} must be >= 1")
        return n_ctx

    # ---- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to `training.steps` (or early stop), checkpointing as configured; returns the report it writes."""
        from tqdm import tqdm

        live = self._open_live()
        st, tc = self.state.d, self.tc
        if not self.resuming:
            st["initial_val_loss"] = self.trainer.val_loss(self.val_tokens)
            live.step = 0
            live.log_metric("val_loss", st["initial_val_loss"])
        step, timed, seconds = st["step"], 0, 0.0
        first = step  # the session's first step traces and compiles (st["step"] moves on at every checkpoint)
        done = st["stopped_early"] or step >= tc.steps
        bar = tqdm(total=tc.steps, initial=step, disable=not self.progress, unit="step", desc=f"train {self.paths.run.name}")
        while not done:
            x, y = self.batch(step)
            t0 = time.perf_counter()
            out = self.trainer.train_step(x, y)
            dt = time.perf_counter() - t0
            if step > first:  # leave the compiling step out of the throughput
                timed, seconds = timed + 1, seconds + dt
            step += 1
            st["train_loss"] = out["loss"]
            live.step = step
            for key, value in (("train_loss", out["loss"]), ("lr", out["lr"]),
                               ("tokens_per_s", self.trainer.tokens_per_step / dt)):
                live.log_metric(key, value)
            done = self._after_step(step, live)
            bar.update(1)
            bar.set_postfix(loss=f"{out['loss']:.4f}", tok_s=f"{self.trainer.tokens_per_step / dt:,.0f}")
        bar.close()
        live.make_summary()
        tokens_per_s = self.trainer.tokens_per_step * timed / seconds if seconds else st.get("tokens_per_s")
        st["tokens_per_s"] = tokens_per_s
        return self._write_report(step, tokens_per_s)

    def batch(self, step: int) -> tuple[np.ndarray, np.ndarray]:
        """The global batch for `step`: [grad_accum, batch_size * replicas, n_ctx], a pure function of (seed, step)."""
        b = self.tc.batch_size * self.trainer.replicas
        pairs = [data.train_batch(self.train_tokens, step=step, micro=m, batch_size=b, n_ctx=self.n_ctx,
                                  seed=self.tc.seed) for m in range(self.tc.grad_accum)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def _after_step(self, step: int, live) -> bool:
        """Evaluate / sample / checkpoint as due after `step`; True when training is over."""
        tc, st = self.tc, self.state.d
        final, new_best = step >= tc.steps, False
        if step % tc.eval_interval == 0 or final:
            val = self.trainer.val_loss(self.val_tokens)
            live.log_metric("val_loss", val)
            new_best = self.state.record_val(step, val)
            if tc.early_stopping_patience and st["evals_since_best"] >= tc.early_stopping_patience:
                log.info("early stopping at step %d: no improvement in %d evaluations (best %.4f at step %d)", step,
                         st["evals_since_best"], st["best_val_loss"], st["best_step"])
                final = st["stopped_early"] = True
        if tc.sample_interval and step % tc.sample_interval == 0:
            self._write_sample(step)
        if final or new_best or step % tc.checkpoint_interval == 0:
            self._checkpoint(step)
        return final

    def _checkpoint(self, step: int) -> None:
        """Save model-<step>, then commit it in the state file, then point `checkpoint`/`counter` at it, then prune."""
        st, name = self.state.d, f"model-{step}"
        self.trainer.save(self.paths.run / name)
        best = f"model-{st['best_step']}" if st["best_step"] is not None else None
        older = [n for n in st["kept"] if n != name and n != best]
        recent = older[len(older) - (self.tc.max_to_keep - 1):]  # max_to_keep >= 1 (config.validate)
        kept = sorted({*recent, name, *([best] if best else [])}, key=lambda n: int(n.split("-")[1]))
        old = set(st["kept"]) - set(kept)
        st.update(step=step, checkpoint=name, kept=kept, rng=self.rng.bit_generator.state)
        storage.write_json_atomic(self.paths.run / STATE_FILE, st)  # the commit point
        checkpoint.write_checkpoint_file(self.paths.run, name, kept)
        storage.write_text_atomic(self.paths.run / "counter", f"{step}\n")
        for stale in old:  # never the best one: it is always in `kept`
            for f in self.paths.run.glob(f"{stale}.*"):
                f.unlink()

    def _write_sample(self, step: int) -> None:
        ids = self.trainer.sample(self.rng, self.eot, self.tc.sample_length)
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        path = self.paths.run / SAMPLES_FILE
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        storage.write_text_atomic(path, f"{old}{SAMPLE_HEADER.format(step=step)}\n{text}\n\n")

    def _open_live(self):
        from dvclive import Live

        if self.resuming:
            # Rows logged after the last checkpoint by a killed session are replaced by the resumed session's own.
            truncate_after(self.paths.live, self.paths.run / SAMPLES_FILE, self.state.d["step"])
        return Live(dir=str(self.paths.live), resume=self.resuming, save_dvc_exp=False, dvcyaml=None, report=None)

    def _write_report(self, step: int, tokens_per_s: float | None) -> dict:
        st = self.state.d
        report = {
            "final_step": step, "train_loss": st["train_loss"], "val_loss": st["val_loss_by_step"].get(str(step)),
            "initial_val_loss": st["initial_val_loss"], "best_step": st["best_step"], "best_val_loss": st["best_val_loss"],
            "val_loss_by_step": st["val_loss_by_step"], "tokens_seen": step * self.trainer.tokens_per_step,
            "tokens_per_s": tokens_per_s, "peak_memory_bytes": peak_memory_bytes(), "stopped_early": st["stopped_early"],
            "precision": self.tc.precision, "grad_checkpointing": self.tc.grad_checkpointing,
            "replicas": self.trainer.replicas, "n_ctx": self.n_ctx, "fingerprint": st["fingerprint"],
        }
        storage.write_json_atomic(self.paths.report, report)
        return report


SAMPLE_HEADER = "======== step {step} ========"


def truncate_after(live_dir: Path, samples: Path, step: int) -> None:
    """Drop dvclive metric rows and samples.txt sections later than `step` (left by a session killed after it)."""
    for tsv in (live_dir / "plots" / "metrics").glob("**/*.tsv"):
        lines = tsv.read_text(encoding="utf-8").splitlines()
        if not lines:
            continue
        col = lines[0].split("\t").index("step")
        keep = [lines[0]] + [ln for ln in lines[1:] if int(ln.split("\t")[col]) <= step]
        storage.write_text_atomic(tsv, "\n".join(keep) + "\n")
    if samples.is_file():
        sections = samples.read_text(encoding="utf-8").split("======== step ")
        kept = [s for s in sections[1:] if int(s.split(" ", 1)[0]) <= step]
        storage.write_text_atomic(samples, "".join("======== step " + s for s in kept))


def train(cfg: Config, name: str, *, restart: bool = False, restart_if_stale: bool = False,
          progress: bool = True) -> dict:
    """Train model `name` (cfg.models[name]) from its base checkpoint on its token dataset; returns the report."""
    cfg.model_spec(name)
    return Session(cfg, name, restart=restart, restart_if_stale=restart_if_stale, progress=progress).run()
