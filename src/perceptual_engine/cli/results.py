"""Result rows: streamed to a CSV/JSONL file (flushed per row, resumable) and to stdout.

A row is ``{"a": path, "b": path, "<term>": float | None, ..., "total": float | None,
"error": str}``; ``error`` is "" when the pair was computed, and the terms are None
when it was not.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from typing import IO, Any, Sequence

from .._io import atomic_path
from ..errors import ConfigError

FILE_FORMATS = {".csv": "csv", ".jsonl": "jsonl", ".ndjson": "jsonl"}
STDOUT_FORMATS = ("table", "csv", "json")
Row = dict[str, Any]


def columns_for(terms: Sequence[str]) -> list[str]:
    return ["a", "b", *terms, "error"]


def file_format(path: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in FILE_FORMATS:
        raise ConfigError(f"--output {path!r} has extension {ext!r}; accepted: "
                          f"{', '.join(FILE_FORMATS)} (CSV or JSON lines).")
    return FILE_FORMATS[ext]


def _csv_line(values: Sequence[Any]) -> str:
    buf = io.StringIO()
    csv.writer(buf, lineterminator="\n").writerow(values)
    return buf.getvalue()


def _json_row(row: Row, columns: Sequence[str]) -> dict[str, Any]:
    """The row's columns in order; an empty error is null."""
    obj = {c: row.get(c) for c in columns}
    obj["error"] = obj["error"] or None
    return obj


def _cell(v: Any) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


class ResultFile:
    """Append rows to ``path`` as they come, one flush per row.

    With ``resume`` the rows already there are read first: pairs that succeeded are
    kept (their keys in ``done``), failed pairs and a half-written last line are
    dropped, so they are computed again and each pair ends up in the file once.
    """

    def __init__(self, path: str, terms: Sequence[str], *, resume: bool = False) -> None:
        self.path = path
        self.format = file_format(path)
        self.columns = columns_for(terms)
        self.done: set[tuple[str, str]] = set()
        kept: list[Row] = []
        if resume and os.path.exists(path):
            kept = self._read_done()
            self.done = {(r["a"], r["b"]) for r in kept}
        # Start from a file holding exactly the kept rows (atomically: an interrupted
        # rewrite leaves the previous file).
        with atomic_path(path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                if self.format == "csv":
                    fh.write(_csv_line(self.columns))
                for row in kept:
                    fh.write(self._format(row))
        self._fh: IO[str] | None = open(path, "a", newline="", encoding="utf-8")

    def _format(self, row: Row) -> str:
        if self.format == "csv":
            return _csv_line([_cell(row.get(c)) for c in self.columns])
        return json.dumps(_json_row(row, self.columns)) + "\n"

    def _read_done(self) -> list[Row]:
        with open(self.path, newline="", encoding="utf-8") as fh:
            text = fh.read()
        if text and not text.endswith("\n"):
            text = text[: text.rfind("\n") + 1]  # a row cut short by an interruption
        rows = self._parse_csv(text) if self.format == "csv" else self._parse_jsonl(text)
        return [r for r in rows if not r.get("error") and _finite(r.get("total"))]

    def _mismatch(self, got: Sequence[str]) -> ConfigError:
        return ConfigError(
            f"--resume: {self.path!r} has columns {list(got)}, but this model writes "
            f"{self.columns}; it was written by another model. Give another --output, or drop "
            "--resume to overwrite it."
        )

    def _parse_csv(self, text: str) -> list[Row]:
        reader = csv.reader(io.StringIO(text))
        header = next(reader, None)
        if header is None:
            return []
        if header != self.columns:
            raise self._mismatch(header)
        rows = []
        for cells in reader:
            if len(cells) != len(self.columns):
                continue
            row: Row = dict(zip(self.columns, cells))
            try:
                for c in self.columns[2:-1]:
                    row[c] = float(row[c]) if row[c] != "" else None
            except ValueError:
                continue
            rows.append(row)
        return rows

    def _parse_jsonl(self, text: str) -> list[Row]:
        rows = []
        for line in text.splitlines():
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(obj, dict):
                continue
            if list(obj) != self.columns:
                raise self._mismatch(list(obj))
            rows.append(obj)
        return rows

    def write(self, row: Row) -> None:
        assert self._fh is not None, "write after close"
        self._fh.write(self._format(row))
        self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None


def _finite(v: Any) -> bool:
    try:
        return v is not None and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


class StdoutRows:
    """Rows on a text stream as a table, CSV or a JSON array, printed as they come."""

    def __init__(self, stream: IO[str], fmt: str, terms: Sequence[str], path_width: int = 20) -> None:
        if fmt not in STDOUT_FORMATS:
            raise ConfigError(f"--format {fmt!r} is not accepted; accepted: {', '.join(STDOUT_FORMATS)}.")
        self.stream, self.fmt, self.terms = stream, fmt, list(terms)
        self.columns = columns_for(terms)
        self.width = max(path_width, 1)
        self.count = 0
        if fmt == "csv":
            self._out(_csv_line(self.columns))
        elif fmt == "table":
            cells = [f"{'a':<{self.width}}", f"{'b':<{self.width}}"]
            cells += [f"{t:>{max(12, len(t))}}" for t in self.terms] + ["error"]
            self._out("  ".join(cells).rstrip() + "\n")

    def _out(self, text: str) -> None:
        self.stream.write(text)
        self.stream.flush()

    def write(self, row: Row) -> None:
        if self.fmt == "csv":
            self._out(_csv_line([_cell(row.get(c)) for c in self.columns]))
        elif self.fmt == "json":
            self._out(("[\n  " if self.count == 0 else ",\n  ") + json.dumps(_json_row(row, self.columns)))
        else:
            cells = [f"{row['a']:<{self.width}}", f"{row['b']:<{self.width}}"]
            for t in self.terms:
                v = row.get(t)
                cells.append(f"{'-' if v is None else format(v, '.6g'):>{max(12, len(t))}}")
            cells.append(row.get("error") or "")
            self._out("  ".join(cells).rstrip() + "\n")
        self.count += 1

    def close(self) -> None:
        if self.fmt == "json":
            self._out("[]\n" if self.count == 0 else "\n]\n")
