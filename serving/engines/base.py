"""The engine contract: all the HTTP layer and the version router need from an inference backend.

Shaped after text-generation-inference's `Model` (its server only hands it batches and reads generated tokens back) and
vLLM's engine client (add a request, abort it, check health): a `ModelEngine` is one loaded model version that takes
sequences, produces their tokens one `TokenStep` at a time, and drops a sequence once it is cancelled.

Division of labour:
- the engine owns weights, batching, sampling and the end conditions that need no text: EOS, `max_tokens`, the context
  window, cancellation. For every generated token it calls `seq.push(TokenStep)`; for `params.prompt_logprobs` it calls
  `seq.set_prompt_logprobs([...])` once after the prefill.
- the sequence (`serving.generation.Generation`) owns detokenizing, stop strings (a stop string ends it: `push` returns
  False and the engine drops the row) and the event fan-out to clients; `serving.protocol` formats logprobs for the wire.

A new backend is one module with a `ModelEngine` subclass plus one entry in `serving.engines.ENGINES`, chosen by the
setting `serving.engine`.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from textmill.serving.sampling import SamplingParams


class QueueFull(Exception):
    """The engine's queue holds `max_queue` sequences already: answer 429 and let the client retry."""


class Retired(Exception):
    """The engine was replaced by a newer version (hot swap) between lookup and submit: resubmit to the live one."""


class LoadError(Exception):
    """A version could not be loaded or failed its warm-up; the previous version keeps serving."""


class EngineError(Exception):
    """A generation failed inside the engine; `status` is the HTTP code the API answers with."""

    status = 500
    type = "server_error"


class OutOfMemory(EngineError):
    status = 503
    type = "server_overloaded"


@dataclass(frozen=True)
class TokenStep:
    """One token as the engine produced it.

    `token` is the vocabulary id. `logprob` is its natural-log probability under the model's own next-token
    distribution (log_softmax of the raw fp32 logits, before temperature / top-k / top-p), or None when the sequence did
    not ask for logprobs. `top` holds the `params.logprobs` most likely tokens at that position as (id, logprob) pairs,
    most likely first.
    """

    token: int
    logprob: float | None = None
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class EngineHealth:
    """`alive`: the thread (or process) that runs batches is running; `last_ok`: `time.monotonic()` of the last
    successful forward pass (0.0 = none yet); `queue_depth`: sequences waiting; `detail`: why not alive, when not."""

    alive: bool
    last_ok: float
    queue_depth: int
    detail: str = ""


class Sequence(Protocol):
    """What an engine sees of a submitted sequence (implemented by `serving.generation.Generation`)."""

    prompt: str             # the prompt text (for logs and diagnostics; engines work on prompt_ids)
    prompt_ids: list[int]
    params: SamplingParams

    @property
    def cancelled(self) -> bool: ...

    def cancel(self) -> None:
        """Mark the sequence cancelled; the engine finishes it "cancelled" at its next step."""
        ...

    def push(self, step: TokenStep) -> bool:
        """Hand over one generated token; False when the sequence has ended (a stop string): drop it."""
        ...

    def set_prompt_logprobs(self, steps: list[TokenStep]) -> None:
        """Logprobs of prompt tokens 1..n-1 (token 0 has no context), once, after the prefill."""
        ...

    def finish(self, reason: str) -> None:
        """End the sequence: "stop" (EOS), "length" (max_tokens or context window) or "cancelled"."""
        ...

    def fail(self, error: EngineError) -> None:
        ...


@dataclass(frozen=True)
class EngineSpec:
    """What loading one version takes: identity, verified cache folder, its MANIFEST, and the node's settings."""

    name: str
    version: str
    folder: Path
    manifest: dict = field(default_factory=dict)
    device: str = "auto"
    dtype: str = "auto"
    max_batch_size: int = 8
    max_queue: int = 64
    max_prefill_tokens: int = 64   # prompt tokens a running batch prefills per decode step (at least one prompt)
    precision_tolerance: float = 0.01   # serving.precision_tolerance: reduced precision's allowed relative loss change


class ModelEngine(ABC):
    """One model version behind the engine contract.

    Attributes every implementation sets in `load`: `name`, `version`, `folder` (str), `manifest`, `n_ctx` (context
    window in tokens), `eot_id`, `vocab_size`, `tokenizer` (a `tokenizers.Tokenizer`: `encode(text,
    add_special_tokens=False).ids` and `decode(ids, skip_special_tokens=...)`, safe from any thread) and
    `chat_template` (the Jinja chat template shipped in the model folder, or None).
    Lifecycle: `load` -> `warm_up` -> `start` -> `submit`... -> `close` (drain, then free) -> `join`.
    """

    name: str
    version: str
    folder: str
    manifest: dict
    n_ctx: int
    eot_id: int
    vocab_size: int
    tokenizer: Any
    chat_template: str | None = None
    precision_report: Any = None    # a serving.precision.PrecisionReport when the engine chose a precision at load

    @classmethod
    @abstractmethod
    def load(cls, spec: EngineSpec, metrics: Any = None) -> "ModelEngine":
        """Load the version in `spec.folder`; raise LoadError with a one-line reason when it cannot be served."""

    @abstractmethod
    def warm_up(self) -> None:
        """Run a real generation before traffic arrives (not yet started); raise LoadError when it fails."""

    @abstractmethod
    def start(self) -> None:
        """Start running submitted sequences."""

    @abstractmethod
    def submit(self, seq: Sequence) -> None:
        """Queue `seq`; raise QueueFull when `max_queue` sequences wait, Retired after `close()`."""

    def cancel(self, seq: Sequence) -> None:
        """Stop generating `seq`; the engine drops it at its next step and finishes it "cancelled"."""
        seq.cancel()  # type: ignore[attr-defined]

    @abstractmethod
    def close(self) -> None:
        """Take no new sequences; queued and running ones still finish, then memory is freed."""

    @abstractmethod
    def join(self, timeout: float | None = None) -> None:
        """Wait for the engine to finish its work after `close()`."""

    @abstractmethod
    def health(self) -> EngineHealth:
        """Whether the engine can make progress (its worker is alive) and when it last ran a forward pass."""

    @abstractmethod
    def stats(self) -> dict[str, Any]:
        """JSON-ready facts for /info: at least `engine`, `device`, `dtype`, `queue_depth`."""

    # tokenizer helpers shared by every implementation
    def encode(self, text: str) -> list[int]:
        """Token ids of `text` (no special tokens added)."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int], *, skip_special_tokens: bool = True) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)
