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
import time
from typing import IO, Any, Sequence

from .._io import LockBusy, atomic_path, atomic_write_bytes, check_destination, file_lock
from ..errors import ConfigError, OutputError
from .pairs import pair_key

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


def model_identity(info: Any) -> dict[str, Any]:
    """What a result file records about the model that computed its rows (a ModelInfo):
    graph, precision, hashes of the spec and the loss, the weights' SHA-256, the
    graph's SHA-256 (its weights and operations, checked at load), the version that
    exported the model and the version that ran it."""
    from .. import __version__
    from ..spec import json_digest

    return {
        "graph": info.graph,
        "dtype": info.dtype,
        "spec": json_digest(info.spec.to_dict()),
        "loss": json_digest(info.loss.to_dict() if info.loss is not None else None),
        "weights_sha256": info.weights_sha256,
        "graph_sha256": getattr(info, "graph_sha256", ""),  # every weight and op of the model
        "exported_by": info.version,
        "package": __version__,
    }


def sidecar_path(path: str) -> str:
    """``results.csv`` -> ``results.csv.meta.json``: which model wrote the rows."""
    return path + ".meta.json"


def lock_path(path: str) -> str:
    folder, name = os.path.split(os.path.abspath(path))
    return os.path.join(folder, f".{name}.lock")


def check_output_path(path: str, flag: str = "--output", *, resume: bool = False) -> str:
    """Refuse an output that cannot be written before any work is done; with ``resume``,
    also one that does not exist (``check_resumable``)."""
    folder = check_destination(path, flag, "results.csv")
    if resume:
        check_resumable(path)
    return folder


def check_resumable(path: str) -> None:
    """--resume continues a file: one that does not exist is refused, as one without its
    record is. A typo in the path would otherwise start a new file quietly and compute
    every pair again, the work --resume was asked to keep."""
    if not os.path.exists(path):
        raise ConfigError(
            f"--resume: {path!r} does not exist, so there are no rows to keep. Check the path "
            "(the file an earlier run wrote), or drop --resume to start a new file."
        )


class ResultFile:
    """Append rows to ``path`` as they come, one flush per row; one writer at a time.

    identity: what produced the rows (the model's graph, spec, loss, weights hash and
        package version), recorded in the sidecar ``<path>.meta.json``.
    resume: keep the rows already there if the sidecar names the same identity (else
        ConfigError): pairs that succeeded are kept (their ``pair_key`` in ``done``),
        failed pairs and a half-written last line are dropped, so they are computed
        again and each pair ends up in the file once.

    A lock file ``.<name>.lock`` beside the output is held from construction to
    ``close()``: a second writer is refused at once (ConfigError), before it touches
    the file. ``close()`` raises OutputError if the file was replaced or removed
    meanwhile, so no run reports rows as saved that are not in the file.
    """

    file_format = staticmethod(file_format)  # a subclass may write other formats

    def __init__(self, path: str, terms: Sequence[str], *, resume: bool = False,
                 identity: dict[str, Any] | None = None) -> None:
        self.path = path
        self.format = self.file_format(path)
        check_output_path(path)
        self.columns = columns_for(terms)
        self.identity = dict(identity or {})
        self.done: set[tuple[str, str]] = set()
        self._fh: IO[str] | None = None
        self._lock = file_lock(lock_path(path), wait=False,
                               note=f"perceptual-engine (pid {os.getpid()})")
        try:
            self._lock.__enter__()
        except LockBusy as exc:
            raise ConfigError(
                f"--output {path!r} is being written by another run ({exc.holder or 'another process'}); "
                "one file has one writer at a time. Wait for that run to finish (then --resume "
                "it if it was interrupted), or give another --output."
            ) from None
        try:
            self._open(resume)
        except BaseException:
            self._lock.__exit__(None, None, None)
            raise

    def _begin(self, resume: bool) -> list[Row]:
        """The rows to keep (``resume``: after checking the identity) and the new sidecar.

        The sidecar is written first: a file never has rows without a record of the
        model that wrote them."""
        kept: list[Row] = []
        if resume:
            check_resumable(self.path)
            cwd = self._check_identity()
            kept = self._read_done()
            self.done = {pair_key(r["a"], r["b"], cwd) for r in kept}
        record = {"format": 1, "columns": self.columns, "cwd": os.getcwd(),
                  "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "model": self.identity}
        atomic_write_bytes(sidecar_path(self.path), json.dumps(record, indent=2).encode())
        return kept

    def _open(self, resume: bool) -> None:
        kept = self._begin(resume)
        # Start from a file holding exactly the kept rows (atomically: an interrupted
        # rewrite leaves the previous file).
        with atomic_path(self.path) as tmp:
            with open(tmp, "w", newline="", encoding="utf-8") as fh:
                if self.format == "csv":
                    fh.write(_csv_line(self.columns))
                for row in kept:
                    fh.write(self._format(row))
        self._fh = open(self.path, "a", newline="", encoding="utf-8")
        self._ino = os.fstat(self._fh.fileno()).st_ino

    def _check_identity(self) -> str | None:
        """The writer's working folder from the sidecar; ConfigError if another model wrote it."""
        side = sidecar_path(self.path)
        try:
            with open(side, encoding="utf-8") as fh:
                record = json.load(fh)
        except (OSError, ValueError):
            raise ConfigError(
                f"--resume: {self.path!r} has no readable {os.path.basename(side)!r}, so which model "
                "wrote its rows is unknown; rows of two models must not mix. Give another --output, "
                "or drop --resume to start the file again."
            ) from None
        theirs = record.get("model") if isinstance(record, dict) else None
        if theirs != self.identity:
            diff = sorted(k for k in set(self.identity) | set(theirs or {})
                          if (theirs or {}).get(k) != self.identity.get(k))
            raise ConfigError(
                f"--resume: {self.path!r} was written by another model (differs in: "
                f"{', '.join(diff) or 'everything'}); rows of two models must not mix. Resume "
                "with the model that wrote it, give another --output, or drop --resume to start over."
            )
        cwd = record.get("cwd")
        return cwd if isinstance(cwd, str) else None

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
        if self._fh is None:
            raise OutputError(f"{self.path!r} is closed; no more rows can be written to it.")
        try:
            self._fh.write(self._format(row))
            self._fh.flush()
        except OSError as exc:
            raise OutputError(f"writing a row to {self.path!r} failed ({exc}); the rows before it "
                              "are in the file. Free space or fix permissions, then --resume.") from exc

    def close(self) -> None:
        """Close the file and release the lock; OutputError if the file is no longer ours."""
        if self._fh is None:
            return
        try:
            self._fh.close()
            self._fh = None
            try:
                same = os.stat(self.path).st_ino == self._ino
            except FileNotFoundError:
                same = False
            if not same:
                raise OutputError(
                    f"{self.path!r} was replaced or removed while this run wrote to it; its rows "
                    "are not in the file now. Run again (with --resume if the file is there)."
                )
        finally:
            self._lock.__exit__(None, None, None)


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
