"""Which facts a corpus corrected: replay its rows as the store applies them, and compare what the replaced
or superseded versions stated with the facts distilled from the current ones (the finetuner's own extraction).

The knowledge suite scores answers about these facts on the NEW value and counts an answer that gives an old
value but not the new one as stale. Pure functions: no model, no store.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from kfresh.finetuner.augment import QA
from kfresh.finetuner.extraction import DocLike, extract_document
from kfresh.finetuner.facts import Fact, normalize, parse_date
from kfresh.finetuner.selection import SelectedDoc


@dataclass(frozen=True)
class History:
    """A corpus replayed in ingest order: the versions a later row replaced or superseded, and the rest (current)."""

    replaced: list[SelectedDoc]
    current: list[SelectedDoc]


def replay_history(rows: Iterable[dict[str, Any]]) -> History:
    """Replay JSONL rows as the store applies them: an upsert of a known id replaces its version, `supersedes`
    retires the named documents, `{"delete": id}` removes one (a deleted fact has no new value: no correction).
    Needed because the store no longer holds an upserted document's old text."""
    current: dict[str, SelectedDoc] = {}
    versions: dict[str, int] = {}
    replaced: list[SelectedDoc] = []
    for row in rows:
        if "delete" in row:
            current.pop(row["delete"], None)
            continue
        doc_id = row["id"]
        replaced += [current.pop(doc_id)] if doc_id in current else []
        replaced += [current.pop(old) for old in row.get("supersedes", []) if old in current]
        versions[doc_id] = versions.get(doc_id, 0) + 1
        when = row.get("valid_from", "")
        valid_from = float(when) if isinstance(when, int | float) else parse_date(str(when))
        current[doc_id] = SelectedDoc(doc_id, versions[doc_id], row.get("source", ""), valid_from, row["text"])
    return History(replaced, list(current.values()))


def sample_history() -> History:
    """The shipped sample corpus replayed in the order `ingest_samples` ingests it."""
    from kfresh.benchmarks.distill import sample_rows

    return replay_history(sample_rows())


def corrections_from_history(
    old_docs: Iterable[DocLike], final_facts: Iterable[Fact]
) -> dict[tuple[str, str], set[str]]:
    """Fact.key -> stale objects: what replaced or superseded versions stated about a (subject, relation) whose
    final fact says something else. Facts are extracted as the finetuner extracts them; a key the final facts
    lack (dropped, or deferred by max_facts) is no correction that can be scored."""
    final = {f.key: normalize(f.object) for f in final_facts}
    out: dict[tuple[str, str], set[str]] = {}
    for doc in old_docs:
        for old in extract_document(doc)[0]:
            if old.key in final and final[old.key] != normalize(old.object):
                out.setdefault(old.key, set()).add(old.object)
    return out


def pick_questions(heldout: Sequence[QA], corrected: set[int], limit: int) -> list[QA]:
    """Up to `limit` held-out questions (0 = all, as they are), one fact at a time with corrected facts first: a
    short run must still ask about the corrections, and about unchanged facts too."""
    if not limit or limit >= len(heldout):
        return list(heldout)
    by_fact: dict[int, list[QA]] = {}
    for qa in heldout:
        by_fact.setdefault(qa.fact, []).append(qa)
    order = sorted(by_fact, key=lambda i: (i not in corrected, i))
    rounds = max(len(qs) for qs in by_fact.values())
    return [by_fact[i][r] for r in range(rounds) for i in order if r < len(by_fact[i])][:limit]


def correction_notes(history: History, facts: Sequence[Fact], stale: dict[tuple[str, str], set[str]],
                     rows: list[dict[str, Any]]) -> list[str]:  # fmt: skip
    """The report's account of the corrections: old -> new value and questions asked per corrected fact, and the
    replaced facts that could not be scored (so a zero is never mistaken for a measurement)."""
    final = {f.key: f.object for f in facts}
    asked = Counter(tuple(r["about"]) for r in rows if r["kind"] == "fact")
    lines = [f"Corrected fact {s} / {r}: {', '.join(sorted(old))} -> {final[(s, r)]} (held-out questions asked: {asked[(s, r)]})."
             for (s, r), old in sorted(stale.items())]  # fmt: skip
    if not stale:
        lines.append(
            "No corrected fact among the distilled facts: the corrected-fact and stale-answer columns measure nothing."
        )
    unscored = sorted({f.key for doc in history.replaced for f in extract_document(doc)[0]} - set(final))
    if unscored:
        lines.append(
            f"Not scored (no distilled fact with that subject and relation): {'; '.join(' / '.join(k) for k in unscored)}."
        )
    return lines
