"""Time in one place: unix seconds (float, UTC) inside kfresh; protobuf Timestamps on the wire; ISO-8601 in files;
one display form in prompts and the CLI."""

from __future__ import annotations

import datetime as dt

from google.protobuf.timestamp_pb2 import Timestamp


def to_timestamp(unix_s: float) -> Timestamp:
    """Unix seconds as a protobuf Timestamp (nanosecond resolution)."""
    ts = Timestamp()
    ts.FromNanoseconds(int(unix_s * 1e9))
    return ts


def from_timestamp(ts: Timestamp) -> float:
    """A protobuf Timestamp as unix seconds."""
    return float(ts.seconds) + float(ts.nanos) / 1e9


def parse_iso(text: str) -> float:
    """Unix seconds of an ISO-8601 date or date-time ('Z' allowed; naive means UTC). ValueError when it is not one."""
    parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00"))
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=dt.UTC)
    return parsed.timestamp()


def format_iso(unix_s: float) -> str:
    """'2026-03-01T09:30:00Z': the form kfresh writes into files (facts, reports)."""
    return dt.datetime.fromtimestamp(unix_s, tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def format_display(unix_s: float) -> str:
    """'2026-03-01 09:30 UTC': the form prompts and the CLI show."""
    return dt.datetime.fromtimestamp(unix_s, tz=dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
