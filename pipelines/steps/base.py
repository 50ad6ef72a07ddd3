"""The small base every cleaning step builds on: a Doc, Fixer (pure `fix(text)`) and Filter (pure `keep(doc)`) with counts.

A step's own file holds only its one piece of logic; this base applies it, records which fix kinds touched a document and
tallies drops per reason (datatrove-style), so reports and the rejected file come from one place.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class Doc:
    """One record on its way through the steps. `fields` are the raw record's (repaired) values; `text` the rendered doc."""

    id: str
    source: str
    fields: dict[str, Any]
    text: str = ""
    fixes: list[str] = field(default_factory=list)
    lang: str = ""
    lang_prob: float = 0.0
    langs: dict[str, float] = field(default_factory=dict)  # the detector's distribution, most probable first
    signature: Any = None          # exact-dedup key (bytes), set by the worker
    minhash: Any = None            # near-dup MinHash values (numpy uint64), set by the worker


class Fixer:
    """A repair: `fix(text) -> (text, changed)`. `name` is the fix kind written to `fixes` and the report."""

    name: str = ""

    def fix(self, text: str) -> tuple[str, bool]:
        raise NotImplementedError

    def apply_text(self, doc: Doc) -> None:
        doc.text, changed = self.fix(doc.text)
        self._record(doc, changed)

    def apply_fields(self, doc: Doc, names: list[str]) -> None:
        """Repair each named string field; the document counts once per kind however many fields changed."""
        changed_any = False
        for name in names:
            value = doc.fields.get(name)
            if isinstance(value, str) and value:
                doc.fields[name], changed = self.fix(value)
                changed_any |= changed
        self._record(doc, changed_any)

    def _record(self, doc: Doc, changed: bool) -> None:
        if changed and self.name not in doc.fixes:
            doc.fixes.append(self.name)


class Filter:
    """A check: `keep(doc) -> None` to keep, or the reason string it is dropped for."""

    def keep(self, doc: Doc) -> Optional[str]:
        raise NotImplementedError


class Tally:
    """Deterministic counts for the report: documents in/out, fixes per kind (over every parsed document, kept or not),
    drops per reason, languages of kept documents."""

    def __init__(self) -> None:
        self.docs_in = 0
        self.docs_out = 0
        self.fixes: Counter[str] = Counter()
        self.drops: Counter[str] = Counter()
        self.languages: Counter[str] = Counter()

    def seen(self, doc: Doc) -> None:
        self.docs_in += 1
        self.fixes.update(doc.fixes)

    def dropped(self, reason: str) -> None:
        self.drops[reason] += 1

    def kept(self, doc: Doc) -> None:
        self.docs_out += 1
        self.languages[doc.lang or "unknown"] += 1
