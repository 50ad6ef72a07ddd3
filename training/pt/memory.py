"""The memory planner: given `training.memory_gb`, pick micro-batch, accumulation and checkpointing that fit.

The global batch (`batch_size x grad_accum` sequences per worker and step) is kept; the planner only decides how it is
split. Estimate, in bytes, for N parameters, micro-batch b, sequence s, width h, heads a, layers L, vocabulary V
(the arithmetic of docs/training.md, "Fitting 355M in 16 GB"; Korthikanti et al. 2022, "Reducing Activation
Recomputation in Large Transformer Models", for the 34·s·b·h per layer):

    states       = weights 4N + gradients 4N + AdamW moments 8N          (float32 master weights)
                   LoRA: weights 4N (frozen) + 16 x adapter parameters
    activations  = L x (34·s·b·h x k + 5·a·s²·b x k [no fused SDPA kernel])   k = 1 in half precision, 2 in float32
                   checkpointing: L x 2·s·b·h x k (block inputs) + one block's activations
    logits       = 3 x 4·b·s·V (float32 logits, their softmax gradient, the float32 copy for the loss)
    total        = (states + activations + logits) x 1.1 (allocator fragmentation), + 0.5 GB CUDA context on GPUs

Candidates are tried from the largest micro-batch (the configured `batch_size`) down, each without checkpointing first
(it costs ~1/3 more compute), then with it; the first that fits is the plan. The report records the plan and the
measured peak, so the estimate can be checked against the truth.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

from textmill.config import TrainingConfig
from textmill.errors import UserError
from textmill.sizes import Hparams

GB = 1e9
FRAGMENTATION = 1.1
CUDA_CONTEXT = 0.5 * GB


@dataclass(frozen=True)
class Plan:
    micro_batch: int
    grad_accum: int
    grad_checkpointing: bool
    estimated_bytes: int
    budget_bytes: int | None     # None: no training.memory_gb, the configured split is used as is

    def to_json(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        budget = "no budget (training.memory_gb unset)" if self.budget_bytes is None else \
            f"budget {self.budget_bytes / GB:.1f} GB"
        return (f"micro-batch {self.micro_batch} x accumulation {self.grad_accum}, gradient checkpointing "
                f"{'on' if self.grad_checkpointing else 'off'}, estimated {self.estimated_bytes / GB:.2f} GB, {budget}")


def lora_params(hp: Hparams, rank: int) -> int:
    """Adapter parameters of rank-r LoRA on every c_attn (h -> 3h) and c_proj (h -> h) of attention."""
    h = hp.n_embd
    return hp.n_layer * rank * ((h + 3 * h) + (h + h))


def estimate_bytes(hp: Hparams, n_ctx: int, micro_batch: int, *, grad_checkpointing: bool, half: bool,
                   fused_attention: bool, lora_rank: int = 0, cuda: bool = True) -> int:
    """Estimated peak bytes of one training step (see the module docstring for the formula)."""
    n, s, b, h, a, layers, v = hp.n_params, n_ctx, micro_batch, hp.n_embd, hp.n_head, hp.n_layer, hp.n_vocab
    k = 1 if half else 2
    states = 4 * n + 16 * lora_params(hp, lora_rank) if lora_rank else 16 * n
    per_layer = 34 * s * b * h * k + (0 if fused_attention else 5 * a * s * s * b * k)
    activations = layers * 2 * s * b * h * k + per_layer if grad_checkpointing else layers * per_layer
    logits = 3 * 4 * b * s * v
    return int((states + activations + logits) * FRAGMENTATION + (CUDA_CONTEXT if cuda else 0))


def plan(hp: Hparams, tc: TrainingConfig, n_ctx: int, device) -> Plan:
    """The split of each step's `batch_size x grad_accum` sequences that fits `tc.memory_gb`; UserError if none does."""
    cuda = getattr(device, "type", str(device)) == "cuda"
    half = tc.precision != "float32"
    common = dict(half=half, fused_attention=cuda, lora_rank=tc.lora_rank, cuda=cuda)
    if not tc.memory_gb:
        est = estimate_bytes(hp, n_ctx, tc.batch_size, grad_checkpointing=tc.grad_checkpointing, **common)
        return Plan(tc.batch_size, tc.grad_accum, tc.grad_checkpointing, est, None)
    budget = int(tc.memory_gb * GB)
    sequences = tc.batch_size * tc.grad_accum
    for b in sorted((d for d in range(1, tc.batch_size + 1) if sequences % d == 0), reverse=True):
        for ckpt in ((False, True) if not tc.grad_checkpointing else (True,)):
            est = estimate_bytes(hp, n_ctx, b, grad_checkpointing=ckpt, **common)
            if est <= budget:
                return Plan(b, sequences // b, ckpt, est, budget)
    least = estimate_bytes(hp, n_ctx, 1, grad_checkpointing=True, **common)
    raise UserError(f"config key training.memory_gb={tc.memory_gb}: a {hp.n_params / 1e6:.0f}M-parameter GPT-2 at "
                    f"n_ctx {n_ctx} needs about {least / GB:.1f} GB even at micro-batch 1 with checkpointing; raise "
                    f"training.memory_gb, set training.lora_rank (e.g. 16), use precision bfloat16/mixed_float16 or "
                    f"lower training.n_ctx")


def peak_rss_bytes() -> int | None:
    """This process' peak resident memory (Linux VmHWM), None where /proc is absent."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
