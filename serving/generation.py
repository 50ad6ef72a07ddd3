"""One sequence being generated, shared by every client that asked for exactly it (dedup), with its event fan-out.

The engine only hands it token ids (`push(TokenStep)`); detokenizing and stop strings happen here, outside the decode
loop, so every engine gets them alike.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Optional

from textmill.serving.engines.base import EngineError, OutOfMemory, TokenStep
from textmill.serving.sampling import SamplingParams, TextTracker

__all__ = ["EngineError", "Event", "Generation", "OutOfMemory", "TokenStep"]


@dataclass(frozen=True)
class Event:
    kind: str                      # delta | done | error
    text: str = ""                 # delta: new text; done: ""
    tokens: int = 0                # completion tokens so far
    finish_reason: Optional[str] = None
    error: Optional[EngineError] = None
    steps: tuple[TokenStep, ...] = ()   # delta: the tokens since the previous delta (when logprobs were asked for)


Subscriber = Callable[[Event], None]


class Generation:
    """Thread-safe: the engine thread pushes tokens, API handlers (any thread) subscribe and unsubscribe.

    A late subscriber first gets the text (and token steps) so far as one delta, so joining an in-flight or finished
    generation looks to the client like an ordinary stream. When the last subscriber leaves early it is cancelled.
    `steps` holds every generated token (with logprobs when `params.logprobs` is set), `prompt_steps` the scored prompt
    tokens 1..n-1 (when `params.prompt_logprobs`).
    """

    def __init__(self, key: Hashable, model: str, version: str, prompt: str, prompt_ids: list[int],
                 params: SamplingParams, tokenizer: Any, on_abandon: Callable[["Generation"], None] | None = None,
                 on_finish: Callable[["Generation"], None] | None = None) -> None:
        self.key, self.model, self.version = key, model, version
        self.prompt, self.prompt_ids, self.params = prompt, prompt_ids, params
        self.created = time.monotonic()
        self.text = ""
        self.steps: list[TokenStep] = []
        self.prompt_steps: list[TokenStep] = []
        self.finish_reason: Optional[str] = None
        self.error: Optional[EngineError] = None
        self._cancelled = False
        self._tracker = TextTracker(tokenizer, params.stop)
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()
        self._on_abandon, self._on_finish = on_abandon, on_finish
        self._done = threading.Event()

    @property
    def tokens(self) -> int:
        """Completion tokens generated so far (EOS included when it ended the sequence)."""
        return len(self.steps)

    @property
    def cancelled(self) -> bool:
        return self._cancelled

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    @property
    def cumulative_logprob(self) -> float:
        """Sum of the generated tokens' logprobs (needs `params.logprobs`; best_of ranks by its mean)."""
        return sum(s.logprob or 0.0 for s in self.steps)

    def subscribe(self, sub: Subscriber) -> None:
        with self._lock:
            if self.text or (self.steps and self._wants_steps):
                sub(Event("delta", self.text, self.tokens, steps=tuple(self.steps) if self._wants_steps else ()))
            if self.finished:
                sub(self._final_event())
            else:
                self._subs.append(sub)

    def unsubscribe(self, sub: Subscriber) -> None:
        with self._lock:
            if sub in self._subs:
                self._subs.remove(sub)
            abandoned = not self._subs and not self.finished
            if abandoned:
                self._cancelled = True
        if abandoned and self._on_abandon:
            self._on_abandon(self)

    def cancel(self) -> None:
        self._cancelled = True

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    @property
    def _wants_steps(self) -> bool:
        return self.params.logprobs is not None

    # engine side (the `Sequence` contract in serving.engines.base)
    def push(self, step: TokenStep) -> bool:
        """One generated token: detokenize, check stop strings, tell subscribers. False when a stop string ended it."""
        if self.finished:
            return False
        delta, stopped = self._tracker.push(step.token)
        self._emit(delta, step)
        if stopped:
            self._close(reason="stop")
            return False
        return True

    def set_prompt_logprobs(self, steps: list[TokenStep]) -> None:
        self.prompt_steps = list(steps)

    def finish(self, reason: str) -> None:
        """End with `reason` (stop | length | cancelled); text held back for a possible stop string is released."""
        if reason in ("stop", "length") and not self.finished:
            self._emit(self._tracker.flush(), None)
        self._close(reason=reason)

    def fail(self, error: EngineError) -> None:
        self._close(error=error)

    def _emit(self, text: str, step: TokenStep | None) -> None:
        with self._lock:
            if step is not None:
                self.steps.append(step)
            steps = (step,) if step is not None and self._wants_steps else ()
            if not text and not steps:
                return
            self.text += text
            event = Event("delta", text, self.tokens, steps=steps)
            for sub in list(self._subs):
                sub(event)

    def _final_event(self) -> Event:
        if self.error is not None:
            return Event("error", error=self.error)
        return Event("done", tokens=self.tokens, finish_reason=self.finish_reason)

    def _close(self, reason: str | None = None, error: EngineError | None = None) -> None:
        with self._lock:
            if self.finished:
                return
            self.finish_reason, self.error = reason, error
            self._done.set()
            event, subs, self._subs = self._final_event(), self._subs, []
        for sub in subs:
            sub(event)
        if self._on_finish:
            self._on_finish(self)


def probe_generation(engine: Any, max_tokens: int = 1) -> Generation:
    """A greedy generation of `max_tokens` from the EOT token of `engine` (a ModelEngine): a real prefill + decode,
    used to warm a version up before it takes traffic and for readiness."""
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    return Generation(("probe", time.monotonic()), engine.name, engine.version, "", [engine.eot_id], params,
                      engine.tokenizer)
