"""Reduced-precision inference: GPT-2 Conv1D -> Linear, W8A8 int8, bf16, and the loss check that picks one per version.

`serving.dtype` asks for a precision; `plan()` turns the request into an ordered list of candidates for the device, and
`select()` keeps those whose loss on a validation sample is within `tolerance` (relative) of the fp32 model's: an
explicit request takes the first that passes, `auto` the one whose decode step measures fastest on this machine. On
CPU, `auto` and `int8` try `int8` (W8A8 per-token, every Linear, lm_head included), then `int8_body` (lm_head kept
fp32), then `bfloat16` (only where the CPU has native bf16: AVX512-BF16 or AMX), then `float32`, which always passes. On GPU the request resolves as before (auto = bf16, or fp16 without bf16 support) with no check: int8 is
built for CPU here.

The validation sample is `val_sample.json` in the version's folder (written by `textmill convert --tokens`, published
with the version and verified against its MANIFEST like any other file); a version without one is checked on a short
English text shipped with textmill (`serving/quality_sample.txt`), tokenized with the version's own tokenizer.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import warnings
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from torch import nn

from textmill.serving.gpt2_runtime import for_serving

log = logging.getLogger(__name__)

__all__ = ["DEFAULT_TOLERANCE", "PRECISIONS", "SAMPLE_FILE", "PrecisionReport", "conv1d_to_linear",
           "cpu_supports_bf16", "load_model", "load_sample", "plan", "quantize_int8", "select", "sequence_loss",
           "to_precision"]

PRECISIONS = ("auto", "float32", "float16", "bfloat16", "int8")   # values of serving.dtype
DEFAULT_TOLERANCE = 0.01      # |loss - fp32 loss| / fp32 loss a reduced precision may cost
SAMPLE_FILE = "val_sample.json"
SAMPLE_TOKENS = 512           # tokens of the sample the check scores (more only costs load time)
SHIPPED_SAMPLE = "quality_sample.txt"
FLOAT_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class PrecisionReport:
    """What `select` chose for one loaded version, and why (shown in /info, logged, and as /metrics gauges).

    Losses are mean next-token cross-entropy in nats on `sample_tokens` tokens; `loss_delta` is relative:
    (loss - reference_loss) / reference_loss, 0.0 for float32 itself, None when no check ran (GPU)."""

    requested: str
    chosen: str
    device: str
    tolerance: float
    sample: str | None = None            # "val_sample.json", "shipped text" or None (no check)
    sample_tokens: int = 0
    reference_loss: float | None = None
    loss: float | None = None
    loss_delta: float | None = None
    rejected: dict[str, float] = field(default_factory=dict)   # candidate -> its relative loss delta
    decode_tokens_per_s: dict[str, float] = field(default_factory=dict)   # auto: passing candidate -> measured speed

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------------------------------------------------- hardware
def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return set()
    for line in text.splitlines():
        if line.startswith("flags"):
            return set(line.split(":", 1)[1].split())
    return set()


def cpu_supports_bf16() -> bool:
    """True when the CPU computes bf16 natively (x86 AVX512-BF16 or AMX-BF16), where oneDNN's bf16 matmuls beat fp32.

    Reads /proc/cpuinfo flags; elsewhere (macOS, no procfs) asks oneDNN. Without native support bf16 is emulated and
    slower than fp32, so it is never chosen."""
    flags = _cpu_flags()
    if flags:
        return bool(flags & {"avx512_bf16", "amx_bf16"})
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def int8_supported() -> bool:
    """This machine has an int8 CPU matmul `Int8Linear` can use: textmill's native VNNI kernel, fbgemm's dynamic
    quantized linear (x86), or `torch._int_mm` (int8 x int8 -> int32, torch >= 2.3) elsewhere."""
    from .kernels import fast_int8_kernel

    return fast_int8_kernel() is not None or _fbgemm_available() or _int_mm_available()


@functools.cache
def _fbgemm_available() -> bool:
    """fbgemm's dynamic quantized linear works in this torch (probed once: the quantized-tensor API it needs is
    deprecated upstream, and where it is gone Int8Linear falls back to `torch._int_mm`)."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            layer = Int8Linear(nn.Linear(8, 4), kernel="fbgemm")
            return bool(torch.isfinite(layer(torch.ones(2, 8))).all())
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def _int_mm_available() -> bool:
    try:
        one = torch.ones(1, 8, dtype=torch.int8)
        return int(torch._int_mm(one, one.t())) == 8
    except (AttributeError, RuntimeError, NotImplementedError):
        return False


def plan(requested: str, device: torch.device) -> list[str]:
    """Candidate precisions for `requested` on `device`, fastest first; the last one is the fallback that always passes.

    Raises ValueError for a value outside PRECISIONS, or int8 on a non-CPU device (Int8Linear is built for CPU)."""
    if requested not in PRECISIONS:
        raise ValueError(f"serving.dtype={requested!r} is invalid; choose one of {list(PRECISIONS)}")
    if device.type != "cpu":
        if requested == "int8":
            raise ValueError(f"serving.dtype=int8 runs on CPU only (device {device}); use auto, bfloat16 or float16")
        if requested == "auto":
            if device.type == "cuda":
                return ["bfloat16" if torch.cuda.is_bf16_supported() else "float16"]
            return ["float32"]
        return [requested]
    bf16 = ["bfloat16"] if cpu_supports_bf16() else []
    if requested in ("auto", "int8"):
        return [*(["int8", "int8_body"] if int8_supported() else []), *bf16, "float32"]
    if requested == "bfloat16":
        if not bf16:
            log.warning("serving.dtype=bfloat16: this CPU has no native bf16 (avx512_bf16/amx_bf16); using float32")
        return [*bf16, "float32"]
    if requested == "float16":
        return ["float16", "float32"]
    return ["float32"]


# ---------------------------------------------------------------------------------------------------------- transforms
def conv1d_to_linear(model: nn.Module) -> int:
    """Replace every transformers `Conv1D` (GPT-2's projections: y = x @ W + b, W of shape [in, out]) by an `nn.Linear`
    in place, so that quantizers that know only Linear reach them. Returns how many were replaced.

    The Linear's weight is a transposed *view* of the same storage ([out, in] with strides of W), so `F.linear` calls
    the same `addmm` on the same memory as Conv1D did and fp32 outputs are bit-identical."""
    from transformers.pytorch_utils import Conv1D

    replaced = 0
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, Conv1D):
                linear = nn.Linear(child.nx, child.nf, bias=True, device="meta")
                linear.weight = nn.Parameter(child.weight.detach().t(), requires_grad=False)
                linear.bias = nn.Parameter(child.bias.detach(), requires_grad=False)
                setattr(parent, name, linear)
                replaced += 1
    return replaced


INT8_KERNELS = ("native", "fbgemm", "int_mm")


def default_int8_kernel() -> str:
    """The int8 kernel `Int8Linear` uses when none is named: textmill's own (serving/kernels/int8_linear.c) where the
    CPU has AVX-512 VNNI and a C compiler is present, else fbgemm where this torch has it, else `torch._int_mm`."""
    from .kernels import fast_int8_kernel

    if fast_int8_kernel() is not None:
        return "native"
    return "fbgemm" if _fbgemm_available() else "int_mm"


class Int8Linear(nn.Module):
    """W8A8 Linear: int8 weights (symmetric, one scale per output channel) times int8 activations quantized per token
    (= per input row, at run time), accumulated exactly in int32, rescaled to fp32. This is per-token asymmetric
    activation quantization (LLM.int8()/SmoothQuant's per-token W8A8 without outlier handling); the quality check
    decides whether a model tolerates it. Every kernel keeps a row's output independent of the other rows of the call
    (bitwise), so sampled text does not depend on batch-mates.

    Kernels (`kernel=`):
    - "native": textmill's C kernel (serving/kernels/int8_linear.c, AVX-512 VNNI, compiled on first use): quantizes
      each row onto 256 levels of its own [min, 0, max] range inside the kernel and streams the packed weights once.
      On GPT-2-medium shapes, 2 cores: all 97 projections of a batch-1 step 11.8 ms vs 16.0 ms with fbgemm (30 vs 22
      GB/s of weights), batch 8 14.3 vs 18.6 ms, a 64-token prefill 60 vs 76 ms (bench/RESULTS.md).
    - "fbgemm": fbgemm's dynamic quantized linear (`quantized::linear_dynamic`, what torch.ao's `quantize_dynamic`
      runs). It quantizes a call with *one* affine range (7-bit, reduce_range), so each row is first mapped onto
      exactly [0, 1]: x' = (x - min) / span per row (a / a == 1 in IEEE arithmetic), every row is then quantized as
      it would be alone, and the map is undone on the output: W x = span (W x') + min (W 1).
    - "int_mm": per-token symmetric int8 through `torch._int_mm` (any platform with torch >= 2.3).

    Input [..., in_features] float; output [..., out_features] fp32."""

    def __init__(self, linear: nn.Linear, kernel: str | None = None, arena: Any = None) -> None:
        """`kernel`: one of INT8_KERNELS; None takes `default_int8_kernel()`. ValueError for another name;
        serving.kernels.KernelBuildError when "native" is asked for and cannot be compiled. `arena`: a
        `serving.kernels.HugePageArena` the native kernel's packed weight is allocated from (one per model)."""
        super().__init__()
        if kernel not in (None, *INT8_KERNELS):
            raise ValueError(f"unknown int8 kernel {kernel!r}; choose one of {', '.join(INT8_KERNELS)}")
        self.kernel = kernel or default_int8_kernel()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach().float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        weight_int8 = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        bias = torch.zeros(self.out_features) if linear.bias is None else linear.bias.detach().float().clone()
        self.register_buffer("bias", bias)
        if self.kernel == "native":
            from .kernels import int8_kernel

            self._native = int8_kernel()
            self.register_buffer("weight_packed", self._native.pack(weight_int8, arena))
            self.register_buffer("weight_scale", scale.contiguous())
            self.register_buffer("weight_sum", weight_int8.sum(dim=1, dtype=torch.int32))
        elif self.kernel == "fbgemm":
            with warnings.catch_warnings():   # "quantized tensor creation is deprecated": probed in _fbgemm_available
                warnings.simplefilter("ignore")
                q = torch._make_per_channel_quantized_tensor(weight_int8, scale.double(),
                                                             torch.zeros_like(scale, dtype=torch.long), 0)
                self._packed = torch.ops.quantized.linear_prepack(q, None)
            self.register_buffer("row_sum", (weight_int8.float() * scale[:, None]).sum(dim=1))
        else:
            self.register_buffer("weight_int8", weight_int8)
            self.register_buffer("weight_scale", scale)

    def fused(self, epilogue: str | None = None) -> Any:
        """The native kernel's call without nn.Module's call machinery (hooks, attribute lookups through `_buffers`;
        `serving.gpt2_runtime` calls 97 projections per GPT-2-medium step, where those cost ~1 ms), with `epilogue`
        fused into its output pass: None -> f(x); "residual" -> f(x, r) = r + self(x); "gelu" -> f(x) =
        gelu_tanh(self(x)). None for the other kernels (the caller composes torch ops). It holds this module's
        current buffers: build it after the module's last copy or move."""
        if self.kernel != "native":
            return None
        kernel, k, n = self._native, self.in_features, self.out_features
        packed, scale, row_sum, bias = self.weight_packed, self.weight_scale, self.weight_sum, self.bias
        if epilogue == "residual":
            return lambda x, residual: _native_linear(kernel, x, k, n, packed, scale, row_sum, bias,
                                                      residual=residual)
        if epilogue == "gelu":
            return lambda x: _native_linear(kernel, x, k, n, packed, scale, row_sum, bias, gelu=True)
        return lambda x: _native_linear(kernel, x, k, n, packed, scale, row_sum, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kernel == "native":
            return _native_linear(self._native, x, self.in_features, self.out_features, self.weight_packed,
                                  self.weight_scale, self.weight_sum, self.bias)
        if x.dtype != torch.float32:
            x = x.float()
        if self.kernel == "fbgemm":
            low, high = x.amin(dim=-1, keepdim=True), x.amax(dim=-1, keepdim=True)   # 2x faster than aminmax
            span = (high - low).clamp_min_(1e-30)
            y = torch.ops.quantized.linear_dynamic((x - low).div_(span), self._packed, True)
            return torch.addcmul(self.bias, low, self.row_sum).addcmul_(y, span)
        rows = x.reshape(-1, self.in_features)
        scale = rows.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127.0
        q = torch.round(rows / scale).to(torch.int8)
        # The transposed view (not a contiguous copy) is what the CPU kernel is fastest on.
        y = torch._int_mm(q, self.weight_int8.t()).float().mul_(scale).mul_(self.weight_scale).add_(self.bias)
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        kernel = f"native {self._native.isa}" if self.kernel == "native" else self.kernel
        return f"in_features={self.in_features}, out_features={self.out_features}, w8a8 per-token ({kernel})"


def _native_linear(kernel: Any, x: torch.Tensor, k: int, n: int, packed: torch.Tensor, scale: torch.Tensor,
                   row_sum: torch.Tensor, bias: torch.Tensor, residual: torch.Tensor | None = None,
                   gelu: bool = False) -> torch.Tensor:
    """`Int8Linear` on the native kernel: x [..., k] (any float dtype) -> [..., n] fp32, plus `residual` [..., n]
    or GELU fused into the output (see `Int8Linear.fused`)."""
    if x.dtype != torch.float32:
        x = x.float()
    rows = x.reshape(-1, k)
    if residual is not None:
        residual = residual.reshape(-1, n).float()
        residual = residual if residual.is_contiguous() else residual.contiguous()
    y = kernel.linear(rows if rows.is_contiguous() else rows.contiguous(), packed, n, scale, row_sum, bias,
                      residual=residual, gelu=gelu)
    return y if x.dim() == 2 else y.reshape(*x.shape[:-1], n)


def quantize_int8(model: nn.Module, *, lm_head: bool = True) -> nn.Module:
    """Replace every Linear of a GPT-2 model by `Int8Linear` in place (Conv1D layers are converted first);
    `lm_head=False` keeps the output projection in fp32. The tied input embedding stays fp32; a quantized lm_head holds
    its own int8 copy of it. Returns the model (CPU)."""
    from .kernels import HugePageArena

    conv1d_to_linear(model)
    arena = HugePageArena()   # the native kernel's packed weights, on huge pages
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is nn.Linear and (lm_head or child is not getattr(model, "lm_head", None)):
                setattr(parent, name, Int8Linear(child, arena=arena))
    return model


def to_precision(model: nn.Module, precision: str) -> nn.Module:
    """A copy of the fp32 `model` in `precision` (float32 returns `model` itself); `model` is left as it was.
    Raises ValueError for an unknown one.

    The copy never holds a second fp32 model: for int8 the projections' fp32 weights are shared with `model`, read
    only, while they are quantized (embeddings and norms are copied: a shared embedding would keep the whole
    memory-mapped safetensors file resident); for a float dtype every parameter is cast on the way into the copy.
    Loading GPT-2 medium with `auto` peaked at 4.7 GB of RSS when whole fp32 copies were made."""
    if precision == "float32":
        return model
    if precision in ("int8", "int8_body"):
        from transformers.pytorch_utils import Conv1D

        shared = {id(p): p for m in model.modules() if isinstance(m, (nn.Linear, Conv1D)) for p in m.parameters()}
        for p in model.get_input_embeddings().parameters():   # lm_head's tied weight: the copy keeps its own
            shared.pop(id(p), None)
        return quantize_int8(copy.deepcopy(model, memo=dict(shared)), lm_head=precision == "int8")
    if precision in FLOAT_DTYPES:
        dtype = FLOAT_DTYPES[precision]
        cast = {id(p): nn.Parameter(p.detach().to(dtype), requires_grad=p.requires_grad) for p in model.parameters()}
        cast.update({id(b): b.detach().to(dtype) if b.is_floating_point() else b.clone() for b in model.buffers()})
        return copy.deepcopy(model, memo=cast)
    raise ValueError(f"unknown precision {precision!r}")


# ---------------------------------------------------------------------------------------------------------- quality
@torch.inference_mode()
def sequence_loss(model: nn.Module, ids: torch.Tensor, window: int) -> float:
    """Mean next-token cross-entropy (nats) of a causal LM over `ids` (1-D int64), scored in consecutive windows of at
    most `window` tokens (each window predicts its own tokens 2..n, so a window contributes n-1 targets)."""
    total, count = 0.0, 0
    device = next(model.parameters()).device
    for start in range(0, ids.numel() - 1, window):
        chunk = ids[start:start + window].to(device)[None]
        if chunk.shape[1] < 2:
            break
        logits = model(input_ids=chunk).logits.float()
        loss = nn.functional.cross_entropy(logits[0, :-1], chunk[0, 1:], reduction="sum")
        total, count = total + float(loss), count + chunk.shape[1] - 1
    if count == 0:
        raise ValueError("the quality sample has fewer than 2 tokens")
    return total / count


def _read_sample_file(path: Path, vocab_size: int) -> list[int]:
    """Token ids from a published val_sample.json; ValueError naming the file and the problem when it is malformed."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{path}: not readable JSON ({e})") from None
    ids = data.get("ids") if isinstance(data, dict) else None
    if not isinstance(ids, list) or len(ids) < 2:
        raise ValueError(f"{path}: needs an 'ids' list of at least 2 token ids")
    bad = next((i for i, t in enumerate(ids) if type(t) is not int or not 0 <= t < vocab_size), None)
    if bad is not None:
        raise ValueError(f"{path}: ids[{bad}]={ids[bad]!r} is not a token id in [0, {vocab_size})")
    return ids


def load_sample(folder: Path, tokenizer: Any, vocab_size: int, max_tokens: int = SAMPLE_TOKENS) -> tuple[list[int], str]:
    """The token ids the quality check scores for the version in `folder`, and where they came from.

    `tokenizer` is a `tokenizers.Tokenizer` (the version's own). A malformed published sample is logged and replaced by
    the shipped text, so a bad sample file never keeps a version from loading."""
    path = Path(folder) / SAMPLE_FILE
    if path.is_file():
        try:
            return _read_sample_file(path, vocab_size)[:max_tokens], SAMPLE_FILE
        except ValueError as e:
            log.warning("%s; checking precision on the shipped text sample instead", e)
    text = resources.files("textmill.serving").joinpath(SHIPPED_SAMPLE).read_text(encoding="utf-8")
    return tokenizer.encode(text, add_special_tokens=False).ids[:max_tokens], "shipped text"


def select(model: nn.Module, requested: str, device: torch.device, sample: tuple[list[int], str] | None, *,
           tolerance: float = DEFAULT_TOLERANCE) -> tuple[nn.Module, PrecisionReport]:
    """For `auto`, the candidate of `plan(requested, device)` with the fastest measured decode (`decode_speed`) among
    those whose loss on `sample` (token ids, where they came from) is within `tolerance` (relative) of the fp32
    `model`'s; for an explicit request, the first candidate of its chain that passes. Returns (model, report). `model` is fp32 on `device`, in
    eval mode; it is returned unchanged when float32 wins, else a converted copy is (the fp32 one can then be freed).
    On GPU, or when float32 is the only candidate, no check runs and `sample` may be None. Raises ValueError for a bad
    `requested` or `tolerance`, or a missing/too short sample."""
    if tolerance < 0 or not math.isfinite(tolerance):
        raise ValueError(f"precision tolerance must be a finite number >= 0, got {tolerance}")
    chain = plan(requested, device)
    report = PrecisionReport(requested=requested, chosen=chain[0], device=str(device), tolerance=tolerance)
    if device.type != "cpu" or chain == ["float32"]:
        return model.to(FLOAT_DTYPES[chain[0]]), report
    if sample is None:
        raise ValueError(f"serving.dtype={requested}: choosing among {chain} on CPU needs a sample to score")
    ids = torch.tensor(sample[0], dtype=torch.long)
    window = min(int(model.config.n_positions), 256)
    report.sample, report.sample_tokens = sample[1], int(ids.numel())
    report.reference_loss = sequence_loss(model, ids, window)
    if not math.isfinite(report.reference_loss) or report.reference_loss <= 0:
        raise ValueError(f"the fp32 model's loss on the quality sample ({sample[1]}) is {report.reference_loss}: "
                         f"broken weights? (the version is not loaded)")
    best: tuple[float, str, nn.Module, float, float] | None = None   # (decode tok/s, precision, model, loss, delta)
    for precision in chain:
        if best is not None and requested != "auto":
            break       # an explicit request takes the first candidate that passes
        if precision == "int8_body" and best is not None and best[1] == "int8":
            continue    # int8_body only stands in for an int8 that failed the check
        candidate = to_precision(model, precision)
        loss = sequence_loss(candidate, ids, window) if candidate is not model else report.reference_loss
        delta = (loss - report.reference_loss) / report.reference_loss
        if not abs(delta) <= tolerance and precision != "float32":   # a NaN loss fails too
            report.rejected[precision] = delta
            log.warning("precision %s rejected: loss %.5f vs fp32 %.5f (%+.3f%%, tolerance %.3f%%); trying the next",
                        precision, loss, report.reference_loss, 100 * delta, 100 * tolerance)
            continue
        speed = 0.0
        if requested == "auto":   # an explicit request is not timed (it stops at the first candidate that passes)
            speed = decode_speed(for_serving(candidate, precision))
            report.decode_tokens_per_s[precision] = round(speed, 2)
        if best is None or speed > best[0]:
            best = (speed, precision, candidate, loss, delta)
        del candidate
    _, report.chosen, chosen, report.loss, report.loss_delta = best
    log.info("precision %s chosen (requested %s): loss %.5f vs fp32 %.5f (%+.4f%%) on %d tokens of %s; decode "
             "tokens/s measured %s", report.chosen, requested, report.loss, report.reference_loss,
             100 * report.loss_delta, report.sample_tokens, report.sample, report.decode_tokens_per_s or "-")
    return chosen, report


@torch.inference_mode()
def decode_speed(model: nn.Module, prompt_tokens: int = 16, steps: int = 4) -> float:
    """Single-sequence decode speed (tokens/s) of a causal LM: the fastest of `steps` one-token steps on a KV cache
    after a `prompt_tokens` prefill. The fastest step, not the mean, so that a burst of other work on a shared machine
    does not decide the precision."""
    import time

    device = next(model.parameters()).device
    out = model(input_ids=torch.zeros((1, prompt_tokens), dtype=torch.long, device=device), use_cache=True)
    past, token, fastest = out.past_key_values, torch.zeros((1, 1), dtype=torch.long, device=device), float("inf")
    for _ in range(steps):
        started = time.perf_counter()
        past = model(input_ids=token, past_key_values=past, use_cache=True).past_key_values
        fastest = min(fastest, time.perf_counter() - started)
    return 1.0 / fastest


def load_model(folder: Path, requested: str, device: torch.device, tokenizer: Any, *,
               tolerance: float = DEFAULT_TOLERANCE) -> tuple[nn.Module, PrecisionReport]:
    """Load the HF folder in fp32 on `device`, then `select` its precision (see there); returns (model, report).

    On GPU the weights are loaded straight in the chosen float dtype (no fp32 copy, no check), as before."""
    from transformers import AutoModelForCausalLM

    chain = plan(requested, device)
    if device.type != "cpu" or chain == ["float32"]:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=FLOAT_DTYPES[chain[0]]).to(device).eval()
        return select(model, requested, device, None, tolerance=tolerance)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).to(device).eval()
    sample = load_sample(folder, tokenizer, int(model.config.vocab_size))
    return select(model, requested, device, sample, tolerance=tolerance)
