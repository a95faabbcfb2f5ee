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
    if getattr(done, "answer_id", ""):
        print(f"   answer id {done.answer_id} (kfresh explain / kfresh replay)")


def print_logged_answer(a: Any) -> None:
    """`kfresh explain`: what the answer was asked, shown and said."""
    print(
        f"answer {a.id}  at {format_display(from_timestamp(a.at))}"
        + (f"  (replay of {a.replay_of})" if a.replay_of else "")
    )
    print(f"question: {a.question}")
    mode = "closed-book" if a.closed_book else f"k={a.k or 'default'}, prompt {a.prompt_format}"
    print(f"model: {a.model}, adapter {a.adapter or 'none (base model)'}; {mode}; max_tokens {a.max_tokens}, "
          f"temperature {a.temperature:g}")  # fmt: skip
    if a.filter_json:
        print(f"filter: {a.filter_json}")
    if a.tenant:
        print("tenant: " + ", ".join(f"{k}={v}" for k, v in sorted(a.tenant.items())))
    print("passages shown:" if a.citations else "passages shown: none")
    for c in a.citations:
        print(f"   [{c.index}] " + " ".join(c.text.split())[:300])
    print_citations(a)
    print(f"answer ({a.finish_reason}):")
    print(a.answer)


def adapter_line(a: Any) -> str:
    flags = ", ".join(f for f, on in (("current", a.current), ("standby", a.standby), ("loaded", a.loaded)) if on)
    created = format_display(from_timestamp(a.created_at))
    mark = "*" if a.current else " "
    withdrawn = f"  WITHDRAWN: {a.withdrawn}" if a.withdrawn else ""
    return f"{mark} {a.version}  parent {a.parent or '-'}  {a.facts} facts  {created}  {flags or '-'}{withdrawn}"
