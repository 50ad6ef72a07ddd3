"""The PyTorch backend of `training.run`: transformers' GPT2LMHeadModel, AdamW, accumulation, mixed precision, DDP.

Same command, same DVC stage, same run core as TensorFlow (`textmill train MODEL --set training.backend=pt`):

* model: `transformers.GPT2LMHeadModel` with OpenAI's math (tanh GELU, LN eps 1e-5, tied embeddings, no dropout:
  `textmill.sizes.to_hf_config_kwargs`) and SDPA attention; started from the base folder in OpenAI layout (weights mapped
  by `convert.names`, read through TF's checkpoint reader) or Hugging Face layout (config.json + safetensors);
* optimizer: `torch.optim.AdamW` (fused on CUDA), decoupled weight decay on matrices only (as the TF backend:
  `training/tf/optim.py`), the same warmup + cosine schedule, global-norm clipping, updates with a non-finite gradient
  skipped;
* batches: `grad_accum` micro-batches from `training.data.train_batch`; worker r of W draws micro-batches
  m*W + r (m < grad_accum) of `batch_size` windows, so W workers with accumulation A see exactly the data of one
  worker with accumulation W*A; gradients are the mean over all micro-batches (DDP averages across workers);
* precision: float32 | mixed_float16 (autocast float16 + `GradScaler`: P100, V100) | bfloat16 (autocast, Ampere+);
  validation and sampling always in float32 (so `textmill evaluate` reproduces the trainer's number);
* gradient checkpointing per block (`gradient_checkpointing_enable`, non-reentrant), optional `torch.compile`
  (`training.compile`);
* checkpoint `model-<step>`: `model-<step>.safetensors` (HF keys, the tied lm_head stored once under wte) +
  `model-<step>.pt` (optimizer, scaler, step, torch RNG), each written to a temp name and renamed (state first, weights
  last); the run core commits it in `textmill_state.json`.
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from textmill.config import Config, TrainingConfig
from textmill.errors import UserError
from textmill.sizes import Hparams, to_hf_config_kwargs
from textmill.training import data, openai_layout, run
from textmill.training.pt import memory

log = logging.getLogger(__name__)

WEIGHTS_SUFFIX = ".safetensors"
STATE_SUFFIX = ".pt"
EVAL_BATCH_FACTOR = 4
AUTOCAST = {"float32": None, "mixed_float16": torch.float16, "bfloat16": torch.bfloat16}


def lr_at(tc: TrainingConfig, step: int) -> float:
    """Learning rate of the update from `step` to `step + 1`: linear warmup, then cosine to lr * min_lr_ratio (the TF
    backend's `Schedule`, training/tf/optim.py)."""
    if step < tc.warmup_steps:
        return tc.learning_rate * (step + 1) / max(tc.warmup_steps, 1)
    progress = min(max((step - tc.warmup_steps) / max(tc.steps - tc.warmup_steps, 1), 0.0), 1.0)
    return tc.learning_rate * (tc.min_lr_ratio + (1.0 - tc.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


@contextlib.contextmanager
def _atomic_file(path: Path):
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


class Distributed:
    """torchrun's environment (WORLD_SIZE, RANK, LOCAL_RANK): one process per device, gloo on CPU, NCCL on CUDA."""

    def __init__(self) -> None:
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if torch.cuda.is_available():
            self.device = torch.device("cuda", self.local_rank)
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.started_here = False
        if self.world > 1 and not torch.distributed.is_initialized():
            torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            self.started_here = True

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world > 1:
            torch.distributed.all_reduce(value, op=torch.distributed.ReduceOp.SUM)
            value = value / self.world
        return value

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()

    def close(self) -> None:
        if self.started_here:
            torch.distributed.destroy_process_group()


def build_model(hp: Hparams, eot: int, device: torch.device):
    """A GPT2LMHeadModel of shape `hp` with OpenAI's math and SDPA attention, float32 weights on `device`."""
    from transformers import GPT2Config, GPT2LMHeadModel

    config = GPT2Config(**to_hf_config_kwargs(hp, eot_id=eot), architectures=["GPT2LMHeadModel"])
    config._attn_implementation = "sdpa"
    return GPT2LMHeadModel(config).to(device)


def openai_state_dict(prefix: Path) -> dict[str, torch.Tensor]:
    """HF-keyed tensors from a name-based TF checkpoint (OpenAI / gpt-2-simple / textmill TF run); non-model variables
    (Adam slots, global_step) are skipped. Reading a TF checkpoint needs TensorFlow (imported here only)."""
    from textmill.convert.names import hf_key
    from textmill.weights import is_model_weight
    from textmill.training.tf.checkpoint import iter_tensors, list_variables

    names = [n for n in list_variables(prefix) if is_model_weight(n)]
    out = {}
    for name, value in iter_tensors(prefix, names):
        key, drop = hf_key(name)
        out[key] = torch.from_numpy(np.ascontiguousarray(value.reshape(value.shape[1:]) if drop else value))
    return out


def hf_state_dict(folder: Path) -> dict[str, torch.Tensor]:
    """Tensors of a Hugging Face GPT-2 folder's safetensors file(s), keys normalised to GPT2LMHeadModel's (releases
    such as openai-community/gpt2 store `h.0....` without the `transformer.` prefix)."""
    from safetensors.torch import load_file

    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        for key, value in load_file(str(f)).items():
            if not key.startswith(("transformer.", "lm_head.")):
                key = f"transformer.{key}"
            out[key] = value
    return out


def load_weights(model, state: dict[str, torch.Tensor], source: Path) -> None:
    """Copy `state` into `model`, every weight present with its shape; the tied lm_head may be absent."""
    own = model.state_dict()
    state = {k: v for k, v in state.items() if not k.endswith((".attn.bias", ".attn.masked_bias"))}  # old HF buffers
    missing = [k for k in own if k not in state and k != "lm_head.weight"]
    unknown = [k for k in state if k not in own]
    if missing or unknown:
        raise UserError(f"{source}: not a GPT-2 of this shape: missing {missing[:3]}, unexpected {unknown[:3]}; check "
                        f"its hparams.json / config.json")
    for key, value in state.items():
        if tuple(value.shape) != tuple(own[key].shape):
            raise UserError(f"{source}: weight {key} has shape {list(value.shape)}, the model expects "
                            f"{list(own[key].shape)}; check its hparams.json / config.json")
    model.load_state_dict(state, strict=False)
    model.tie_weights()


class Trainer:
    """The PyTorch backend (see the module docstring); one instance per process."""

    name = "pt"

    def __init__(self, hp: Hparams, tc: TrainingConfig, n_ctx: int, eot: int, dist: Distributed | None = None):
        self.hp, self.tc, self.n_ctx = hp, tc, n_ctx
        self.dist = dist or Distributed()
        self.device, self.replicas, self.is_writer = self.dist.device, self.dist.world, self.dist.rank == 0
        self.plan = memory.plan(hp, tc, n_ctx, self.device)
        self.micro_batch, self.accum = self.plan.micro_batch, self.plan.grad_accum
        self.model = build_model(hp, eot, self.device)
        if self.plan.grad_checkpointing:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.lora = None
        if tc.lora_rank:
            from textmill.training.pt import lora

            self.lora = lora
        decay = [p for p in self.model.parameters() if p.dim() >= 2]  # wte (= lm_head), wpe, the conv kernels
        no_decay = [p for p in self.model.parameters() if p.dim() < 2]  # LayerNorm gains, biases
        self._groups = [{"params": decay, "weight_decay": tc.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        self.opt = None  # built after the base weights are in (LoRA wraps the model first)
        self.autocast = AUTOCAST[tc.precision]
        self.scaler = torch.amp.GradScaler(self.device.type, enabled=tc.precision == "mixed_float16")
        self.step = 0
        self.ddp = None
        self.forward = self.model

    # ---- set-up ----------------------------------------------------------------------------------------------------

    def _finish_setup(self) -> None:
        """Optimizer, DDP wrapper and compilation, once the weights (and LoRA adapters) are in place."""
        if self.lora is not None:
            self.model = self.lora.wrap(self.model, self.tc)
            params = [p for p in self.model.parameters() if p.requires_grad]
            self._groups = [{"params": params, "weight_decay": 0.0}]
        kwargs = {"fused": True} if self.device.type == "cuda" else {}
        self.opt = torch.optim.AdamW(self._groups, lr=self.tc.learning_rate, betas=(self.tc.beta1, self.tc.beta2),
                                     eps=1e-8, **kwargs)
        self.forward = self.model
        if self.replicas > 1:
            from torch.nn.parallel import DistributedDataParallel

            self.ddp = DistributedDataParallel(self.model, device_ids=[self.device] if self.device.type == "cuda" else None)
            self.forward = self.ddp
        if self.tc.compile:
            self.forward = torch.compile(self.forward)

    @property
    def tokens_per_step(self) -> int:
        return self.accum * self.micro_batch * self.replicas * self.n_ctx

    def restore_base(self, base: Path) -> None:
        """Starting weights from an OpenAI-layout or Hugging Face-layout base folder."""
        if run.base_layout(base) == "hf":
            state = hf_state_dict(base)
        else:
            state = openai_state_dict(openai_layout.resolve_prefix(base))
        load_weights(self.model, state, base)
        self._finish_setup()

    def restore(self, run_dir: Path, name: str) -> int:
        """Weights, optimizer, scaler, step and torch RNG of checkpoint `name`; returns its step."""
        from safetensors.torch import load_file

        weights, state_file = run_dir / f"{name}{WEIGHTS_SUFFIX}", run_dir / f"{name}{STATE_SUFFIX}"
        for f in (weights, state_file):
            if not f.is_file():
                raise UserError(f"{f}: missing, but {run.STATE_FILE} commits {name}; delete the run folder or pass "
                                f"--restart")
        if self.lora is not None:
            self._finish_setup()  # LoRA checkpoints hold the wrapped model's keys
            missing = self.model.load_state_dict(load_file(str(weights)), strict=False).missing_keys
            if [k for k in missing if not k.endswith("lm_head.weight")]:
                raise UserError(f"{weights}: lacks {missing[:3]}; delete the run folder or pass --restart")
        else:
            load_weights(self.model, load_file(str(weights)), weights)
            self._finish_setup()
        saved = torch.load(state_file, map_location=self.device, weights_only=False)
        self.opt.load_state_dict(saved["optimizer"])
        self.scaler.load_state_dict(saved["scaler"])
        torch.set_rng_state(saved["rng_cpu"])
        if self.device.type == "cuda" and saved.get("rng_cuda") is not None:
            torch.cuda.set_rng_state(saved["rng_cuda"], self.device)
        self.step = int(saved["step"])
        return self.step

    def save(self, run_dir: Path, name: str) -> None:
        """`name.pt` (optimizer, scaler, step, RNG) then `name.safetensors` (weights), each via a temp file + rename."""
        from safetensors.torch import save_file

        state = {"optimizer": self.opt.state_dict(), "scaler": self.scaler.state_dict(), "step": self.step,
                 "rng_cpu": torch.get_rng_state(),
                 "rng_cuda": torch.cuda.get_rng_state(self.device) if self.device.type == "cuda" else None}
        with _atomic_file(run_dir / f"{name}{STATE_SUFFIX}") as tmp:
            torch.save(state, tmp)
        # The tied lm_head is wte's storage: stored once, under wte (as save_pretrained does).
        weights = {k: v.detach().contiguous().cpu() for k, v in self.model.state_dict().items()
                   if not k.endswith("lm_head.weight")}
        meta = {"format": "pt", **(self.lora.metadata(self.tc) if self.lora is not None else {})}
        with _atomic_file(run_dir / f"{name}{WEIGHTS_SUFFIX}") as tmp:
            save_file(weights, str(tmp), metadata=meta)

    def after_commit(self, run_dir: Path, name: str, kept: list[str]) -> None:
        pass  # no TF state file: a PyTorch run folder is read by `textmill convert` through textmill_state.json

    def barrier(self) -> None:
        self.dist.barrier()

    # ---- compute -----------------------------------------------------------------------------------------------------

    def batch(self, tokens: np.ndarray, step: int) -> tuple[np.ndarray, np.ndarray]:
        """(x, y) int32 [accum, micro_batch, n_ctx]: this worker's micro-batches m*W + rank (see the module docstring)."""
        w, r = self.replicas, self.dist.rank
        pairs = [data.train_batch(tokens, step=step, micro=m * w + r, batch_size=self.micro_batch, n_ctx=self.n_ctx,
                                  seed=self.tc.seed) for m in range(self.accum)]
        return np.stack([p[0] for p in pairs]), np.stack([p[1] for p in pairs])

    def _autocast(self):
        if self.autocast is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast)

    def train_step(self, x: np.ndarray, y: np.ndarray) -> dict[str, float]:
        """One optimizer step on this worker's [accum, b, T] batch; loss is the mean over every worker's tokens."""
        self.model.train()
        lr = lr_at(self.tc, self.step)
        for group in self.opt.param_groups:
            group["lr"] = lr
        xs, ys = torch.from_numpy(x).long().to(self.device), torch.from_numpy(y).long().to(self.device)
        accum, loss_sum = xs.shape[0], torch.zeros((), device=self.device)
        for i in range(accum):
            sync = self.ddp is None or i == accum - 1
            with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                logits = self.forward(input_ids=xs[i]).logits
                loss = F.cross_entropy(logits.float().flatten(0, 1), ys[i].flatten())
            self.scaler.scale(loss / accum).backward()
            loss_sum += loss.detach()
        self.scaler.unscale_(self.opt)
        params = [p for g in self.opt.param_groups for p in g["params"]]
        norm = torch.nn.utils.clip_grad_norm_(params, self.tc.grad_clip if self.tc.grad_clip > 0 else float("inf"))
        if self.scaler.is_enabled() or torch.isfinite(norm):
            self.scaler.step(self.opt)  # GradScaler itself skips a float16 step with inf/NaN gradients
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        loss = self.dist.mean(loss_sum / accum)
        return {"loss": float(loss), "lr": lr, "grad_norm": float(norm)}

    @torch.inference_mode()
    def val_loss(self, tokens: np.ndarray) -> float:
        """THE validation protocol (training.data), float32 whatever the training precision."""
        self.model.eval()
        losses = []
        # No activations are kept for a backward pass, so 4 micro-batches' worth of windows fit where one trains; the
        # batch size cannot change the protocol's number (a mean over tokens).
        for x, y, w in data.eval_batches(tokens, self.n_ctx, EVAL_BATCH_FACTOR * self.micro_batch):
            logits = self.model(input_ids=torch.from_numpy(x).long().to(self.device)).logits.float()
            ce = F.cross_entropy(logits.flatten(0, 1), torch.from_numpy(y).long().to(self.device).flatten(),
                                 reduction="none")
            losses.append((ce.view(x.shape).cpu().numpy(), w))
        return data.mean_loss(iter(losses))

    @torch.inference_mode()
    def next_token_logits(self, ids: list[int]) -> np.ndarray:
        self.model.eval()
        logits = self.model(input_ids=torch.tensor([ids], device=self.device)).logits
        return logits[0, -1].double().cpu().numpy()

    def peak_memory_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_allocated(self.device)) if self.device.type == "cuda" else None

    def report_extra(self) -> dict:
        """The memory plan the run used (printed at start) and, on CPU, the process' peak resident memory."""
        return {"memory_plan": self.plan.to_json(), "peak_rss_bytes": memory.peak_rss_bytes(),
                "lora_rank": self.tc.lora_rank}


def train(cfg: Config, name: str, *, restart: bool = False, restart_if_stale: bool = False,
          progress: bool = True) -> dict:
    """Train model `name` with the PyTorch backend (every torchrun rank calls this; rank 0 writes); returns the report."""
    from textmill import tokenizer as tokenizer_io

    cfg.model_spec(name)
    torch.manual_seed(cfg.training.seed)
    dist = Distributed()

    def make(hp: Hparams, n_ctx: int, paths: run.RunPaths) -> Trainer:
        meta = data.load_meta(paths.tokens)
        eot = int(meta["eot_id"]) if "eot_id" in meta else tokenizer_io.eot_id(tokenizer_io.load(paths.base))
        trainer = Trainer(hp, cfg.training, n_ctx, eot, dist)
        if trainer.is_writer:
            print(f"memory plan: {trainer.plan.describe()}", flush=True)
        return trainer

    try:
        return run.Session(cfg, name, make, restart=restart, restart_if_stale=restart_if_stale,
                           progress=progress).run()
    finally:
        dist.close()
