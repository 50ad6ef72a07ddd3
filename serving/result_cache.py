"""Finished generations kept for identical requests: node-local LRU with TTL (default) or fleet-wide in redis.

The engine asks `get` (this node, under its lock, no I/O), then `fetch` (the shared store, outside its lock); it
`remember`s every finished generation locally (under its lock) and `share`s it (outside its lock). A key is (model, version, prompt ids, sampling params incl. seed): the
version id carries the export's content hash, so the same key means the same text on every node of a fleet.
With `serving.cache_url=redis://host:6379/0` identical requests on different nodes are generated once; the node-local
LRU stays in front of redis. Redis being down never fails a request: the node logs it once a minute and generates.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from typing import Callable, Hashable, Protocol

from cachetools import TTLCache

from textmill.serving.engines.base import TokenStep
from textmill.serving.generation import Generation
from textmill.serving.sampling import SamplingParams
from textmill.errors import UserError

log = logging.getLogger(__name__)

REDIS_SCHEMES = ("redis://", "rediss://", "unix://")
REDIS_TIMEOUT_S = 0.5        # a request waits at most this long on the shared store before generating itself
KEY_PREFIX = "textmill:gen:"
WARN_EVERY_S = 60.0


class ResultCache(Protocol):
    def get(self, key: Hashable) -> Generation | None: ...            # this node's finished generation, or None
    def remember(self, gen: Generation) -> None: ...                   # keep a finished generation on this node
    def fetch(self, key: Hashable, make: Callable[[], Generation]) -> Generation | None: ...   # the fleet's, or None
    def share(self, gen: Generation) -> None: ...                      # offer a finished generation to the fleet


class LocalCache:
    """Finished generations of this node, LRU with TTL (`cache_size`, `cache_ttl` seconds). Not thread-safe: the engine
    calls it under its own lock."""

    def __init__(self, size: int, ttl: float) -> None:
        self._done: TTLCache = TTLCache(maxsize=max(1, size), ttl=ttl)

    def get(self, key: Hashable) -> Generation | None:
        return self._done.get(key)

    def remember(self, gen: Generation) -> None:
        self._done[gen.key] = gen

    def fetch(self, key: Hashable, make: Callable[[], Generation]) -> Generation | None:
        return None   # nothing beyond this node

    def share(self, gen: Generation) -> None:
        return None


def redis_key(key: Hashable) -> str:
    """A stable text key for (model, version, prompt ids, SamplingParams): sha256 of its canonical JSON."""
    model, version, prompt_ids, params = key
    blob = json.dumps([model, version, list(prompt_ids), dataclasses.asdict(params)], sort_keys=True,
                      separators=(",", ":"))
    return KEY_PREFIX + hashlib.sha256(blob.encode()).hexdigest()


class RedisCache(LocalCache):
    """The local LRU plus a redis store shared by the fleet; values are JSON {steps, prompt_steps, finish_reason} (token ids with their logprobs, replayed through the sequence) with the
    same TTL. Connection errors and timeouts count as misses (and skipped writes)."""

    def __init__(self, url: str, size: int, ttl: float) -> None:
        import redis  # only nodes that configure cache_url need redis-py

        super().__init__(size, ttl)
        self.url, self.ttl = url, ttl
        self._redis = redis.Redis.from_url(url, socket_timeout=REDIS_TIMEOUT_S, socket_connect_timeout=REDIS_TIMEOUT_S)
        self._errors = (redis.RedisError, OSError)
        self._warned_at = float("-inf")

    def fetch(self, key: Hashable, make: Callable[[], Generation]) -> Generation | None:
        try:
            raw = self._redis.get(redis_key(key))
        except self._errors as e:
            self._warn("read", e)
            return None
        if raw is None:
            return None
        try:
            value = json.loads(raw)
            steps, prompt_steps = _steps(value["steps"]), _steps(value.get("prompt_steps", []))
            reason = str(value["finish_reason"])
        except (ValueError, KeyError, TypeError):  # not ours, or truncated: ignore it, a fresh result overwrites it
            log.warning("redis %s: unreadable cached result under %s; generating", self.url, redis_key(key))
            return None
        # replayed through the sequence itself, so text, stop strings and logprobs come out as the first node's did
        gen = make()
        gen.set_prompt_logprobs(prompt_steps)
        for step in steps:
            if not gen.push(step):
                break
        gen.finish(reason)
        return gen

    def share(self, gen: Generation) -> None:
        value = json.dumps({"steps": [_plain(s) for s in gen.steps], "prompt_steps": [_plain(s) for s in gen.prompt_steps],
                            "finish_reason": gen.finish_reason})
        try:
            self._redis.set(redis_key(gen.key), value, px=max(1, int(self.ttl * 1000)))
        except self._errors as e:
            self._warn("write", e)

    def _warn(self, what: str, e: Exception) -> None:
        now = time.monotonic()
        if now - self._warned_at >= WARN_EVERY_S:
            self._warned_at = now
            log.warning("redis %s: %s failed (%s: %s); serving from this node alone until it answers", self.url, what,
                        type(e).__name__, e)


def _plain(step: TokenStep) -> list:
    return [step.token, step.logprob, [list(t) for t in step.top]]


def _steps(raw: list) -> list[TokenStep]:
    """TokenSteps from their JSON form [token, logprob | null, [[id, logprob], ...]]; TypeError/ValueError when malformed."""
    out = []
    for token, logprob, top in raw:
        out.append(TokenStep(int(token), None if logprob is None else float(logprob),
                             tuple((int(i), float(lp)) for i, lp in top)))
    return out


def check_url(url: str) -> str:
    """'' (node-local cache) or a redis URL; raises UserError naming serving.cache_url otherwise."""
    if url and not url.startswith(REDIS_SCHEMES):
        raise UserError(f"serving.cache_url={url!r} is not supported; use redis://host:6379/0 (or rediss://, unix://) "
                        f"for a fleet-wide cache, or leave it empty for the node-local one")
    return url


def from_url(url: str, size: int, ttl: float) -> ResultCache:
    """The cache for `serving.cache_url`: LocalCache when empty, RedisCache for a redis URL."""
    return RedisCache(check_url(url), size, ttl) if url else LocalCache(size, ttl)


__all__ = ["LocalCache", "RedisCache", "ResultCache", "SamplingParams", "check_url", "from_url", "redis_key"]
