"""Read documents for `kfresh ingest`: JSONL (a file or stdin) or a folder of .md/.txt files."""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kfresh.client.clients import document
from kfresh.core.time import parse_iso
from kfresh.v1 import kfresh_pb2 as pb

TEXT_SUFFIXES = {".md", ".txt", ".markdown"}


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


def record_to_request(record: dict[str, Any], where: str) -> pb.IngestRequest:
    """One JSONL record: {"id", "text", "source"?, "metadata"?, "valid_from"?, "supersedes"?} or {"delete": id}."""
    if "delete" in record:
        return pb.IngestRequest(delete_id=str(record["delete"]))
    missing = [key for key in ("id", "text") if key not in record]
    if missing:
        raise SourceError(f"{where}: missing field(s) {missing}")
    metadata = {str(k): str(v) for k, v in (record.get("metadata") or {}).items()}
    doc = document(
        str(record["id"]),
        str(record["text"]),
        source=str(record.get("source", "")),
        metadata=metadata,
        valid_from=parse_time(record.get("valid_from"), where),
        supersedes=[str(s) for s in record.get("supersedes", [])],
    )
    return pb.IngestRequest(upsert=doc)


def read_jsonl(lines: Iterator[str], name: str) -> Iterator[pb.IngestRequest]:
    for number, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise SourceError(f"{name}:{number}: not valid JSON ({exc.msg})") from None
        if not isinstance(record, dict):
            raise SourceError(f"{name}:{number}: expected a JSON object")
        yield record_to_request(record, f"{name}:{number}")


def read_folder(folder: Path) -> Iterator[pb.IngestRequest]:
    for path in sorted(p for p in folder.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file()):
        rel = path.relative_to(folder).as_posix()
        doc = document(rel, path.read_text(encoding="utf-8"), source=str(path), valid_from=path.stat().st_mtime)
        yield pb.IngestRequest(upsert=doc)


def read_source(spec: str) -> Iterator[pb.IngestRequest]:
    """`-` = JSONL on stdin; a folder = its .md/.txt files; otherwise a JSONL file."""
    if spec == "-":
        return read_jsonl(iter(sys.stdin), "<stdin>")
    path = Path(spec)
    if path.is_dir():
        return read_folder(path)
    if not path.is_file():
        raise SourceError(f"{spec}: no such file or folder")
    return read_jsonl(iter(path.read_text(encoding="utf-8").splitlines()), spec)


def count_records(spec: str) -> int | None:
    """For the progress bar; None when unknown (stdin)."""
    path = Path(spec)
    if path.is_dir():
        return sum(1 for p in path.rglob("*") if p.suffix.lower() in TEXT_SUFFIXES and p.is_file())
    if path.is_file():
        return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
    return None
