"""Result files of a Ray job: the CLI's CSV/JSONL files, and Parquet.

Rows reach the driver as the cluster computes them and one writer appends them, so
a file holds each pair once whatever the workers did (a retried batch is delivered
once). CSV and JSON lines are the single-machine ``ResultFile`` (flushed per row,
so a killed job keeps its rows). A Parquet file can only be read once its footer is
written: rows go to a temporary file beside it, renamed over the destination when the
job ends or is interrupted (Ctrl-C); a process killed outright leaves the previous
file. Resuming keeps the computed rows and drops failed ones, as ``ResultFile`` does.
"""
from __future__ import annotations

import math
import os
import secrets
from typing import Any, Sequence

from ..cli.results import ResultFile, Row, columns_for
from ..errors import ConfigError

FORMATS = (".parquet", ".csv", ".jsonl", ".ndjson")


def open_result_file(path: str, terms: Sequence[str], *, resume: bool = False):
    """A writer with ``done`` (pair keys already computed), ``write(row)`` and ``close()``."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ConfigError(f"--output {path!r} has extension {ext!r}; accepted with --ray: "
                          f"{', '.join(FORMATS)} (Parquet, CSV or JSON lines).")
    if ext == ".parquet":
        return ParquetResultFile(path, terms, resume=resume)
    return ResultFile(path, terms, resume=resume)


def _schema(columns: Sequence[str]):
    import pyarrow as pa

    return pa.schema([(c, pa.string() if c in ("a", "b", "error") else pa.float64())
                      for c in columns])


class ParquetResultFile:
    """Rows into one Parquet file, a row group per ``group_rows`` rows.

    Columns as the CLI's files: ``a``, ``b``, every term (float64, null when not
    computed), ``error`` (null when computed).
    """

    def __init__(self, path: str, terms: Sequence[str], *, resume: bool = False,
                 group_rows: int = 4096) -> None:
        import pyarrow.parquet as pq

        self.path = path
        self.columns = columns_for(terms)
        self.schema = _schema(self.columns)
        self.group_rows = group_rows
        self.done: set[tuple[str, str]] = set()
        self._rows: list[Row] = []
        kept: list[Row] = []
        if resume and os.path.exists(path):
            kept = self._read_done()
            self.done = {(r["a"], r["b"]) for r in kept}
        folder = os.path.dirname(os.path.abspath(path))
        os.makedirs(folder, exist_ok=True)
        self._tmp = os.path.join(folder, f".{os.path.basename(path)}.{secrets.token_hex(6)}.tmp")
        self._writer: Any = pq.ParquetWriter(self._tmp, self.schema)
        for row in kept:
            self.write(row)

    def _read_done(self) -> list[Row]:
        import pyarrow.parquet as pq

        try:
            table = pq.read_table(self.path)
        except Exception as exc:  # pyarrow raises its own types for a damaged file
            raise ConfigError(f"--resume: {self.path!r} is not a readable Parquet file ({exc}); "
                              "give another --output, or drop --resume to overwrite it.") from exc
        if table.column_names != self.columns:
            raise ConfigError(f"--resume: {self.path!r} has columns {table.column_names}, but this "
                              f"model writes {self.columns}; it was written by another model. Give "
                              "another --output, or drop --resume to overwrite it.")
        return [r for r in table.to_pylist() if not r.get("error")
                and r.get("total") is not None and math.isfinite(r["total"])]

    def write(self, row: Row) -> None:
        if self._writer is None:
            raise ConfigError(f"{self.path!r} is closed; open a new result file to write rows.")
        self._rows.append({c: (row.get(c) or None) if c == "error" else row.get(c)
                           for c in self.columns})
        if len(self._rows) >= self.group_rows:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        """Write the footer and move the file into place (the job's rows so far)."""
        if self._writer is None:
            return
        try:
            self._flush()
            self._writer.close()
            os.replace(self._tmp, self.path)
        finally:
            self._writer = None
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
