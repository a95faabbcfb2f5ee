"""How answers' citations and adapter versions read in a terminal (the client commands and the demo)."""

from __future__ import annotations

from typing import Any

from kfresh.core.time import format_display, from_timestamp


def print_citations(done: Any) -> None:
    for c in done.citations:
        mark = "*" if c.primary else " "
        when = format_display(from_timestamp(c.valid_from))
        print(f" {mark}[{c.index}] {c.doc_id} v{c.version}  {c.source or '-'}  {when}  score={c.score:.2f}")
    for c in done.superseded:
        print(f"   (superseded) {c.doc_id} v{c.version}  {c.source or '-'}")
    t = done.timings
    adapter = f", adapter {done.adapter}" if done.adapter else ""
    print(
        f"   retrieval {t.retrieval_ms:.0f} ms, first token {t.time_to_first_token_ms:.0f} ms, total {t.total_ms:.0f} ms, {done.output_tokens} tokens{adapter}"
    )


def adapter_line(a: Any) -> str:
    flags = ", ".join(f for f, on in (("current", a.current), ("standby", a.standby), ("loaded", a.loaded)) if on)
    created = format_display(from_timestamp(a.created_at))
    mark = "*" if a.current else " "
    withdrawn = f"  WITHDRAWN: {a.withdrawn}" if a.withdrawn else ""
    return f"{mark} {a.version}  parent {a.parent or '-'}  {a.facts} facts  {created}  {flags or '-'}{withdrawn}"
