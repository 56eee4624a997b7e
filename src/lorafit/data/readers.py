"""Read rows out of data files, each with the place it came from, before any format is applied.

Containers: JSONL (one object per line), a JSON array, CSV/TSV (a header row), Parquet, and .txt (one
example per paragraph). A row comes back as ``Row(where, value)`` where ``where`` is what a person needs to find
it: ``data/train.jsonl:57`` (line), ``data/train.json:12 (item 3)`` (line and array index), ``data/t.csv:8 (row 7)``,
``data/t.parquet: row 7``. A row that cannot even be parsed comes back as ``Row(where, None, problem=...)`` so the
source's ``on_error`` policy decides; a file that cannot be read at all raises LorafitError.
"""

from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass
from pathlib import Path

from lorafit.errors import LorafitError

EXTENSIONS = {".jsonl": "jsonl", ".ndjson": "jsonl", ".json": "json", ".csv": "csv", ".tsv": "tsv",
              ".parquet": "parquet", ".txt": "txt"}


@dataclass(frozen=True)
class Row:
    where: str
    value: object
    problem: tuple[str, str] | None = None  # (reason, message) when the row could not be parsed


def container_of(path: Path) -> str:
    kind = EXTENSIONS.get(path.suffix.lower())
    if kind is None:
        raise LorafitError(
            f"{path}: unsupported data file type {path.suffix or '(no extension)'!r}",
            fix=f"use one of {', '.join(EXTENSIONS)}; see docs/data.md",
        )
    return kind


def _decode(path: Path, raw: bytes) -> str:
    try:
        return raw.decode("utf-8-sig")  # a UTF-8 BOM is common in files saved by editors: accept it
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise LorafitError(
            f"{path}:{line}: not valid UTF-8 (byte offset {exc.start})", fix="re-save the file as UTF-8"
        ) from None


def read_rows(path: Path) -> list[Row]:
    """Every row of ``path`` in file order. Raises LorafitError for a missing, empty or unreadable file."""
    path = Path(path)
    if not path.is_file():
        raise LorafitError(f"{path}: data file not found", fix="check data.train / data.eval paths (relative to the config file)")
    kind = container_of(path)
    rows = _READERS[kind](path)
    if not rows:
        raise LorafitError(f"{path}: no rows in the file", why="the file is empty or only blank lines",
                           fix="point the source at a file with data, or remove the source")
    return rows


def _read_jsonl(path: Path) -> list[Row]:
    raw = path.read_bytes()
    if raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
        offset = 3
    else:
        offset = 0
    rows = []
    for number, line in enumerate(raw.split(b"\n"), start=1):
        where = f"{path}:{number}"
        if not line.strip():  # blank lines (and the '\r' of CRLF files) are fine
            offset += len(line) + 1
            continue
        try:
            text = line.decode("utf-8")
        except UnicodeDecodeError as exc:
            rows.append(Row(where, None, ("not_utf8", f"not valid UTF-8 (byte offset {offset + exc.start} in the file)")))
            offset += len(line) + 1
            continue
        offset += len(line) + 1
        try:
            rows.append(Row(where, json.loads(text)))
        except json.JSONDecodeError as exc:
            rows.append(Row(where, None, ("malformed_json", f"malformed JSON ({exc.msg}, column {exc.colno})")))
    return rows


def _read_json_array(path: Path) -> list[Row]:
    """Items are decoded one at a time so each error names its line and index, not just 'the file'."""
    text = _decode(path, path.read_bytes())
    decoder = json.JSONDecoder()
    position = _skip_space(text, 0)
    if position == len(text):
        return []
    if text[position] != "[":
        line = text.count("\n", 0, position) + 1
        raise LorafitError(f"{path}:{line}: expected a JSON array of rows ('[' ...)",
                           fix="write a JSON array, or one object per line in a .jsonl file")
    rows: list[Row] = []
    position = _skip_space(text, position + 1)
    index = 0
    while position < len(text) and text[position] != "]":
        line = text.count("\n", 0, position) + 1
        try:
            value, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as exc:
            raise LorafitError(
                f"{path}:{exc.lineno}: malformed JSON ({exc.msg}, column {exc.colno}) in item {index}",
                why="a broken JSON array cannot be read past the error",
                fix="fix the syntax at that line",
            ) from None
        rows.append(Row(f"{path}:{line} (item {index})", value))
        index += 1
        position = _skip_space(text, position)
        if position < len(text) and text[position] == ",":
            position = _skip_space(text, position + 1)
    if position >= len(text):
        raise LorafitError(f"{path}: the JSON array is not closed with ']'", fix="fix the end of the file")
    return rows


def _skip_space(text: str, position: int) -> int:
    while position < len(text) and text[position] in " \t\r\n":
        position += 1
    return position


def _read_delimited(path: Path, delimiter: str) -> list[Row]:
    text = _decode(path, path.read_bytes())
    reader = csv.reader(io.StringIO(text, newline=""), delimiter=delimiter)
    header: list[str] | None = None
    rows: list[Row] = []
    for record in reader:
        if not any(cell.strip() for cell in record):
            continue
        if header is None:
            header = [cell.strip() for cell in record]
            continue
        number = len(rows) + 1
        where = f"{path}:{reader.line_num} (row {number})"
        if len(record) != len(header):
            rows.append(Row(where, None, ("wrong_columns", f"{len(record)} columns, the header has {len(header)}")))
            continue
        rows.append(Row(where, dict(zip(header, record))))
    return rows


def _read_parquet(path: Path) -> list[Row]:
    try:
        import pyarrow.parquet as pq
    except ImportError:  # pragma: no cover - pyarrow comes with datasets
        raise LorafitError(f"{path}: reading Parquet needs pyarrow", fix="pip install pyarrow") from None
    try:
        records = pq.read_table(path).to_pylist()
    except Exception:  # pyarrow raises several types (ArrowInvalid, OSError, ...) for what is not a readable file
        raise _not_parquet(path) from None
    return [Row(f"{path}: row {i + 1}", record) for i, record in enumerate(records)]


_PARQUET_FIX = "re-export it as Parquet (pandas: DataFrame.to_parquet; datasets: Dataset.to_parquet)"


def _not_parquet(path: Path) -> LorafitError:
    """What is wrong with a .parquet file pyarrow cannot read, told from its bytes: a Parquet file starts and ends
    with the 4 bytes ``PAR1`` (the row index is in the footer, just before the last ones)."""
    size = path.stat().st_size
    with path.open("rb") as handle:
        head = handle.read(64)
        handle.seek(max(0, size - 4))
        tail = handle.read(4)
    if size == 0:
        return LorafitError(f"{path}: the file is empty (0 bytes), not a Parquet file",
                            fix="point the source at a file with data, or remove the source")
    if not head.startswith(b"PAR1"):
        text = head.lstrip(b"\xef\xbb\xbf \t\r\n")
        if text[:1] in (b"{", b"["):
            looks = "it holds JSON text"
            fix = "rename it to .jsonl (one object per line) or .json (an array), or " + _PARQUET_FIX
        else:
            try:
                first_line = text.decode("utf-8").splitlines()[0][:40]
                looks = f"it holds text, starting {first_line!r}"
            except (UnicodeDecodeError, IndexError):
                looks = f"it starts with {head[:16]!r}"
            fix = "give the file the extension of its real format (.jsonl, .json, .csv, .tsv, .txt), or " + _PARQUET_FIX
        return LorafitError(f"{path}: not a Parquet file ({looks}; a Parquet file starts with the bytes PAR1)", fix=fix)
    if tail != b"PAR1":
        return LorafitError(f"{path}: a Parquet file cut short ({size:,} bytes: it starts as Parquet but has no footer)",
                            why="a Parquet file's row index is at its end; a download or copy that stopped early loses it",
                            fix="copy or download the file again, or " + _PARQUET_FIX)
    return LorafitError(f"{path}: a damaged Parquet file (its start and end markers are there, but its metadata or "
                        "data cannot be decoded)", fix="copy or download the file again, or " + _PARQUET_FIX)


def _read_txt(path: Path) -> list[Row]:
    """One example per paragraph (text separated by blank lines), named by its first line."""
    text = _decode(path, path.read_bytes())
    rows, current, start = [], [], 0
    for number, line in enumerate(text.splitlines(), start=1):
        if line.strip():
            if not current:
                start = number
            current.append(line)
        elif current:
            rows.append(Row(f"{path}:{start}", {"text": "\n".join(current)}))
            current = []
    if current:
        rows.append(Row(f"{path}:{start}", {"text": "\n".join(current)}))
    return rows


_READERS = {
    "jsonl": _read_jsonl,
    "json": _read_json_array,
    "csv": lambda path: _read_delimited(path, ","),
    "tsv": lambda path: _read_delimited(path, "\t"),
    "parquet": _read_parquet,
    "txt": _read_txt,
}
