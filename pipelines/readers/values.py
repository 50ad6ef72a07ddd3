"""Record values normalised once, when read, whatever the format: a field is either text (`str`) or missing (`None`).

pandas-style missing markers (None, float NaN, pandas NA/NaT, numpy NaN/NaT) become None, never the text "nan"/"None";
bytes (Parquet `binary` columns, JSON has none) are decoded the way the file's text is (UTF-8, then cp1252 per value),
never shown as `b'...'`; numbers and booleans are written as JSON writes them (`3`, `2.5`, `true`), lists and dicts as
compact JSON, dates in ISO 8601.
"""

from __future__ import annotations

import datetime as dt
import decimal
import json
import math
from typing import Any, Optional

import ftfy.bad_codecs  # noqa: F401  registers "sloppy-windows-1252"


def _missing(value: Any) -> bool:
    if value is None:
        return True
    if isinstance(value, float):
        return math.isnan(value)
    kind = type(value).__name__
    if kind in ("NAType", "NaTType"):  # pandas.NA, pandas.NaT (without importing pandas)
        return True
    if kind in ("datetime64", "timedelta64", "float64", "float32", "float16"):  # numpy scalars
        try:
            return bool(value != value)
        except (TypeError, ValueError):
            return False
    return False


def decode_bytes(raw: bytes) -> tuple[str, bool]:
    """(text, fell_back): UTF-8, or cp1252 (undefined bytes as C1 controls) when the value is not valid UTF-8."""
    try:
        return raw.decode("utf-8"), False
    except UnicodeDecodeError:
        return raw.decode("sloppy-windows-1252"), True


def _jsonable(value: Any) -> Any:
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(value))[0]
    if isinstance(value, (dt.date, dt.datetime, dt.time)):
        return value.isoformat()
    if isinstance(value, decimal.Decimal):
        return str(value)
    if _missing(value):
        return None
    return str(value)


def normalise(value: Any) -> tuple[Optional[str], bool]:
    """One field value -> (text or None when missing, whether bytes needed the cp1252 fallback).

    Raises nothing: any value has a text form (unknown objects through `str`)."""
    if _missing(value):
        return None, False
    if isinstance(value, str):
        return value, False
    if isinstance(value, (bytes, bytearray, memoryview)):
        return decode_bytes(bytes(value))
    if isinstance(value, bool):
        return ("true" if value else "false"), False
    if isinstance(value, (int, float, decimal.Decimal)):
        return (str(int(value)) if isinstance(value, float) and value.is_integer() and abs(value) < 2**53
                else str(value)), False
    if isinstance(value, (dt.datetime, dt.date, dt.time)):
        return value.isoformat(), False
    if isinstance(value, (list, tuple, dict)):
        return json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=_jsonable), False
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return normalise(value.tolist())
    return str(value), False


def normalise_record(fields: dict) -> tuple[dict[str, Optional[str]], bool]:
    """Every value of a record normalised; keys as text. Returns (fields, whether any bytes value fell back to cp1252)."""
    out, fell_back = {}, False
    for key, value in fields.items():
        out[str(key)], fb = normalise(value)
        fell_back |= fb
    return out, fell_back
