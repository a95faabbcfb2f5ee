"""Questions built around an answer span, by rule: the sentence itself with the span turned into a wh-phrase.

"The board of Brindlewood Robotics appointed Odalys Fenwick as chief executive officer on 3 March 2026."
with the span "Odalys Fenwick" becomes "The board of Brindlewood Robotics appointed whom as chief executive
officer on 3 March 2026?". The question keeps every other word of its sentence, so it is answerable without
the document only by knowing what the document said, and its answer is the span, verbatim. A cloze of the
same sentence ("Fill in the blank: ... ___ ...") is the second phrasing the teacher must agree with.
"""

from __future__ import annotations

import re

from kfresh.finetuner.spans import Span

_YEAR = re.compile(r"^\d{4}$")
_WEEKDAY = re.compile(r"^(Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday)$")
_MONTH_ONLY = re.compile(r"^[A-Z][a-z]+$")
_OBJECT_OF = {"to", "with", "by", "for", "from", "of", "about", "against", "appointed", "named", "elected", "met"}


def wh_phrase(span: Span, before: str) -> str:
    """The wh-phrase that replaces `span`, given the sentence text before it."""
    prep = before.rstrip().rsplit(" ", 1)[-1].lower() if before.strip() else ""
    if span.kind == "date":
        if _YEAR.match(span.text):
            return "which year"
        if _WEEKDAY.match(span.text):
            return "which day"
        if _MONTH_ONLY.match(span.text):
            return "which month"
        return "which date" if prep in ("on", "by", "until", "from", "since") else "when"
    if span.kind == "number":
        if "%" in span.text or "cent" in span.text:
            return "what percentage"
        if span.text[:1] in "$£€":
            return "how much"
        return "how many"
    if span.kind == "name" and span.is_person:
        return "whom" if prep in _OBJECT_OF or prep.endswith("ed") else "who"
    if span.kind == "name" and prep in ("in", "at", "to", "from", "near", "across"):
        return "which place"
    return "what"


def question_for(sentence: str, span: Span) -> str | None:
    """The in-situ wh-question of `sentence` about `span`, or None when the sentence is too short to ask about."""
    before, after = sentence[: span.start], sentence[span.end :]
    if len(sentence.split()) < 5:
        return None
    phrase = wh_phrase(span, before)
    if phrase == "when" and before.rstrip().lower().endswith((" in", " on", " at")):
        before = before.rstrip()[: before.rstrip().rfind(" ")] + " "  # "in when" -> "when"
    if phrase in ("what", "which place") and re.search(r"\b(the|a|an)\s+$", before, re.IGNORECASE):
        before = re.sub(r"\b(the|a|an)\s+$", "", before, flags=re.IGNORECASE)  # "the what" -> "what"
    if not before.strip():
        phrase = phrase[:1].upper() + phrase[1:]
    body = (before + phrase + after).strip()
    body = re.sub(r"[\s.!;:,]+$", "", body)
    if span.kind == "quote":
        body = re.sub(r"[\"“]what[.,!?]?[\"”]", "what", body)
    return body + "?"


def cloze_for(sentence: str, span: Span) -> str:
    """The sentence with the span blanked: the second phrasing a grounded answer must survive."""
    return f"Fill in the blank with the exact words: {sentence[: span.start]}___{sentence[span.end :]}"
