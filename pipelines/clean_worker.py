"""The per-document half of `clean`, run in worker processes over chunks: repair fields, render, tidy, per-doc filters,
language detection and dedup signatures. Deciding duplicates needs every earlier document, so that is left to the parent.
"""

from __future__ import annotations

import ctypes
import os
import signal
import string
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

from textmill.pipelines.readers import Record, template_fields
from textmill.pipelines.steps import CORPUS_STEPS, REPAIRS
from textmill.pipelines.steps.base import Doc
from textmill.pipelines.steps.empty import Empty
from textmill.pipelines.steps.exact_dup import signature
from textmill.pipelines.steps.language import distributions, make_detector
from textmill.pipelines.steps.length import Length
from textmill.pipelines.steps.near_dup import Shingler
from textmill.pipelines.steps.whitespace import Whitespace

EXCERPT_CHARS = 200
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


@dataclass(frozen=True)
class Settings:
    """Everything a worker needs, picklable (sent once per process through the pool initializer)."""

    template: str
    required: tuple[str, ...] = ()
    steps: tuple[str, ...] = ()
    fix_html: bool = True
    min_chars: int = 40
    max_chars: int = 200_000
    detector: str = "langdetect"
    seed: int = 0
    near_dup: bool = True
    num_perm: int = 128
    ngram: int = 5
    full_rejected_text: bool = False  # rejected.jsonl keeps the whole text, not the first EXCERPT_CHARS


@dataclass
class Outcome:
    doc: Doc
    reason: Optional[str] = None   # set when a per-document filter (or the reader) already rejected it
    excerpt: str = ""


@dataclass
class Worker:
    settings: Settings
    repairs: list = field(default_factory=list)
    text_steps: list = field(default_factory=list)

    def __post_init__(self) -> None:
        s = self.settings
        self.repairs = [cls() for name, cls in REPAIRS.items() if s.fix_html or name != "html"]
        self.text_steps = [CORPUS_STEPS[name]() for name in s.steps] + [Whitespace()]
        self.fields = list(dict.fromkeys(template_fields(s.template) + list(s.required)))
        self.filters = [Empty(list(s.required)), Length(s.min_chars, s.max_chars, list(s.required))]
        self.detector = make_detector(s.detector, s.seed)
        self.shingler = Shingler(s.num_perm, s.ngram) if s.near_dup else None

    def render(self, doc: Doc) -> str:
        parts = []
        for literal, name, _, _ in string.Formatter().parse(self.settings.template):
            parts.append(literal)
            if name:
                value = doc.fields.get(name)
                parts.append("" if value is None else str(value))
        return "".join(parts)

    def repair(self, rec: Record) -> Doc:
        """Repaired fields (`doc.fields`) and the rendered, tidied text of one parsed record."""
        doc = Doc(rec.id, rec.source, {name: rec.fields.get(name) for name in self.fields}, fixes=list(rec.fixes))
        for fixer in self.repairs:
            fixer.apply_fields(doc, self.fields)
        doc.text = self.render(doc)
        for step in self.text_steps:
            step.apply_text(doc)
        doc.text = doc.text.strip()
        return doc

    def screen(self, rec: Record) -> Outcome:
        """Repairs and the cheap per-document filters; survivors (reason None) still need `finish`."""
        if rec.malformed is not None:
            return Outcome(Doc(rec.id, rec.source, {}), rec.malformed.reason, rec.malformed.excerpt[:EXCERPT_CHARS])
        doc = self.repair(rec)
        for f in self.filters:
            reason = f.keep(doc)
            if reason:
                return Outcome(doc, reason, doc.text if self.settings.full_rejected_text else doc.text[:EXCERPT_CHARS])
        doc.fields = {}  # not needed past this point; keeps what travels back to the parent small
        return Outcome(doc)

    def finish(self, docs: list[Doc]) -> None:
        """Language (the whole chunk in one detector call where it takes lists) and dedup signatures of the survivors."""
        for doc, dist in zip(docs, distributions(self.detector, [d.text for d in docs])):
            doc.langs = dist
            doc.lang, doc.lang_prob = next(iter(dist.items()), ("", 0.0))
            doc.signature = signature(doc.text)
            if self.shingler is not None:
                doc.minhash = self.shingler.signature(doc.text)

    def process_chunk(self, records: list[Record]) -> list[Outcome]:
        outcomes = [self.screen(r) for r in records]
        self.finish([o.doc for o in outcomes if o.reason is None])
        return outcomes


_worker: Optional[Worker] = None


def init(settings: Settings, parent: Optional[int] = None) -> None:
    """Pool initializer: exit with the parent (`parent` = its pid), build the steps, load the language model once."""
    global _worker
    if parent is not None:
        die_with_parent(parent)
    _worker = Worker(settings)


def die_with_parent(parent: int) -> None:
    """Make this worker end when the parent process dies, even by SIGKILL (which runs no cleanup in the parent).

    Linux: prctl(PR_SET_PDEATHSIG, SIGKILL) through ctypes; the kernel signals us when the parent exits. Elsewhere (and in
    case the parent died before the call) a daemon thread polls the parent pid once a second."""
    if sys.platform.startswith("linux"):
        try:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # the parent is already gone: we were re-parented before the prctl took effect
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def process_chunk(records: list[Record]) -> list[Outcome]:
    assert _worker is not None, "init() must run first (pool initializer)"
    return _worker.process_chunk(records)
