"""Per-request sampling (temperature, top-k, top-p, seeded generator) and incremental detokenizing with stop strings.

Sampling runs inside an engine's decode loop; `TextTracker` runs outside it, in the sequence (`Generation.push`)."""

from __future__ import annotations

from dataclasses import dataclass

import torch


MIN_TEMPERATURE = 1e-5


@dataclass(frozen=True)
class SamplingParams:
    """Everything that decides one sequence's tokens; frozen so it can be part of the dedup/cache key."""

    max_tokens: int = 16
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0            # 0 = no top-k cut
    stop: tuple[str, ...] = ()
    seed: int = 42
    logprobs: int | None = None   # None = no logprobs; k >= 0 = each token's logprob plus the k most likely tokens
    prompt_logprobs: bool = False  # also score the prompt tokens (echo), with the same k


def sample(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """Next token id for one sequence from its last-position logits (1-D, vocab)."""
    if params.temperature < MIN_TEMPERATURE:  # 0 = greedy; a tiny positive value would overflow logits / T to inf
        return int(torch.argmax(logits))
    logits = logits.float() / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(-1)
        # Drop tokens once the mass before them already reaches top_p; the most likely token always stays, also when
        # top_p is below float32's smallest value (1e-300 compares as 0 >= 0, which dropped every token: NaN probs).
        drop = (cum - torch.softmax(sorted_logits, dim=-1)) >= params.top_p
        drop[0] = False
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    return draw(torch.softmax(logits, dim=-1), generator)


def draw(probs: torch.Tensor, generator: torch.Generator | None) -> int:
    """One index drawn from the categorical distribution `probs` (1-D, float, sums to ~1) by inverse transform
    sampling: one uniform number u from `generator`, the first index whose cumulative probability exceeds
    u * total. Zero-probability entries are never drawn (their cumulative sum does not grow past the previous one).

    Same distribution as `torch.multinomial(probs, 1)`, which on CPU draws one exponential variate per vocabulary
    entry: 1.25 ms for GPT-2's 50,257 entries versus 0.06 ms here, per sampled token and row (bench/RESULTS.md)."""
    cdf = probs.float().cumsum(0)
    u = torch.rand((), generator=generator, device=probs.device, dtype=torch.float32) * cdf[-1]
    index = int(torch.searchsorted(cdf, u[None], right=True))
    if index >= probs.numel():   # u * total rounded up to total: the last entry with probability > 0
        index = int(torch.searchsorted(cdf, cdf[-1:]))
    return index


class TextTracker:
    """Turns a stream of token ids into safe text deltas: no half UTF-8 characters, no text that may start a stop string.

    Detokenizes a sliding window of recent ids (text-generation-inference's prefix/read offsets) so each step costs O(1)
    instead of re-decoding the whole sequence.
    """

    def __init__(self, tokenizer, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer  # a `tokenizers.Tokenizer`: its encode/decode are safe to call from any thread
        self.stop = tuple(s for s in stop if s)
        self.ids: list[int] = []
        self.text = ""          # everything decoded so far
        self.emitted = 0        # chars of self.text already handed out
        self._prefix = 0
        self._read = 0

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (text safe to emit now, whether a stop string was hit)."""
        self.ids.append(token)
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        new_text = self._decode(self.ids[self._prefix:])
        if len(new_text) > len(prefix_text) and not new_text.endswith("\ufffd"):
            self.text += new_text[len(prefix_text):]
            self._prefix, self._read = self._read, len(self.ids)
        return self._release()

    def _release(self) -> tuple[str, bool]:
        longest = max(map(len, self.stop), default=0)
        start = max(0, self.emitted - longest)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            end = min(hits)
            delta, self.emitted = self.text[self.emitted:end], end
            self.text = self.text[:end]
            return delta, True
        hold = 0
        for k in range(min(longest - 1, len(self.text) - self.emitted), 0, -1):
            if any(s.startswith(self.text[-k:]) for s in self.stop):
                hold = k
                break
        end = len(self.text) - hold
        delta, self.emitted = self.text[self.emitted:end], end
        return delta, False

    def flush(self) -> str:
        """At the end (length or EOS): whatever was held back, including a trailing partial character."""
        tail = self._decode(self.ids[self._prefix:])
        prefix_text = self._decode(self.ids[self._prefix:self._read])
        self.text += tail[len(prefix_text):]
        self._prefix = self._read = len(self.ids)
        delta, stopped = self._release()  # the tail may complete a stop string: cut it like any other
        if not stopped:
            delta, self.emitted = delta + self.text[self.emitted:], len(self.text)
        return delta
