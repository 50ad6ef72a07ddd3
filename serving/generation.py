"""One sequence being generated, shared by every client that asked for exactly it (dedup), with its event fan-out."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import Callable, Hashable, Optional

from serving.sampling import SamplingParams


class EngineError(Exception):
    """A generation failed inside the engine; `status` is the HTTP code the API answers with."""

    status = 500
    type = "server_error"


class OutOfMemory(EngineError):
    status = 503
    type = "server_overloaded"


@dataclass(frozen=True)
class Event:
    kind: str                      # delta | done | error
    text: str = ""                 # delta: new text; done: ""
    tokens: int = 0                # completion tokens so far
    finish_reason: Optional[str] = None
    error: Optional[EngineError] = None


Subscriber = Callable[[Event], None]


class Generation:
    """Thread-safe: the worker thread pushes events, API handlers (any thread) subscribe and unsubscribe.

    A late subscriber first gets the text so far as one delta, so joining an in-flight or finished generation
    looks to the client like an ordinary stream. When the last subscriber leaves early the generation is cancelled.
    """

    def __init__(self, key: Hashable, model: str, version: str, prompt: str, prompt_ids: list[int],
                 params: SamplingParams, on_abandon: Callable[["Generation"], None] | None = None,
                 on_finish: Callable[["Generation"], None] | None = None) -> None:
        self.key, self.model, self.version = key, model, version
        self.prompt, self.prompt_ids, self.params = prompt, prompt_ids, params
        self.created = time.monotonic()
        self.text = ""
        self.tokens = 0
        self.finish_reason: Optional[str] = None
        self.error: Optional[EngineError] = None
        self.cancelled = False
        self._subs: list[Subscriber] = []
        self._lock = threading.Lock()
        self._on_abandon, self._on_finish = on_abandon, on_finish
        self._done = threading.Event()

    @property
    def finished(self) -> bool:
        return self._done.is_set()

    def subscribe(self, sub: Subscriber) -> None:
        with self._lock:
            if self.text:
                sub(Event("delta", self.text, self.tokens))
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
                self.cancelled = True
        if abandoned and self._on_abandon:
            self._on_abandon(self)

    def wait(self, timeout: float | None = None) -> bool:
        return self._done.wait(timeout)

    # worker side
    def emit(self, text: str, tokens: int) -> None:
        with self._lock:
            self.tokens = tokens
            if not text:
                return
            self.text += text
            for sub in list(self._subs):
                sub(Event("delta", text, tokens))

    def finish(self, reason: str, tokens: int) -> None:
        self._close(reason=reason, tokens=tokens)

    def fail(self, error: EngineError) -> None:
        self._close(error=error)

    def _final_event(self) -> Event:
        if self.error is not None:
            return Event("error", error=self.error)
        return Event("done", tokens=self.tokens, finish_reason=self.finish_reason)

    def _close(self, reason: str | None = None, tokens: int | None = None, error: EngineError | None = None) -> None:
        with self._lock:
            if self.finished:
                return
            self.finish_reason, self.error = reason, error
            if tokens is not None:
                self.tokens = tokens
            self._done.set()
            event, subs, self._subs = self._final_event(), self._subs, []
        for sub in subs:
            sub(event)
        if self._on_finish:
            self._on_finish(self)
