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

from ..datasets.results import ResultFile, Row
from ..errors import ConfigError, OutputError

FORMATS = (".parquet", ".csv", ".jsonl", ".ndjson")


def open_result_file(path: str, terms: Sequence[str], *, resume: bool = False,
                     identity: dict[str, Any] | None = None) -> ResultFile:
    """A writer with ``done`` (pair keys already computed), ``write(row)`` and ``close()``;
    ``identity`` (``model_identity(info)``) is recorded beside the file and checked on resume."""
    ext = os.path.splitext(path)[1].lower()
    if ext not in FORMATS:
        raise ConfigError(f"--output {path!r} has extension {ext!r}; accepted with --ray: "
                          f"{', '.join(FORMATS)} (Parquet, CSV or JSON lines).")
    cls = ParquetResultFile if ext == ".parquet" else ResultFile
    return cls(path, terms, resume=resume, identity=identity)


def _schema(columns: Sequence[str]):
    import pyarrow as pa

    return pa.schema([(c, pa.string() if c in ("a", "b", "error") else pa.float64())
                      for c in columns])


def _parquet_format(path: str) -> str:
    if os.path.splitext(path)[1].lower() != ".parquet":
        raise ConfigError(f"{path!r} is not a .parquet path; give FILE.parquet.")
    return "parquet"


class ParquetResultFile(ResultFile):
    """Rows into one Parquet file, a row group per ``GROUP_ROWS`` rows.

    Columns as the CLI's files: ``a``, ``b``, every term (float64, null when not
    computed), ``error`` (null when computed). The sidecar, the single-writer lock and
    the resume rules are ``ResultFile``'s.
    """

    GROUP_ROWS = 4096
    file_format = staticmethod(_parquet_format)

    def _open(self, resume: bool) -> None:
        import pyarrow.parquet as pq

        kept = self._begin(resume)
        self.schema = _schema(self.columns)
        self._rows: list[Row] = []
        folder, name = os.path.split(os.path.abspath(self.path))
        self._tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
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
            raise self._mismatch(table.column_names)
        return [r for r in table.to_pylist() if not r.get("error")
                and r.get("total") is not None and math.isfinite(r["total"])]

    def write(self, row: Row) -> None:
        if self._writer is None:
            raise OutputError(f"{self.path!r} is closed; no more rows can be written to it.")
        self._rows.append({c: (row.get(c) or None) if c == "error" else row.get(c)
                           for c in self.columns})
        if len(self._rows) >= self.GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if self._rows:
            self._writer.write_table(pa.Table.from_pylist(self._rows, schema=self.schema))
            self._rows = []

    def close(self) -> None:
        """Write the footer and move the file into place (the rows so far); release the lock."""
        if getattr(self, "_writer", None) is None:
            return
        try:
            self._flush()
            self._writer.close()
            os.replace(self._tmp, self.path)
        finally:
            self._writer = None
            if os.path.exists(self._tmp):
                os.unlink(self._tmp)
            self._lock.__exit__(None, None, None)
