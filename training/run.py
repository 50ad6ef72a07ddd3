"""The framework-free run core shared by every training backend (TensorFlow, PyTorch): numpy only.

It owns the run folder (`models/runs/<model>/`), the resume state and its commit, the fingerprint, checkpoint retention,
the evaluation / early-stopping loop, samples, the dvclive curves and the report. A backend (`Backend` below) supplies
only what needs a framework: one optimizer step, the validation loss, sampling logits, save and restore.

Resume contract: a checkpoint `model-<step>.*` (files named by the backend) holds the model and every piece of optimizer
state; `textmill_state.json`, written after the checkpoint files are in place, is the commit point and holds the rest
(step = data position, since batches are a pure function of (seed, step, micro); the sampling RNG; the validation
history). A run killed at any moment resumes from the last committed step and continues exactly as an uninterrupted run
would have. With several processes (torchrun) every rank runs the same loop and only rank 0 writes.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from textmill import storage
from textmill import tokenizer as tokenizer_io
from textmill.config import Config, TrainingConfig, to_dict
from textmill.errors import UserError
from textmill.sizes import Hparams, from_hf_config
from textmill.training import data, openai_layout

log = logging.getLogger(__name__)

STATE_FILE = "textmill_state.json"
SAMPLES_FILE = "samples.txt"
SAMPLE_HEADER = "======== step {step} ========"
# Settings that change what is observed or kept, not the optimisation trajectory: changing them keeps a run resumable.
OBSERVATIONAL = {"log_interval", "sample_interval", "sample_length", "checkpoint_interval", "max_to_keep",
                 "eval_interval", "early_stopping_patience", "distribute", "compile"}
HF_WEIGHTS = "model.safetensors"
HF_TOKENIZER = {"encoder.json": "vocab.json", "vocab.bpe": "merges.txt"}  # OpenAI file -> same content in HF layout


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


# ---- base folders: OpenAI layout or Hugging Face layout -----------------------------------------------------------


def base_layout(base: Path) -> str:
    """`openai` (hparams.json + a TF checkpoint) or `hf` (config.json + *.safetensors); UserError when neither."""
    if (base / "config.json").is_file() and any(base.glob("*.safetensors")):
        return "hf"
    if (base / openai_layout.HPARAMS_FILE).is_file() or (base / openai_layout.STATE_FILE).is_file():
        return "openai"
    raise UserError(f"{base}: neither an OpenAI-layout base (hparams.json, checkpoint, model.ckpt.*) nor a Hugging Face "
                    f"folder (config.json + model.safetensors); run `textmill base <model>` first")


def base_hparams(base: Path) -> Hparams:
    """The base model's shape from hparams.json (OpenAI) or config.json (Hugging Face)."""
    if base_layout(base) == "openai":
        return openai_layout.read_hparams(base)
    cfg = storage.read_json(base / "config.json", fix="copy the Hugging Face folder again")
    if cfg.get("model_type", "gpt2") != "gpt2":
        raise UserError(f"{base / 'config.json'}: model_type {cfg.get('model_type')!r} is not gpt2; textmill trains GPT-2")
    try:
        return from_hf_config(cfg)
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{base / 'config.json'}: not a GPT-2 config ({e})") from None


def base_weights_file(base: Path) -> Path:
    """The file whose sha256 identifies the starting weights: the TF .index (it holds every tensor's CRC32C) or the
    safetensors file."""
    if base_layout(base) == "hf":
        files = sorted(base.glob("*.safetensors"))
        return base / HF_WEIGHTS if (base / HF_WEIGHTS).is_file() else files[0]
    return Path(f"{openai_layout.resolve_prefix(base)}{openai_layout.INDEX_SUFFIX}")


def copy_run_files(paths: RunPaths, hp: Hparams) -> None:
    """hparams.json + tokenizer files (encoder.json, vocab.bpe), as gpt-2-simple's run folder has them."""
    paths.run.mkdir(parents=True, exist_ok=True)
    storage.write_json_atomic(paths.run / openai_layout.HPARAMS_FILE, hp.to_json())
    for name, hf_name in HF_TOKENIZER.items():
        src = paths.base / name
        if not src.is_file():
            src = paths.base / hf_name
        if not src.is_file():
            raise UserError(f"{paths.base / name}: missing; the base folder needs the tokenizer files (encoder.json + "
                            f"vocab.bpe, or vocab.json + merges.txt; rerun `textmill base`)")
        with storage.atomic_path(paths.run / name) as tmp:
            shutil.copyfile(src, tmp)


def fingerprint(hp: Hparams, tc: TrainingConfig, n_ctx: int, replicas: int, meta_path: Path, base_file: Path) -> str:
    """What makes two runs the same trajectory: model shape, training settings (backend included), the data (by
    meta.json's checksum) and the starting weights (by the base's .index, or its safetensors file)."""
    training = {k: v for k, v in to_dict(Config(training=tc))["training"].items() if k not in OBSERVATIONAL}
    blob = json.dumps({"hparams": hp.to_json(), "training": training, "n_ctx": n_ctx, "replicas": replicas,
                       "tokens_meta_sha256": storage.sha256_file(meta_path),
                       "base_index_sha256": storage.sha256_file(base_file)}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# ---- state -----------------------------------------------------------------------------------------------------------


class RunState:
    """textmill_state.json: the commit point of a checkpoint, plus validation history and best tracking."""

    def __init__(self, fp: str, seed: int, backend: str = "tf"):
        self.d: dict = {"fingerprint": fp, "backend": backend, "step": 0, "checkpoint": None, "best_step": None,
                        "best_val_loss": None, "val_loss_by_step": {}, "initial_val_loss": None, "evals_since_best": 0,
                        "kept": [], "stopped_early": False, "train_loss": None,
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


def open_run(paths: RunPaths, fp: str, seed: int, restart: bool, restart_if_stale: bool = False,
             backend: str = "tf") -> tuple[RunState, bool]:
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
    state = RunState(fp, seed, backend)
    if old is None:
        return state, False
    if old.get("fingerprint") != fp:
        raise UserError(f"{state_path}: this run folder was trained with other settings, data or model (fingerprint "
                        f"{old.get('fingerprint')} != {fp}); delete {paths.run} or pass --restart to start over")
    state.d.update(old)
    return state, True


# ---- the backend interface -----------------------------------------------------------------------------------------


class Backend(Protocol):
    """What a framework provides to the run core. Arrays are numpy; losses are float nats; steps count from 0."""

    name: str              # "tf" | "pt": recorded in the state and the report
    replicas: int          # data-parallel workers sharing one optimizer step
    is_writer: bool        # only the writer (rank 0) touches the run folder, the logs and the report

    @property
    def tokens_per_step(self) -> int: ...

    def batch(self, tokens: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """This worker's (x, y) int32 [grad_accum, b, n_ctx] for `step`, from `data.train_batch` (pure in seed, step)."""

    def train_step(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """One optimizer step; returns at least `loss` (mean over the global batch) and `lr`."""

    def val_loss(self, tokens: np.ndarray) -> float:
        """`data.mean_loss` over `data.eval_batches(tokens, n_ctx, batch_size)`, computed in float32."""

    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        """float64 [n_vocab] logits for the token after `ids` (len(ids) <= n_ctx)."""

    def restore_base(self, base: Path) -> None:
        """Load the starting weights from the base folder (optimizer state stays fresh)."""

    def restore(self, run: Path, name: str) -> int:
        """Load weights and all optimizer state of checkpoint `name` in `run`; returns the step it holds."""

    def save(self, run: Path, name: str) -> None:
        """Write checkpoint `name` into `run` atomically (temp files renamed); its files all match `name.*`."""

    def after_commit(self, run: Path, name: str, kept: list[str]) -> None:
        """Hook after the state file names `name` (the TF backend writes TF's `checkpoint` state file here)."""

    def peak_memory_bytes(self) -> int | None:
        """Peak accelerator memory so far, None on CPU."""

    def barrier(self) -> None:
        """Wait for every worker (no-op for one process)."""


def top_k_sample(logits: np.ndarray, rng: np.random.Generator, top_k: int = 40) -> int:
    """One token id drawn from the softmax over the `top_k` largest logits (float64 [V]); gpt-2-simple's default k=40."""
    top = np.argpartition(-logits, min(top_k, len(logits) - 1))[:top_k]
    p = np.exp(logits[top] - logits[top].max())
    return int(top[rng.choice(len(top), p=p / p.sum())])


# ---- one `textmill train` invocation ------------------------------------------------------------------------------


class Session:
    """One `textmill train` invocation: the loop, its checkpoints, samples, logs and report. `make_backend(hp, n_ctx,
    paths)` builds the backend once the shapes are known."""

    def __init__(self, cfg: Config, name: str, make_backend, *, restart: bool = False, restart_if_stale: bool = False,
                 progress: bool = True):
        self.tc, self.paths, self.progress = cfg.training, RunPaths.of(cfg, name), progress
        self.meta = data.load_meta(self.paths.tokens)
        self.train_tokens = data.open_tokens(self.paths.tokens, "train")
        self.val_tokens = data.open_tokens(self.paths.tokens, "val")
        self.hp = base_hparams(self.paths.base)
        self.n_ctx = self._check_shapes()
        self.trainer: Backend = make_backend(self.hp, self.n_ctx, self.paths)
        fp = fingerprint(self.hp, self.tc, self.n_ctx, self.trainer.replicas, self.paths.tokens / data.META_FILE,
                         base_weights_file(self.paths.base))
        self.writer = self.trainer.is_writer
        if self.writer:
            self.state, self.resuming = open_run(self.paths, fp, self.tc.seed, restart, restart_if_stale,
                                                 self.trainer.name)
            if not self.resuming:
                copy_run_files(self.paths, self.hp)
        self.trainer.barrier()  # rank 0 has restarted / created the run folder: the others read what it left
        if not self.writer:
            self.state, self.resuming = open_run(self.paths, fp, self.tc.seed, False, False, self.trainer.name)
        if self.resuming:
            restored = self.trainer.restore(self.paths.run, self.state.d["checkpoint"])
            if restored != self.state.d["step"]:
                raise UserError(f"{self.paths.run / STATE_FILE}: says step {self.state.d['step']} but its checkpoint "
                                f"holds step {restored}; delete the run folder or pass --restart")
        else:
            self.trainer.restore_base(self.paths.base)
        self.rng = np.random.default_rng()
        self.rng.bit_generator.state = self.state.d["rng"]
        self.tokenizer = tokenizer_io.load(self.paths.run)
        self.eot = int(self.meta.get("eot_id", tokenizer_io.eot_id(self.tokenizer)))

    def _check_shapes(self) -> int:
        n_ctx = int(self.tc.n_ctx or self.hp.n_ctx)
        if n_ctx > self.hp.n_ctx:
            raise UserError(f"config key training.n_ctx={n_ctx} exceeds the model's n_ctx={self.hp.n_ctx} "
                            f"({self.paths.base}); lower training.n_ctx")
        vocab = int(self.meta.get("vocab_size", 0))
        if vocab > self.hp.n_vocab:
            raise UserError(f"{self.paths.tokens / data.META_FILE}: vocab_size {vocab} > model n_vocab {self.hp.n_vocab}; "
                            f"the tokens were made with another tokenizer, rerun `textmill prepare`")
        return n_ctx

    # ---- the loop -------------------------------------------------------------------------------------------------

    def run(self) -> dict:
        """Train to `training.steps` (or early stop), checkpointing as configured; returns the report (rank 0 writes it)."""
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
        bar = tqdm(total=tc.steps, initial=step, disable=not (self.progress and self.writer), unit="step",
                   desc=f"train {self.paths.run.name}")
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
        """This worker's batch for `step`: [grad_accum, b, n_ctx], a pure function of (seed, step)."""
        return self.trainer.batch(self.train_tokens, step)

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
        """Save model-<step>, then commit it in the state file, then the backend's hook and `counter`, then prune."""
        st, name = self.state.d, f"model-{step}"
        best = f"model-{st['best_step']}" if st["best_step"] is not None else None
        older = [n for n in st["kept"] if n != name and n != best]
        recent = older[len(older) - (self.tc.max_to_keep - 1):]  # max_to_keep >= 1 (config.validate)
        kept = sorted({*recent, name, *([best] if best else [])}, key=lambda n: int(n.split("-")[1]))
        old = set(st["kept"]) - set(kept)
        st.update(step=step, checkpoint=name, kept=kept, rng=self.rng.bit_generator.state)
        if self.writer:
            self.trainer.save(self.paths.run, name)
            storage.write_json_atomic(self.paths.run / STATE_FILE, st)  # the commit point
            self.trainer.after_commit(self.paths.run, name, kept)
            storage.write_text_atomic(self.paths.run / "counter", f"{step}\n")
            for stale in old:  # never the best one: it is always in `kept`
                for f in self.paths.run.glob(f"{stale}.*"):
                    f.unlink()

    def _write_sample(self, step: int) -> None:
        ids = self.sample(self.eot, self.tc.sample_length)
        if not self.writer:
            return
        text = self.tokenizer.decode(ids, skip_special_tokens=False)
        path = self.paths.run / SAMPLES_FILE
        old = path.read_text(encoding="utf-8") if path.is_file() else ""
        storage.write_text_atomic(path, f"{old}{SAMPLE_HEADER.format(step=step)}\n{text}\n\n")

    def sample(self, start: int, length: int, top_k: int = 40) -> list[int]:
        """Top-k sampling from `start` (EOT) with the run's RNG (part of the resume state), context cut to n_ctx."""
        ids = [start]
        for _ in range(length):
            logits = self.trainer.next_token_logits(ids[-self.n_ctx:])
            ids.append(top_k_sample(logits, self.rng, top_k))
        return ids[1:]

    def _open_live(self):
        if not self.writer:
            return _NoLive()
        from dvclive import Live

        if self.resuming:
            # Rows logged after the last checkpoint by a killed session are replaced by the resumed session's own.
            truncate_after(self.paths.live, self.paths.run / SAMPLES_FILE, self.state.d["step"])
        return Live(dir=str(self.paths.live), resume=self.resuming, save_dvc_exp=False, dvcyaml=None, report=None)

    def report_extra(self) -> dict:
        """Backend-specific report fields (the PyTorch backend adds its memory plan)."""
        return getattr(self.trainer, "report_extra", dict)()

    def _write_report(self, step: int, tokens_per_s: float | None) -> dict:
        st = self.state.d
        report = {
            "final_step": step, "train_loss": st["train_loss"], "val_loss": st["val_loss_by_step"].get(str(step)),
            "initial_val_loss": st["initial_val_loss"], "best_step": st["best_step"], "best_val_loss": st["best_val_loss"],
            "val_loss_by_step": st["val_loss_by_step"], "tokens_seen": step * self.trainer.tokens_per_step,
            "tokens_per_s": tokens_per_s, "peak_memory_bytes": self.trainer.peak_memory_bytes(),
            "stopped_early": st["stopped_early"], "precision": self.tc.precision,
            "grad_checkpointing": self.tc.grad_checkpointing, "replicas": self.trainer.replicas, "n_ctx": self.n_ctx,
            "fingerprint": st["fingerprint"], "backend": self.trainer.name, **self.report_extra(),
        }
        if self.writer:
            storage.write_json_atomic(self.paths.report, report)
        return report


class _NoLive:
    """Stands in for dvclive on ranks other than 0: they log nothing."""

    step = 0

    def log_metric(self, *_args) -> None:
        pass

    def make_summary(self) -> None:
        pass


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
