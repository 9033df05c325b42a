"""Reading and writing result directories: typed CSV tables, JSON meta, atomic directories.

Tables are checked against a schema (column names, order and kinds: ``str``, ``int``,
``float``) both when a result is built in memory and when it is read back, so a saved result
reloads exactly (dtypes included). Reading errors name the file, column, line and value.

Saving is atomic: files are written to a hidden sibling directory and moved into place only
once complete, so an interrupted save never leaves a directory that looks finished; only the
files fidelity wrote are ever replaced (see :mod:`fidelity.destinations`).
"""

from __future__ import annotations

import csv
import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import numpy as np
import pandas as pd

from fidelity.atomic import is_incomplete
from fidelity.destinations import Legacy, owned_directory
from fidelity.errors import InputError

RESULT_FILES = ("results.csv", "summary.csv", "meta.json")
"""Files :meth:`~fidelity.results.FidelityResult.load` needs."""


# ----------------------------------------------------------------------------- table schema


def _column_error(table: str, column: str, problem: str, kind: str) -> ValueError:
    expected = {"str": "strings", "int": "whole numbers", "float": "numbers (NaN allowed)"}[kind]
    return ValueError(f"{table}: column {column!r} {problem}; it must hold {expected}")


def _as_strings(values: pd.Series, table: str, column: str) -> pd.Series:
    bad = [v for v in values if not isinstance(v, str)]
    if bad:
        raise _column_error(table, column, f"holds non-string values such as {bad[0]!r}", "str")
    return values.astype(str)


def _as_numbers(values: pd.Series, table: str, column: str, kind: str) -> pd.Series:
    """``values`` as a numeric series (object columns of numbers are converted)."""
    if values.dtype == object or pd.api.types.is_string_dtype(values):
        bad = next((v for v in values if not _is_number(v)), None)
        if bad is not None:
            raise _column_error(table, column, f"holds {bad!r}", kind)
        values = pd.to_numeric(values)
    if values.dtype == bool or not pd.api.types.is_numeric_dtype(values):
        raise _column_error(table, column, f"has dtype {values.dtype}", kind)
    return values


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.number) and not isinstance(value, bool)


def _as_ints(values: pd.Series, table: str, column: str) -> pd.Series:
    values = _as_numbers(values, table, column, "int")
    if values.dtype.kind == "f":
        numbers = values.to_numpy()
        if not np.isfinite(numbers).all():
            raise _column_error(table, column, "has missing or infinite values", "int")
        if (numbers != np.round(numbers)).any():
            raise _column_error(table, column, "has fractional values", "int")
    return values.astype(np.int64)


def _as_floats(values: pd.Series, table: str, column: str) -> pd.Series:
    return _as_numbers(values, table, column, "float").astype(np.float64)


_CONVERTERS = {"str": _as_strings, "int": _as_ints, "float": _as_floats}


def check_table(
    table: object, name: str, schema: Mapping[str, str], extra_numeric: bool
) -> pd.DataFrame:
    """Copy of ``table`` with the schema's columns first, typed; ValueError naming problems.

    ``extra_numeric``: further columns are allowed (kept in order, as float64); otherwise they
    are an error.
    """
    if not isinstance(table, pd.DataFrame):
        raise TypeError(f"{name} must be a pandas DataFrame, got {type(table).__name__}")
    missing = [c for c in schema if c not in table.columns]
    if missing:
        raise InputError(
            f"{name} is missing columns {missing}; expected columns {list(schema)}"
            + (" followed by numeric columns such as 'etmf_norm@64'" if extra_numeric else "")
        )
    if not table.columns.is_unique:
        raise InputError(f"{name} has duplicate column names: {list(table.columns)}")
    extra = [c for c in table.columns if c not in schema]
    if extra and not extra_numeric:
        raise InputError(f"{name} has unexpected columns {extra}; expected {list(schema)}")
    bad_names = [c for c in extra if not isinstance(c, str)]
    if bad_names:
        raise InputError(f"{name}: column names must be strings, got {bad_names}")
    columns = {c: _CONVERTERS[kind](table[c], name, c) for c, kind in schema.items()}
    columns |= {c: _as_floats(table[c], name, c) for c in extra}
    return pd.DataFrame({c: s.reset_index(drop=True) for c, s in columns.items()})


# ----------------------------------------------------------------------------- JSON meta


def _json_default(value: object) -> object:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    raise TypeError(
        f"meta holds a {type(value).__name__} ({value!r}), which JSON cannot store; "
        "use strings, numbers, booleans, None, lists and dicts"
    )


def _finite_or_none(value: object) -> object:
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, list):
        return [_finite_or_none(v) for v in value]
    if isinstance(value, dict):
        return {k: _finite_or_none(v) for k, v in value.items()}
    return value


def check_meta(meta: object) -> dict[str, object]:
    """``meta`` as JSON gives it back (standard JSON: non-finite floats become None)."""
    if not isinstance(meta, Mapping):
        raise TypeError(f"meta must be a dict, got {type(meta).__name__}")
    bad_keys = [k for k in meta if not isinstance(k, str)]
    if bad_keys:
        raise TypeError(f"meta keys must be strings, got {bad_keys!r}")
    plain = json.loads(json.dumps(dict(meta), default=_json_default))
    return _finite_or_none(plain)


# ----------------------------------------------------------------------------- CSV / JSON io


def write_table(table: pd.DataFrame, path: Path) -> None:
    """CSV with NaN as an empty field; floats in shortest round-trip form (exact reload)."""
    table.to_csv(path, index=False, na_rep="")


def _parse_column(
    texts: list[str], lines: list[int], kind: str, path: Path, column: str
) -> pd.Series:
    """CSV fields -> typed column; ValueError naming file, column, line and value."""
    if kind == "str":
        return pd.Series(texts, dtype=object)
    parse = (lambda text: float(text) if text else math.nan) if kind == "float" else int
    values = []
    for line, text in zip(lines, texts, strict=True):
        try:
            values.append(parse(text))
        except ValueError:
            expected = "an integer" if kind == "int" else "a number or an empty field"
            raise InputError(
                f"{path} is corrupt: column {column!r}, line {line} holds {text!r}, "
                f"expected {expected}"
            ) from None
    return pd.Series(values, dtype=np.int64 if kind == "int" else np.float64)


def _read_records(path: Path) -> tuple[list[str], list[list[str]], list[int]]:
    """Header, records and each record's (last) line number; every record must be complete."""
    _require_file(path)
    records, lines = [], []
    try:
        with path.open(newline="", encoding="utf-8") as handle:
            reader = csv.reader(handle, strict=True)
            header = next(reader, None)
            if not header:
                raise InputError(f"{path} is empty; expected a CSV header line")
            for record in reader:
                if not record:
                    continue  # blank line
                if len(record) != len(header):
                    raise InputError(
                        f"{path} is corrupt: line {reader.line_num} has {len(record)} fields, "
                        f"expected {len(header)} ({', '.join(header)})"
                    )
                records.append(record)
                lines.append(reader.line_num)
    except (csv.Error, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not a readable CSV table: {error}") from None
    return header, records, lines


def read_table(path: Path, schema: Mapping[str, str], extra_numeric: bool) -> pd.DataFrame:
    """The CSV table at ``path``, typed and checked as :func:`check_table` does."""
    header, records, lines = _read_records(path)
    missing = [c for c in schema if c not in header]
    if missing:
        raise InputError(f"{path} is missing columns {missing}; expected {list(schema)}")
    if len(set(header)) != len(header):
        raise InputError(f"{path} has duplicate column names: {header}")
    columns = {
        name: _parse_column([r[i] for r in records], lines, schema.get(name, "float"), path, name)
        for i, name in enumerate(header)
    }
    try:
        return check_table(pd.DataFrame(columns), str(path), schema, extra_numeric)
    except ValueError as error:
        raise InputError(f"{path} is not a valid table: {error}") from None


def _require_file(path: Path) -> None:
    if not path.is_file():
        raise FileNotFoundError(
            f"{path.parent} has no {path.name}; a saved result directory holds "
            f"{', '.join(RESULT_FILES)} (written by FidelityResult.save)"
        )


def read_meta(path: Path) -> dict[str, object]:
    """The JSON object in ``path`` (a result's ``meta.json``)."""
    _require_file(path)
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise InputError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict):
        raise InputError(f"{path} must hold a JSON object, got {type(meta).__name__}")
    return meta


# ----------------------------------------------------------------------------- atomic save


def result_directory(
    directory: str | os.PathLike[str],
    force: bool,
    kind: str,
    legacy: Legacy,
    inputs: Iterable[str | os.PathLike[str]] = (),
):
    """:func:`fidelity.destinations.owned_directory` for a result or comparison: an existing
    directory is written only with ``force``, only if fidelity wrote it, and only its files
    are replaced; never one of ``inputs``."""
    if not isinstance(directory, str | os.PathLike):
        raise TypeError(f"directory must be a str or path, got {type(directory).__name__}")
    return owned_directory(directory, kind=kind, force=force, inputs=inputs, legacy=legacy)


def check_complete(path: Path) -> None:
    """InputError for a directory left by an interrupted save (or a staging directory)."""
    if is_incomplete(path):
        raise InputError(
            f"{path} is an incomplete save (interrupted while being written); rerun the command "
            "that writes it"
        )
