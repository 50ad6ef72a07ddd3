"""The continuous-batching engine (`serving.engine: batching`, the default): one loaded transformers model version and
its worker thread that collects waiting sequences and steps them together on a KV cache.

A batch starts from whatever is queued (up to max_batch_size); prompts are left-padded with an attention mask and
explicit position ids, every sequence samples with its own parameters and its own seeded `torch.Generator` (so its text
does not depend on what it was batched with), and finished or cancelled rows are dropped from the cache as they end.
Sequences that arrive while a batch runs are prefilled on their own and join it between decode steps (their KV cache
left-padded to the batch's length), so a short request does not wait for the longest one in front of it.
The decode loop deals in token ids only: text, stop strings and logprob formatting happen outside it (see
serving/engines/base.py).
"""

from __future__ import annotations

import gc
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from textmill.serving.engines.base import (EngineError, EngineHealth, EngineSpec, LoadError, ModelEngine, OutOfMemory,
                                  QueueFull, Retired, Sequence, TokenStep)
from textmill.serving.loading import load_model
from textmill.serving.sampling import sample
from textmill.system import release_memory

log = logging.getLogger(__name__)

_STOP = object()


class BatchingEngine(ModelEngine):
    """A model version in memory plus the thread that runs its batches. `close()` drains the queue, then frees memory."""

    def __init__(self, name: str, version: str, folder: str, model: Any, tokenizer: Any, manifest: dict,
                 *, max_batch_size: int, max_queue: int, max_prefill_tokens: int = 64, metrics: Any = None,
                 chat_template: str | None = None) -> None:
        self.name, self.version, self.folder, self.manifest = name, version, folder, manifest
        self.model, self.tokenizer, self.chat_template = model, tokenizer, chat_template
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.n_ctx = int(model.config.n_positions)
        self.eot_id = int(model.config.eos_token_id)
        self.vocab_size = int(model.config.vocab_size)
        self.max_batch_size, self.max_queue, self.max_prefill_tokens = max_batch_size, max_queue, max_prefill_tokens
        self.metrics = metrics
        self.last_ok = 0.0            # monotonic time of the last successful forward pass
        self._queue: queue.Queue = queue.Queue()
        self._pending: deque[Sequence] = deque()   # taken off the queue by the worker, not yet admitted to a batch
        self._submit_lock = threading.Lock()
        self._closed = False
        self._stopping = False        # the worker saw close(): finish what is running and queued, then free
        self._thread: threading.Thread | None = None

    @classmethod
    def load(cls, spec: EngineSpec, metrics: Any = None) -> "BatchingEngine":
        """Load `spec.folder` with `serving.loading.load_model`; LoadError on any failure."""
        try:
            model, tok, report = load_model(spec.folder, spec.device, spec.dtype, tolerance=spec.precision_tolerance)
        except Exception as e:  # any failure to load (bad weights, bad tokenizer, OOM) keeps the old version serving
            raise LoadError(f"{type(e).__name__}: {e}") from e
        # The Rust tokenizer underneath: encode (API threads) and decode (engine thread) share it without locks.
        engine = cls(spec.name, spec.version, str(spec.folder), model, tok.backend_tokenizer, spec.manifest,
                     max_batch_size=spec.max_batch_size, max_queue=spec.max_queue,
                     max_prefill_tokens=spec.max_prefill_tokens, metrics=metrics,
                     chat_template=getattr(tok, "chat_template", None) or None)
        engine.precision_report = report
        return engine

    def warm_up(self) -> None:
        """A greedy 2-token generation from EOT run on the calling thread (the worker has not started)."""
        from textmill.serving.generation import probe_generation

        probe = probe_generation(self, max_tokens=2)
        self.run_batch([probe])
        if probe.error is not None or probe.finish_reason is None:
            raise LoadError(f"warm-up generation failed: {probe.error}")

    # lifecycle
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=f"batcher-{self.name}-{self.version}", daemon=True)
        self._thread.start()

    def close(self) -> None:
        """Stop taking work; queued and running sequences still finish, then the weights are freed."""
        with self._submit_lock:
            self._closed = True
            self._queue.put(_STOP)

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None:
            self._thread.join(timeout)

    def health(self) -> EngineHealth:
        alive = self._thread is not None and self._thread.is_alive()
        detail = "" if alive else ("not started" if self._thread is None else "worker thread has exited")
        return EngineHealth(alive, self.last_ok, self.queue_depth, detail)

    def stats(self) -> dict[str, Any]:
        dtype = self.precision_report.chosen if self.precision_report is not None else str(self.dtype).replace("torch.", "")
        return {"engine": "batching", "device": str(self.device), "dtype": dtype,
                "queue_depth": self.queue_depth, "max_batch_size": self.max_batch_size,
                "max_prefill_tokens": self.max_prefill_tokens,
                "precision": self.precision_report.as_dict() if self.precision_report is not None else None}

    def submit(self, gen: Sequence) -> None:
        with self._submit_lock:  # nothing may land behind the stop marker, where no one would run it
            if self._closed:
                raise Retired(f"{self.name} {self.version} was replaced")
            if self.queue_depth >= self.max_queue:
                raise QueueFull(f"model {self.name!r} has {self.queue_depth} requests waiting "
                                f"(max_queue={self.max_queue})")
            self._queue.put(gen)
        self._gauge_queue()

    @property
    def queue_depth(self) -> int:
        """Sequences waiting for a batch (queued or taken by the worker but not yet admitted)."""
        return self._queue.qsize() + len(self._pending)

    def _gauge_queue(self) -> None:
        if self.metrics is not None:
            self.metrics.queue_depth.labels(self.name).set(self.queue_depth)

    def _take_waiting(self, limit: int, block: bool = False) -> list[Sequence]:
        """Up to `limit` waiting, not cancelled sequences whose prompts add up to at most `max_prefill_tokens` (the
        first one always fits: one prompt is admitted per step however long); notes the stop marker instead of
        returning it. A sequence that does not fit stays first in line for the next step.

        The budget is TGI's `max_batch_prefill_tokens` / vLLM's `max_num_batched_tokens` idea: a burst of arrivals is
        prefilled a few prompts per decode step instead of all at once, so the first of them stream their first token
        after one short prefill each (time to first token falls) and the running streams keep getting tokens
        between those prefills."""
        taken: list[Sequence] = []
        tokens = 0
        while len(taken) < limit:
            if not self._pending:
                if self._stopping:
                    break
                try:
                    item = self._queue.get(block=block and not taken)
                except queue.Empty:
                    break
                if item is _STOP:
                    self._stopping = True
                    continue
                self._pending.append(item)
            g = self._pending[0]
            if self._drop_if_cancelled(g):
                self._pending.popleft()
                continue
            if taken and tokens + len(g.prompt_ids) > self.max_prefill_tokens:
                break
            taken.append(self._pending.popleft())
            tokens += len(g.prompt_ids)
        self._gauge_queue()
        return taken

    def _run(self) -> None:
        prepare = getattr(self.model, "prepare_thread", None)   # e.g. GPT2Runtime: torch ops inline on this thread
        if prepare is not None:
            prepare()
        while not self._stopping or self._pending:
            batch = self._take_waiting(self.max_batch_size, block=True)
            if batch:
                self.run_batch(batch)
        self._free()

    def _free(self) -> None:
        log.info("model %s version %s unloaded", self.name, self.version)
        self.model = None
        release_memory()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    @staticmethod
    def _drop_if_cancelled(g: Sequence) -> bool:
        if g.cancelled:
            g.finish("cancelled")
        return g.cancelled

    # generation
    def run_batch(self, gens: list[Sequence]) -> None:
        """Generate every sequence in `gens` to its end; failures end that batch's sequences with an error."""
        started, taken = time.monotonic(), list(gens)
        try:
            self._generate(taken)  # appends the sequences that join while it runs
        except (torch.OutOfMemoryError, MemoryError) as e:
            log.error("model %s version %s: out of memory in a batch of %d: %s", self.name, self.version, len(taken), e)
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for g in taken:
                g.fail(OutOfMemory(f"out of memory while generating (batch of {len(taken)}); retry the request"))
            if self.metrics is not None:
                self.metrics.oom_total.labels(self.name).inc()
        except Exception as e:  # a bug must not kill the worker thread; every waiting client gets a 500
            log.exception("model %s version %s: generation failed", self.name, self.version)
            for g in taken:
                g.fail(EngineError(f"generation failed: {type(e).__name__}: {e}"))
        if self.metrics is not None:
            self.metrics.batch_seconds.labels(self.name).observe(time.monotonic() - started)

    def _forward(self, gens: list[Sequence], **inputs: Any) -> Any:
        """One model call for the rows `gens` (a subclass may wrap it: tests add delays or injected failures here)."""
        out = self.model(**inputs, use_cache=True)
        self.last_ok = time.monotonic()
        return out

    def _prefill_inputs(self, gens: list[Sequence]) -> dict[str, torch.Tensor]:
        width = max(len(g.prompt_ids) for g in gens)
        ids = torch.full((len(gens), width), self.eot_id, dtype=torch.long)
        mask = torch.zeros((len(gens), width), dtype=torch.long)
        for row, g in enumerate(gens):
            n = len(g.prompt_ids)
            ids[row, width - n:] = torch.tensor(g.prompt_ids, dtype=torch.long)
            mask[row, width - n:] = 1
        # Left padding shifts tokens right; positions must count real tokens only or the outputs depend on the batch.
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {"input_ids": ids.to(self.device), "attention_mask": mask.to(self.device),
                "position_ids": positions.to(self.device)}

    @torch.inference_mode()
    def _generate(self, gens: list[Sequence]) -> None:
        """Decode until every row has ended; sequences that arrive meanwhile join between steps (continuous batching).

        With a model that takes a `prefill` group beside a decode step (`prefills_with_decode`, serving.gpt2_runtime)
        the arrivals are prefilled in the same forward pass as the running rows' next step (one read of the
        weights); otherwise they are prefilled on their own first."""
        mixed = getattr(self.model, "prefills_with_decode", False)
        run = self._prefill(gens)
        tokens = self._sample(run)
        while run.rows:
            room = self.max_batch_size - len(run.rows)
            joining = self._take_waiting(room) if room > 0 else []
            gens.extend(joining)
            if joining and not mixed:
                tokens = self._merge(run, tokens, self._prefill(joining), None)
                joining = []
            run.mask = torch.cat([run.mask, run.mask.new_ones((len(run.rows), 1))], dim=1)
            step = {"input_ids": torch.tensor(tokens, device=self.device)[:, None], "attention_mask": run.mask,
                    "position_ids": run.next_pos[:, None], "past_key_values": run.cache}
            if joining:
                inputs, scoring = self._prefill_inputs(joining), self._scoring(joining)
                out = self._forward(run.rows + joining, **step,
                                    prefill={**inputs, "logits_to_keep": 0 if scoring else 1})
                new = self._new_rows(joining, inputs, out.prefill, scoring)
            else:
                out = self._forward(run.rows, **step)
            run.cache, run.logits, run.next_pos = out.past_key_values, out.logits[:, -1, :], run.next_pos + 1
            tokens = self._sample(run)
            if joining:
                tokens = self._merge(run, tokens, new, None)

    @staticmethod
    def _scoring(gens: list[Sequence]) -> bool:
        return any(g.params.prompt_logprobs for g in gens)

    def _prefill(self, gens: list[Sequence]) -> "_Rows":
        inputs, scoring = self._prefill_inputs(gens), self._scoring(gens)
        # Only the last position's logits are needed to sample; the whole prompt's only when a row scores its prompt.
        out = self._forward(gens, **inputs, logits_to_keep=0 if scoring else 1)
        return self._new_rows(gens, inputs, out, scoring)

    def _new_rows(self, gens: list[Sequence], inputs: dict[str, torch.Tensor], out: Any, scoring: bool) -> "_Rows":
        """The prefilled rows of `gens` (their prompts scored when asked), ready to sample their first token."""
        if scoring:
            self._score_prompts(gens, out.logits)
        return _Rows(rows=list(gens), rngs=[torch.Generator(device=self.device).manual_seed(g.params.seed) for g in gens],
                     counts=[0] * len(gens), cache=out.past_key_values, logits=out.logits[:, -1, :],
                     mask=inputs["attention_mask"], next_pos=inputs["position_ids"][:, -1] + 1)

    @staticmethod
    def _score_prompts(gens: list[Sequence], logits: torch.Tensor) -> None:
        """Prompt token i's logprob is log_softmax(logits at position i-1)[token i], for i = 1..n-1 (left padding)."""
        width = logits.shape[1]
        for row, g in enumerate(gens):
            n = len(g.prompt_ids)
            if not g.params.prompt_logprobs or n < 2:
                if g.params.prompt_logprobs:
                    g.set_prompt_logprobs([])
                continue
            logp = torch.log_softmax(logits[row, width - n:width - 1].float(), dim=-1)
            targets = torch.tensor(g.prompt_ids[1:], device=logp.device)
            chosen = logp.gather(1, targets[:, None])[:, 0].tolist()
            k = g.params.logprobs or 0
            top_v, top_i = (logp.topk(k, dim=-1) if k else (logp[:, :0], logp[:, :0].long()))
            g.set_prompt_logprobs([TokenStep(t, lp, tuple(zip(ti, tv))) for t, lp, ti, tv in
                                   zip(g.prompt_ids[1:], chosen, top_i.tolist(), top_v.tolist())])

    @staticmethod
    def _token_step(logits: torch.Tensor, token: int, k: int | None) -> TokenStep:
        if k is None:
            return TokenStep(token)
        logp = torch.log_softmax(logits.float(), dim=-1)
        top = ()
        if k:
            values, ids = logp.topk(k)
            top = tuple(zip(ids.tolist(), values.tolist()))
        return TokenStep(token, float(logp[token]), top)

    def _sample(self, run: "_Rows") -> list[int]:
        """Sample one token per row, hand it to its sequence, drop rows that ended; the kept rows' tokens."""
        tokens, keep, sampled = [], [], 0
        for i, g in enumerate(run.rows):
            if g.cancelled:
                g.finish("cancelled")
                continue
            if g.params.max_tokens <= run.counts[i]:  # max_tokens 0: the prompt was only scored
                g.finish("length")
                continue
            token = sample(run.logits[i], g.params, run.rngs[i])
            run.counts[i] += 1
            sampled += 1
            if self._advance(g, self._token_step(run.logits[i], token, g.params.logprobs), run.counts[i]):
                keep.append(i)
                tokens.append(token)
        if self.metrics is not None:
            self.metrics.tokens.labels(self.name).inc(sampled)
            self.metrics.batch_size.labels(self.name).observe(len(run.rows))
        if len(keep) < len(run.rows):
            run.select(keep)
        return tokens

    def _merge(self, run: "_Rows", tokens: list[int], new: "_Rows", new_tokens: list[int] | None) -> list[int]:
        """Append `new`'s rows to `run` (their first tokens sampled here when `new_tokens` is None): both caches are
        left-padded to one length (padding masked out). Returns the tokens of the merged rows."""
        if new_tokens is None:
            new_tokens = self._sample(new)
        if not new.rows:
            return tokens
        width = max(run.mask.shape[1], new.mask.shape[1])
        if hasattr(run.cache, "merge"):   # serving.gpt2_runtime.KVCache: one copy into a preallocated buffer
            run.cache.merge(new.cache, width)
        else:                             # transformers' DynamicCache
            _merge_dynamic_caches(run.cache, new.cache, width)
        run.mask = torch.cat([_left_pad(run.mask, width, dim=1), _left_pad(new.mask, width, dim=1)], dim=0)
        run.next_pos = torch.cat([run.next_pos, new.next_pos])
        for name in ("rows", "rngs", "counts"):
            getattr(run, name).extend(getattr(new, name))
        return tokens + new_tokens

    def _advance(self, g: Sequence, step: TokenStep, count: int) -> bool:
        """Hand one sampled token to its sequence; False when it has ended (EOS, stop string, length)."""
        if step.token == self.eot_id:
            g.push(step)
            g.finish("stop")
            return False
        if not g.push(step):  # a stop string: the sequence ended itself
            return False
        if count >= g.params.max_tokens or len(g.prompt_ids) + count >= self.n_ctx:
            g.finish("length")
            return False
        return True


def _merge_dynamic_caches(cache: Any, other: Any, width: int) -> None:
    """Append `other`'s rows to a transformers cache, both left-padded to `width` positions."""
    for old_layer, new_layer in zip(cache.layers, other.layers):
        for attr in ("keys", "values"):
            a, b = getattr(old_layer, attr), getattr(new_layer, attr)
            setattr(old_layer, attr, torch.cat([_left_pad(a, width, dim=2), _left_pad(b, width, dim=2)], dim=0))


def _left_pad(x: torch.Tensor, width: int, *, dim: int) -> torch.Tensor:
    missing = width - x.shape[dim]
    if missing <= 0:
        return x
    shape = list(x.shape)
    shape[dim] = missing
    return torch.cat([x.new_zeros(shape), x], dim=dim)


@dataclass
class _Rows:
    """The running batch: per-row state in lists, the shared KV cache, attention mask and next positions."""

    rows: list[Sequence]
    rngs: list[torch.Generator]
    counts: list[int]
    cache: Any
    logits: torch.Tensor
    mask: torch.Tensor
    next_pos: torch.Tensor

    def select(self, keep: list[int]) -> None:
        """Keep the rows `keep`, then drop the leading cache positions that are padding for every row left."""
        index = torch.tensor(keep, dtype=torch.long, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask, self.next_pos = self.mask[index], self.next_pos[index]
        self.rows, self.rngs, self.counts = ([seq[i] for i in keep] for seq in (self.rows, self.rngs, self.counts))
        self._trim()

    def _trim(self) -> None:
        """Without this, a batch that never drains (rows keep joining as others end) would keep every position of
        rows long gone: the cache would grow by one position per step forever, past the model's context. With no row
        left, everything goes (rows prefilled in the same step then join at their own width)."""
        live = self.mask.any(dim=0)
        if live.numel() == 0 or bool(live[0]):
            return
        first = int(live.nonzero()[0]) if bool(live.any()) else self.mask.shape[1]
        self.mask = self.mask[:, first:]
        if hasattr(self.cache, "trim_left"):   # serving.gpt2_runtime.KVCache
            self.cache.trim_left(first)
        else:                                  # transformers' DynamicCache
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, first:], layer.values[:, :, first:]
