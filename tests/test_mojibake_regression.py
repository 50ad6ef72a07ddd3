"""The mojibake repair never rewrites valid text: 350+ valid non-ASCII strings (capital accented letters before ™®©°±µ,
all-caps words with accents before punctuation, Å, Cyrillic, Greek, CJK, emoji) come out of every repair byte-identical,
while the same strings damaged (UTF-8 read as cp1252, once or twice) are still repaired."""

from __future__ import annotations

from pathlib import Path

import pytest

from textmill.pipelines.clean_worker import Settings, Worker
from textmill.pipelines.readers import Record
from textmill.pipelines.steps.mojibake import Mojibake

VALID = [line for line in (Path(__file__).parent / "data/valid-non-ascii.txt").read_text(encoding="utf-8").splitlines()
         if line and not line.startswith("# ")]


def damage(s: str) -> str:
    """UTF-8 read as cp1252, undefined bytes kept as C1 controls."""
    return "".join(bytes([b]).decode("cp1252", errors="ignore") or chr(b) for b in s.encode("utf-8"))


def test_regression_set_is_large_and_non_ascii():
    assert len(VALID) >= 200 and len(set(VALID)) == len(VALID)
    assert all(not s.isascii() for s in VALID)


def test_every_valid_string_comes_out_byte_identical():
    worker = Worker(Settings(template="{text}", min_chars=0, near_dup=False))
    changed = [(s, d.text) for s in VALID if (d := worker.repair(Record("r", "r", {"text": s}))).text != s]
    assert changed == []


@pytest.mark.parametrize("text", ["NESTLÉ® mineral water", "CAFÉ™", "HÔTEL© DE VILLE", "ÉTÉ° 2024", "JOSÉ± 5"])
def test_capital_accent_before_symbol_is_kept(text):
    assert Mojibake().fix(text) == (text, False)


@pytest.mark.parametrize("text", ["NESTLÉ® mineral water", "CAFÉ™ DU MONDE®", "Ångström Å", "ΑΘΗΝΑ — Ελληνικά",
                                  "Привет, МОСКВА!", "naïve café 25 °C ± 0.5"])
def test_damaged_forms_are_still_repaired(text):
    assert Mojibake().fix(damage(text)) == (text, True)
    assert Mojibake().fix(damage(damage(text)))[0] == text
