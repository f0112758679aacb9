"""Append-only JSONL files that survive SIGKILL at any instant.

Each record is written as one complete line in one ``write`` and flushed, so
a kill leaves at most one partial last line; :func:`repair_tail` cuts it off
at the start of the next run. A malformed line anywhere else is never dropped
silently: reading it raises an error naming the file and line.
"""

from __future__ import annotations

import codecs
import json
import os
from collections.abc import Iterator
from pathlib import Path

__all__ = ["JsonlAppender", "iter_jsonl", "repair_tail", "atomic_write_text"]


def repair_tail(path: Path) -> int:
    """Cut a partial last line (no trailing newline) left by a killed writer. Returns bytes removed."""
    if not path.is_file() or path.stat().st_size == 0:
        return 0
    with path.open("rb+") as f:
        f.seek(0, os.SEEK_END)
        size = f.tell()
        f.seek(size - 1)
        if f.read(1) == b"\n":
            return 0
        block, pos = 65536, size
        while pos > 0:
            start = max(0, pos - block)
            f.seek(start)
            chunk = f.read(pos - start)
            nl = chunk.rfind(b"\n")
            if nl >= 0:
                keep = start + nl + 1
                break
            pos = start
        else:
            keep = 0
        f.truncate(keep)
        return size - keep


def iter_jsonl(path: Path, *, strict: bool = True) -> Iterator[tuple[int, dict | None, str | None]]:
    """Yield ``(line_number, record, error)`` for each non-empty line.

    A UTF-8 byte order mark before the first line is allowed. With ``strict``
    a malformed line (bad JSON, not an object, not UTF-8) raises ``ValueError``
    naming file and line; otherwise it is yielded with ``record=None`` and the error.
    """
    with path.open("rb") as f:
        for lineno, raw in enumerate(f, 1):
            if lineno == 1:
                raw = raw.removeprefix(codecs.BOM_UTF8)
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:  # never replaced silently: a wrong byte would train as text
                msg = f"{path} line {lineno} is not valid UTF-8 (byte {err.start} of the line)"
            else:
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                    if not isinstance(rec, dict):
                        raise ValueError("not a JSON object")
                except ValueError as err:
                    msg = f"{path} line {lineno} is not a valid JSON object ({err})"
                else:
                    yield lineno, rec, None
                    continue
            if strict:
                raise ValueError(msg + "; fix or remove that line") from None
            yield lineno, None, msg


def _read_text(path: Path) -> str:
    """The whole file as UTF-8 (a leading byte order mark dropped).

    Raises:
        ValueError: bytes that are not UTF-8, named by their offset in the file.
    """
    data = path.read_bytes()
    bom = len(codecs.BOM_UTF8) if data.startswith(codecs.BOM_UTF8) else 0
    try:
        return data[bom:].decode("utf-8")
    except UnicodeDecodeError as err:
        raise ValueError(f"{path} is not valid UTF-8 (byte offset {bom + err.start})") from None


def iter_records(path: Path) -> Iterator[tuple[str, dict | None, str | None]]:
    """Yield ``(where, record, error)`` per row of a LLaVA-layout file; ``where`` is ``"row I"`` or ``"line N"``.

    The content decides, not the suffix: a file whose first character is ``[``
    is one JSON list; anything else is JSON Lines (also under a ``.json``
    name). A row that is not a JSON object is yielded with ``record=None``.

    Raises:
        ValueError: a JSON list that does not parse or is not UTF-8, or a ``.json`` file holding one
            multi-line object.
    """
    with path.open("rb") as f:
        head = f.read(4096).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(b"["):
        try:
            rows = json.loads(_read_text(path))
        except json.JSONDecodeError as err:
            raise ValueError(f"{path} is not valid JSON: {err}") from err
        for i, rec in enumerate(rows):
            ok = isinstance(rec, dict)
            yield f"row {i}", rec if ok else None, None if ok else f"{path} row {i} is not a JSON object"
        return
    if head.startswith(b"{") and path.suffix == ".json":
        text = _read_text(path)
        if "\n" in text.strip():
            try:
                whole = json.loads(text)
            except json.JSONDecodeError:
                whole = None
            if isinstance(whole, dict):
                raise ValueError(f"{path} holds a JSON dict, not a list of rows (LLaVA layout: "
                                 "[{\"id\": ..., \"image\": ..., \"conversations\": [...]}, ...])")
    for lineno, rec, err in iter_jsonl(path, strict=False):
        yield f"line {lineno}", rec, err


class JsonlAppender:
    """Append whole records as single lines, flushed at once (``fsync`` on close)."""

    def __init__(self, path: Path):
        self.path = path
        self._f = path.open("ab", buffering=0)

    def write(self, record: dict) -> None:
        self._f.write((json.dumps(record, ensure_ascii=False) + "\n").encode("utf-8"))

    def close(self) -> None:
        os.fsync(self._f.fileno())
        self._f.close()


def atomic_write_text(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file and one rename."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)
