"""A lean GPT-2 forward pass for serving: the same weights as a transformers `GPT2LMHeadModel`, called with far fewer
Python-level operations per token, on a preallocated KV cache that is written in place instead of concatenated.

Why: at batch 1 on a 2-core CPU, an int8 GPT-2-medium decode step reads ~355 MB of weights (~12 ms at 29 GB/s), while
transformers' generic forward spends ~6 ms of interpreter and dispatch overhead per step on 24 layers, and its
`DynamicCache` copies every layer's whole K/V (`torch.cat`) on every step (31 MB per step for one 160-token
sequence; 8x that at batch 8). This module keeps only what a decode step needs: per layer one layer norm, the fused
QKV projection, an in-place K/V write, `scaled_dot_product_attention`, the output projection, the MLP. The projections
are the model's own modules (`nn.Linear` after `serving.precision.conv1d_to_linear`, or `serving.precision.Int8Linear`),
so the quantization the loss check scored is exactly what runs. Measured in bench/RESULTS.md.

Used for reduced precisions on CPU (`serving.precision` hands its model here); float32 keeps transformers' forward,
which is the reference greedy output is tested against. Logic follows transformers'
`models/gpt2/modeling_gpt2.py` (GPT2Attention/GPT2MLP/GPT2Block) and nanoGPT's `model.py`.

The call signature is the subset of transformers' that `serving.engines.batching` uses, so the engine drives either:
`runtime(input_ids, attention_mask, position_ids, past_key_values=None, use_cache=True, logits_to_keep=0)`, plus
`prefill={...}`: a group of arriving sequences prefilled in the same pass as a decode step (`prefills_with_decode`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["GPT2Runtime", "KVCache", "for_serving", "supports"]

_GELU_TANH = {"gelu_new", "gelu_pytorch_tanh", "gelu_fast"}
CAUSAL = torch.ones(())   # the attention-mask value for "causal, nothing padded": sdpa's is_causal path


def supports(model: nn.Module) -> bool:
    """True for a transformers GPT-2 LM whose options this runtime implements (plain pre-LN blocks, tanh GELU, no
    cross-attention, no per-layer attention scaling or upcasting); anything else keeps transformers' forward."""
    config = getattr(model, "config", None)
    return (getattr(config, "model_type", None) == "gpt2" and hasattr(model, "transformer")
            and config.activation_function in _GELU_TANH and not config.add_cross_attention
            and not config.scale_attn_by_inverse_layer_idx and not config.reorder_and_upcast_attn
            and config.scale_attn_weights)


def for_serving(model: nn.Module, precision: str) -> Any:
    """What serves `model` (already converted to `precision`, a `serving.precision` name): a `GPT2Runtime` over it
    for a reduced precision of a supported GPT-2 on CPU, else `model` itself (float32 stays transformers' forward,
    the reference greedy output is tested against; GPU and other architectures keep it too)."""
    if precision == "float32" or not supports(model) or next(model.parameters()).device.type != "cpu":
        return model
    from textmill.serving.precision import conv1d_to_linear

    conv1d_to_linear(model)   # bit-identical views; an Int8Linear model has no Conv1D left
    return GPT2Runtime(model)


class _LayerCache:
    """One layer's K and V buffers [row capacity, heads, capacity, head_dim]; `keys`/`values` are views of the filled
    part [batch, heads, length, head_dim]."""

    def __init__(self, k: torch.Tensor, v: torch.Tensor, owner: "KVCache") -> None:
        self.k, self.v, self._owner = k, v, owner

    @property
    def keys(self) -> torch.Tensor:
        return self.k[:self._owner.batch, :, :self._owner.length]

    @property
    def values(self) -> torch.Tensor:
        return self.v[:self._owner.batch, :, :self._owner.length]


class KVCache:
    """Preallocated KV cache for a batch of left-padded rows: every layer holds K and V buffers of shape
    [row capacity, heads, capacity, head_dim]; rows [0, batch) and positions [0, length) are in use. A forward pass
    writes its new positions in place; when they do not fit, capacity doubles (bounded by `max_length`), so a sequence
    of n tokens costs O(n) copies in total instead of O(n^2) with a concatenating cache. Rows that end are compacted
    in place and rows that join are written below the others (`merge`), so continuous batching moves only the rows
    that change, not the whole cache."""

    def __init__(self, n_layer: int, batch: int, heads: int, head_dim: int, capacity: int, max_length: int,
                 dtype: torch.dtype, device: torch.device) -> None:
        self.length, self.max_length, self.batch = 0, max_length, batch
        shape = (max(1, batch), heads, max(1, min(capacity, max_length)), head_dim)
        self.layers = [_LayerCache(torch.empty(shape, dtype=dtype, device=device),
                                   torch.empty(shape, dtype=dtype, device=device), self) for _ in range(n_layer)]

    @property
    def capacity(self) -> int:
        return self.layers[0].k.shape[2]

    @property
    def row_capacity(self) -> int:
        return self.layers[0].k.shape[0]

    def _reallocate(self, rows: int, capacity: int) -> None:
        for layer in self.layers:
            for name in ("k", "v"):
                old = getattr(layer, name)
                new = old.new_empty((rows, old.shape[1], capacity, old.shape[3]))
                new[:self.batch, :, :self.length] = old[:self.batch, :, :self.length]
                setattr(layer, name, new)

    def reserve(self, new_tokens: int, rows: int | None = None) -> None:
        """Make room for `new_tokens` more positions and `rows` rows (default: the rows in use), doubling what is
        short (positions up to `max_length`)."""
        needed, rows = self.length + new_tokens, self.batch if rows is None else rows
        if needed <= self.capacity and rows <= self.row_capacity:
            return
        capacity = self.capacity if needed <= self.capacity else min(max(needed, 2 * self.capacity),
                                                                      max(needed, self.max_length))
        self._reallocate(max(rows, 2 * self.row_capacity) if rows > self.row_capacity else self.row_capacity,
                         capacity)

    def batch_select_indices(self, index: torch.Tensor) -> None:
        """Keep only the rows `index` (1-D int64), in that order (compacted in place)."""
        n, end = int(index.numel()), self.length
        for layer in self.layers:
            layer.k[:n, :, :end] = layer.k[index, :, :end]
            layer.v[:n, :, :end] = layer.v[index, :, :end]
        self.batch = n

    def trim_left(self, positions: int) -> None:
        """Drop the first `positions` positions of every row (padding no row attends to any more)."""
        if positions <= 0:
            return
        keep = self.length - positions
        for layer in self.layers:
            for name in ("k", "v"):
                buf = getattr(layer, name)
                buf[:self.batch, :, :keep] = buf[:self.batch, :, positions:self.length].clone()
        self.length = keep

    def merge(self, other: "KVCache", width: int) -> None:
        """Append `other`'s rows below this cache's, both left-padded with zeros to `width` filled positions (the
        attention mask hides the padding; zeros, not stale memory, so that masked values cannot be NaN)."""
        n, m = self.batch, other.batch
        self.reserve(width - self.length, rows=n + m)
        shift = width - self.length
        for mine, theirs in zip(self.layers, other.layers):
            for name in ("k", "v"):
                buf, src = getattr(mine, name), getattr(theirs, name)
                if shift > 0:   # the newcomers are longer: move the running rows right
                    buf[:n, :, shift:width] = buf[:n, :, :self.length].clone()
                    buf[:n, :, :shift] = 0
                buf[n:n + m, :, width - other.length:width] = src[:m, :, :other.length]
                buf[n:n + m, :, :width - other.length] = 0
        self.batch, self.length = n + m, width


@dataclass
class RuntimeOutput:
    """What a forward pass returns: `logits` [batch, kept positions, vocab] (fp32), the updated cache, and the
    output of the `prefill` group run in the same pass, if any."""

    logits: torch.Tensor
    past_key_values: KVCache
    prefill: "RuntimeOutput | None" = None


@dataclass
class _Group:
    """One group of rows in a forward pass: its new tokens, positions, cache and attention mask."""

    ids: torch.Tensor
    pos: torch.Tensor
    batch: int
    new: int
    past: int
    end: int
    cache: KVCache
    mask: torch.Tensor | None
    keep: int
    starts: list[int] | None = None   # per row, its first real position, when rows are left-padded differently
    starts_t: torch.Tensor | None = None   # the same as int64 [B], for the native kernel
    native: Any = None                # serving.kernels.Int8Kernel whose decode attention this group uses, or None

    def attend(self, layer: "_LayerCache", q: torch.Tensor) -> torch.Tensor:
        """Attention of this group's queries `q` [B, H, T, D] over its cache; returns [B, H, T, D].

        Left-padded rows are attended one by one over their real positions only (a narrow view of the cache, no
        mask), so each row computes exactly what it would alone: masked attention over a batch's padded keys
        differs in the last bits with the padding, and int8's per-token quantization of the next layer can magnify
        that into a different sampled token (1 in 94 request pairs before this). Rows without padding are one
        batched call, which sdpa computes row by row anyway."""
        rows, end = self.batch, self.end
        if self.native is not None and (self.starts is not None or self.mask is None or self.mask is CAUSAL):
            out = self.native.attention(q, layer.k[:rows, :, :end], layer.v[:rows, :, :end], self.starts_t)
            if out is not None:   # one call for every row, head and query, each over its own positions, causal
                return out
        if self.starts is None and self.new == 1 and self.mask is None:   # decode, no padding: same math as a row
            return _decode_attention(q, layer.k[:rows, :, :end], layer.v[:rows, :, :end])
        if self.starts is None:
            causal = self.mask is CAUSAL
            return F.scaled_dot_product_attention(q, layer.k[:rows, :, :end], layer.v[:rows, :, :end],
                                                  attn_mask=None if causal else self.mask, is_causal=causal)
        if self.new == 1:   # decode: each row's one query over its real keys
            return torch.cat([_decode_attention(q[i:i + 1], layer.k[i:i + 1, :, start:end],
                                                layer.v[i:i + 1, :, start:end]) for i, start in enumerate(self.starts)])
        out = q.new_zeros(q.shape)   # prefill from an empty cache: the row's real positions, causal among themselves
        for i, start in enumerate(self.starts):
            out[i:i + 1, :, start:] = F.scaled_dot_product_attention(
                q[i:i + 1, :, start:], layer.k[i:i + 1, :, start:end], layer.v[i:i + 1, :, start:end], is_causal=True)
        return out


def _decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """softmax(q kᵀ / sqrt(D)) v for one query per row: q [B, H, 1, D], keys/values [B, H, L, D] -> [B, H, 1, D].
    Three batched matmul-sized ops instead of an sdpa call per row (~90 µs of dispatch each on the bench machine);
    a row's result does not depend on the other rows of the batch (the matmuls run per batch element)."""
    scores = torch.matmul(q, keys.transpose(-1, -2)).mul_(q.shape[-1] ** -0.5)
    return torch.matmul(torch.softmax(scores, dim=-1), values)


def _direct(module: nn.Module, epilogue: str | None = None) -> Any:
    """`module`'s forward without nn.Module.__call__ (no hooks are used here), followed by `epilogue`: "residual":
    f(x, r) = r + module(x); "gelu": f(x) = gelu_tanh(module(x)). Fused into the kernel where the module offers it
    (`Int8Linear.fused`), else composed from torch ops."""
    fused = getattr(module, "fused", None)
    call = fused(epilogue) if callable(fused) else None
    if call is not None:
        return call
    if epilogue == "residual":
        return lambda x, residual: residual + module.forward(x)
    if epilogue == "gelu":
        return lambda x: F.gelu(module.forward(x), approximate="tanh")
    return module.forward


class GPT2Runtime:
    """Serve-time forward pass over the modules of a transformers GPT-2 LM (see the module docstring).

    `model` is a `GPT2LMHeadModel` in eval mode whose Conv1D layers were already turned into Linear-like modules
    (`serving.precision.conv1d_to_linear` / `quantize_int8`), or any of its precision variants. Only inference: no
    dropout, no gradients. `config` and `parameters()` are the wrapped model's, so engines read device, dtype and
    sizes the same way for both."""

    prefills_with_decode = True   # __call__ takes a `prefill` group beside a decode step (serving.engines.batching)

    def __init__(self, model: nn.Module, *, headroom: int = 64, attention_kernel: Any = "auto") -> None:
        """`attention_kernel`: a `serving.kernels.Int8Kernel` whose causal `attention` runs decode steps and prefills
        (fp32 activations only), None for torch's ops, "auto" for the native VNNI build where this machine has it:
        one call per layer instead of three torch ops (decode) or an sdpa call per left-padded row (prefill), whose
        dispatch cost more than their arithmetic, and parallel where sdpa ran inline on the engine thread."""
        if not supports(model):
            raise ValueError("GPT2Runtime runs plain GPT-2 models only")
        from transformers.pytorch_utils import Conv1D

        if any(isinstance(m, Conv1D) for m in model.modules()):
            raise ValueError("convert GPT-2's Conv1D layers first (serving.precision.conv1d_to_linear)")
        self.model, self.config = model, model.config
        t = model.transformer
        self.wte, self.wpe, self.ln_f, self.lm_head = t.wte.weight, t.wpe.weight, t.ln_f, model.lm_head
        self._lm_head = _direct(model.lm_head)
        self.n_head = int(model.config.n_head)
        self.head_dim = int(model.config.n_embd) // self.n_head
        self.eps = float(model.config.layer_norm_epsilon)
        self.n_ctx = int(model.config.n_positions)
        self.headroom = headroom
        # the projections after attention and the MLP add their skip connection, the MLP's first one its GELU, in the
        # native kernel's output pass where the model has it (`Int8Linear.fused`), else with torch's ops
        self.blocks = [(b.ln_1.weight, b.ln_1.bias, _direct(b.attn.c_attn), _direct(b.attn.c_proj, "residual"),
                        b.ln_2.weight, b.ln_2.bias, _direct(b.mlp.c_fc, "gelu"), _direct(b.mlp.c_proj, "residual"))
                       for b in t.h]
        self.dtype = t.ln_f.weight.dtype     # activations between the projections
        if attention_kernel == "auto":
            from textmill.serving.kernels import fast_int8_kernel

            attention_kernel = fast_int8_kernel() if t.ln_f.weight.device.type == "cpu" else None
        self.attention_kernel = attention_kernel if self.dtype == torch.float32 else None

    def parameters(self) -> Iterator[torch.nn.Parameter]:
        return self.model.parameters()

    def prepare_thread(self) -> None:
        """Called once by the engine on the thread that will run this model. With the native kernels (an int8 model
        on a VNNI CPU), that thread's torch ops run inline: the kernels (97 projections and 24 attentions of a
        GPT-2-medium step) have their own thread pool, and torch's OpenMP helpers spinning beside it cost a decode
        step 31-33 ms instead of 18 on the 2-core bench VM (bench/RESULTS.md)."""
        from textmill.serving.kernels import kernel_threads, run_torch_inline

        native = any(getattr(m, "kernel", None) == "native" for m in self.model.modules())
        if native or self.attention_kernel is not None:
            kernel_threads()   # fixed from torch's count before this thread's count drops to 1
            run_torch_inline()

    def eval(self) -> "GPT2Runtime":
        return self

    @torch.inference_mode()
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 position_ids: torch.Tensor | None = None, past_key_values: KVCache | None = None,
                 use_cache: bool = True, logits_to_keep: int = 0, prefill: dict[str, Any] | None = None,
                 **_: Any) -> RuntimeOutput:
        """One forward pass. `input_ids` [B, T] int64 (new tokens only); `attention_mask` [B, past + T] (1 = real
        token, 0 = left padding), default all ones; `position_ids` [B, T], default past..past+T-1;
        `past_key_values` a KVCache from an earlier call (None starts one, sized T + headroom); `logits_to_keep`:
        0 = logits for every position, k = the last k. Returns RuntimeOutput(logits fp32 [B, kept, vocab], cache).

        `prefill`: a second, independent group of new sequences (keys `input_ids`, `attention_mask`, `position_ids`,
        `logits_to_keep`, as above; no cache) run in the same pass: the projections see both groups' tokens as one
        matrix, so a decode step and the prefill of arriving sequences read the weights once instead of twice
        (vLLM's chunked prefill mixes prefill and decode tokens in one batch for the same reason). Each group attends
        only to its own cache. Its result is `RuntimeOutput.prefill`.
        Raises ValueError when a group's past + T exceeds the model's context (n_positions)."""
        groups = [self._group(input_ids, attention_mask, position_ids, past_key_values, logits_to_keep)]
        if prefill is not None:
            groups.append(self._group(prefill["input_ids"], prefill.get("attention_mask"),
                                      prefill.get("position_ids"), None, prefill.get("logits_to_keep", 0)))
        sizes = [g.batch * g.new for g in groups]
        x = torch.cat([(F.embedding(g.ids, self.wte) + F.embedding(g.pos, self.wpe)).reshape(n, -1)
                       for g, n in zip(groups, sizes)]).to(self.dtype)            # [tokens of all groups, C]
        c, h, d = x.shape[-1], self.n_head, self.head_dim
        for i, (w1, b1, c_attn, attn_proj, w2, b2, c_fc, mlp_proj) in enumerate(self.blocks):
            qkv = c_attn(F.layer_norm(x, (c,), w1, b1, self.eps)).to(self.dtype)
            heads = []
            for g, part in zip(groups, qkv.split(sizes)):
                layer, rows = g.cache.layers[i], g.batch
                q, k, v = part.view(rows, g.new, 3, h, d).permute(2, 0, 3, 1, 4)   # each [B, H, T, D]
                layer.k[:rows, :, g.past:g.end] = k
                layer.v[:rows, :, g.past:g.end] = v
                y = g.attend(layer, q)
                heads.append(y.transpose(1, 2).reshape(g.batch * g.new, c))
            x = attn_proj(heads[0] if len(heads) == 1 else torch.cat(heads), x).to(self.dtype)   # x + proj(...)
            m = c_fc(F.layer_norm(x, (c,), w2, b2, self.eps))                                    # GELU fused
            x = mlp_proj(m, x).to(self.dtype)
        kept = []
        for g, part in zip(groups, x.split(sizes)):
            g.cache.length = g.end
            part = part.view(g.batch, g.new, c)
            kept.append(part[:, -g.keep:] if g.keep else part)
        # the output projection once for every group's kept positions
        logits = self._lm_head(self.ln_f(torch.cat([k.reshape(-1, c) for k in kept]))).float()
        outputs = [RuntimeOutput(logits=part.view(k.shape[0], k.shape[1], -1), past_key_values=g.cache)
                   for g, k, part in zip(groups, kept, logits.split([k.shape[0] * k.shape[1] for k in kept]))]
        if prefill is not None:
            outputs[0].prefill = outputs[1]
        return outputs[0]

    def _group(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None,
               position_ids: torch.Tensor | None, cache: KVCache | None, keep: int) -> "_Group":
        batch, new = input_ids.shape
        past = cache.length if cache is not None else 0
        if cache is not None and cache.batch != batch:
            raise ValueError(f"{batch} rows of input for a cache of {cache.batch} rows")
        if past + new > self.n_ctx:
            raise ValueError(f"{past + new} positions exceed the model's context of {self.n_ctx}")
        if cache is None:
            cache = KVCache(len(self.blocks), batch, self.n_head, self.head_dim, new + self.headroom, self.n_ctx,
                            self.dtype, input_ids.device)
        cache.reserve(new)
        if position_ids is None:
            position_ids = torch.arange(past, past + new, device=input_ids.device).expand(batch, new)
        starts = self._row_starts(attention_mask, past, new)
        # rows attended one by one need no mask tensor
        mask = None if starts is not None else self._attention_mask(attention_mask, batch, past, new, input_ids.device)
        starts_t = torch.tensor(starts, dtype=torch.int64) if starts is not None and self.attention_kernel else None
        return _Group(input_ids, position_ids, batch, new, past, past + new, cache, mask, keep, starts, starts_t,
                      self.attention_kernel)

    @staticmethod
    def _row_starts(attention_mask: torch.Tensor | None, past: int, new: int) -> list[int] | None:
        """Each row's first real position when the rows are left-padded (zeros, then ones) by different amounts and
        the step is a decode step or a prefill from an empty cache; None otherwise (no padding: one batched call;
        any other mask shape: the explicit mask)."""
        keys = past + new
        if attention_mask is None or (new > 1 and past > 0):
            return None
        mask = attention_mask[:, -keys:]
        real = mask.sum(dim=-1)
        if bool((real == keys).all()):
            return None
        starts = keys - real
        ones_after_start = torch.arange(keys, device=mask.device)[None, :] >= starts[:, None]
        if not torch.equal(mask.bool(), ones_after_start) or bool((real == 0).any()):
            return None   # not plain left padding (or an all-padding row): keep the explicit mask
        return starts.tolist()

    @staticmethod
    def _attention_mask(attention_mask: torch.Tensor | None, batch: int, past: int, new: int,
                        device: torch.device) -> torch.Tensor | None:
        """Boolean [B, 1, T, past + T] (True = may attend): causal within the new tokens, padding keys hidden. A
        padding query (left padding of a prefill) attends to itself only, so no row is all -inf (its output is
        never used). None when nothing is masked (one new token, no padding); CAUSAL for a prefill without padding
        (sdpa's `is_causal` kernel, no mask tensor)."""
        keys = past + new
        if attention_mask is None or bool(attention_mask.all()):
            if new == 1:
                return None
            if past == 0:
                return CAUSAL
            key_ok = torch.ones((batch, keys), dtype=torch.bool, device=device)
        else:
            key_ok = attention_mask[:, -keys:].bool()
        allowed = key_ok[:, None, None, :].expand(batch, 1, new, keys)
        if new > 1:
            query_pos = torch.arange(past, keys, device=device)
            causal = torch.arange(keys, device=device)[None, :] <= query_pos[:, None]          # [T, keys]
            self_only = torch.arange(keys, device=device)[None, :] == query_pos[:, None]
            allowed = (allowed & causal) | self_only
        return allowed

