"""Read documents for `kfresh ingest`: JSONL (a file or stdin) or a folder of .md/.txt files."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from kfresh.client.clients import document
from kfresh.core.time import parse_iso
from kfresh.v1 import kfresh_pb2 as pb

TEXT_SUFFIXES = {".md", ".txt", ".markdown"}
# One request must fit gRPC's 64 MiB message limit (kfresh's own document limit is the server's to check).
MAX_LINE_CHARS = 32 * 1024 * 1024


class SourceError(ValueError):
    """A line or file cannot be turned into a document; the message says where."""


def parse_time(value: Any, where: str) -> float | None:
    """Unix seconds or an ISO-8601 string (date or date-time; naive means UTC)."""
    if value is None or value == "":
        return None
    if isinstance(value, (int, float)):
        return float(value)
    try:
        return parse_iso(str(value))
    except ValueError:
        raise SourceError(f"{where}: valid_from {value!r} is neither unix seconds nor ISO-8601") from None


def _text(record: dict[str, Any], key: str, where: str, *, required: bool = False) -> str:
    value = record.get(key)
    if value is None:
        if required:
            raise SourceError(f"{where}: missing field(s) {[key]}")
        return ""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise SourceError(f"{where}: {key} must be a string; got {type(value).__name__}")
    return str(value)


def record_to_request(record: dict[str, Any], where: str) -> pb.IngestRequest:
    """One JSONL record: {"id", "text", "source"?, "metadata"?, "valid_from"?, "supersedes"?} or {"delete": id}.
    SourceError names `where` and the field: a missing or wrongly typed field, a date that is not one."""
    if "delete" in record:
        return pb.IngestRequest(delete_id=_text(record, "delete", where, required=True))
    missing = [key for key in ("id", "text") if key not in record]
    if missing:
        raise SourceError(f"{where}: missing field(s) {missing}")
    metadata = record.get("metadata") or {}
    if not isinstance(metadata, dict) or any(isinstance(v, (dict, list)) or v is None for v in metadata.values()):
        raise SourceError(f"{where}: metadata must be an object of strings, numbers or booleans")
    supersedes = record.get("supersedes") or []
    if not isinstance(supersedes, list) or not all(isinstance(x, str) for x in supersedes):
        raise SourceError(f"{where}: supersedes must be a list of document ids (strings)")
    valid_from = record.get("valid_from")
    if isinstance(valid_from, bool) or not isinstance(valid_from, (str, int, float, type(None))):
        raise SourceError(
            f"{where}: valid_from must be unix seconds or an ISO-8601 string; got {type(valid_from).__name__}"
        )
    doc = document(
        _text(record, "id", where, required=True),
        _text(record, "text", where, required=True),
        source=_text(record, "source", where),
        metadata={str(k): str(v) for k, v in metadata.items()},
        valid_from=parse_time(valid_from, where),
        supersedes=supersedes,
    )
    return pb.IngestRequest(upsert=doc)


def jsonl_record(line: str, where: str) -> pb.IngestRequest:
    """One JSONL line -> an IngestRequest; SourceError says what is wrong with it."""
    if len(line) > MAX_LINE_CHARS:
        raise SourceError(f"{where}: the line is {len(line):,} characters; the limit is {MAX_LINE_CHARS:,}")
    return record_to_request(json_object(line, where), where)


def json_object(line: str, where: str) -> dict[str, Any]:
    """One JSONL line as a JSON object; SourceError names `where` when it is not one."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise SourceError(f"{where}: not valid JSON ({exc.msg})") from None
    if not isinstance(record, dict):
        raise SourceError(f"{where}: expected a JSON object")
    return record


def read_text(path: Path, name: str) -> str:
    """A text file's contents; SourceError says why it cannot be read (missing, not UTF-8, no permission)."""
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise SourceError(
            f"{name}: not UTF-8 text (byte {exc.object[exc.start]:#04x} at offset {exc.start}); is it a binary file?"
        ) from None
    except OSError as exc:
        raise SourceError(f"{name}: cannot read it ({exc.strerror or exc.__class__.__name__})") from None


Record = tuple[pb.IngestRequest | None, str | None]  # (the request, or what is wrong with the record)


class Source:
    """What `kfresh ingest SOURCE` reads: `-` = JSONL on stdin (held in memory), a folder = its .md/.txt files,
    otherwise a JSONL file. It is read twice: `check()` reads every record, `requests()` yields the valid ones,
    so nothing has to be sent before the whole source is known to be good."""

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self._stdin = list(sys.stdin) if spec == "-" else None

    def records(self) -> Iterator[Record]:
        if self._stdin is not None:
            yield from self._jsonl(self._stdin, "<stdin>")
            return
        path = Path(self.spec)
        if path.is_dir():
            yield from self._folder(path)
            return
        if not path.exists():
            yield None, f"{self.spec}: no such file or folder"
            return
        try:
            text = read_text(path, self.spec)
        except SourceError as exc:
            yield None, str(exc)
            return
        yield from self._jsonl(text.splitlines(), self.spec)

    @staticmethod
    def _jsonl(lines: Iterable[str], name: str) -> Iterator[Record]:
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                yield jsonl_record(line, f"{name}:{number}"), None
            except SourceError as exc:
                yield None, str(exc)

    @staticmethod
    def _folder(folder: Path) -> Iterator[Record]:
        for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and not p.is_dir()):
            if not path.exists():
                yield None, f"{path}: cannot read it (a link to nothing)"
                continue
            try:
                text = read_text(path, str(path))
            except SourceError as exc:
                yield None, str(exc)
                continue
            rel = path.relative_to(folder).as_posix()
            doc = document(rel, text, source=str(path), valid_from=path.stat().st_mtime)
            yield pb.IngestRequest(upsert=doc), None

    def check(self) -> tuple[int, list[str]]:
        """(valid records, every invalid record or unreadable file as `FILE:LINE: reason`): one pass over it all."""
        valid, problems = 0, []
        for _, problem in self.records():
            if problem is None:
                valid += 1
            else:
                problems.append(problem)
        return valid, problems

    def requests(self) -> Iterator[pb.IngestRequest]:
        """The valid records, in order (invalid ones are skipped: `check()` first)."""
        return (request for request, _ in self.records() if request is not None)


def read_source(spec: str) -> Iterator[pb.IngestRequest]:
    """The requests of a source, checked whole first: SourceError names every bad record (up to 20) before any
    request is produced, so a stream never fails halfway through a file."""
    source = Source(spec)
    _, problems = source.check()
    if len(problems) == 1:
        raise SourceError(problems[0])
    if problems:
        shown = "\n  ".join(problems[:20]) + ("\n  ..." if len(problems) > 20 else "")
        raise SourceError(f"{spec}: {len(problems)} invalid records:\n  {shown}")
    return source.requests()
