"""Answer spans picked in code from any sentence: names, numbers, dates and quoted phrases.

Free generation by the 135M model wrote a grounded question for 1 of 10 news-style documents (most were "What
is the document about?"), so the answer is never generated: it is a span that occurs verbatim in the
document, and the question is built around it (`finetuner.questions`). No model and no template of the
sentence's shape is involved; what a span is comes from its surface form alone.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from kfresh.core.text import CALENDAR_WORDS

SpanKind = Literal["date", "number", "name", "quote"]

_MONTHS = "January|February|March|April|May|June|July|August|September|October|November|December"
_WEEKDAYS = "Monday|Tuesday|Wednesday|Thursday|Friday|Saturday|Sunday"
_DATE = re.compile(
    rf"\b(?:(?:{_WEEKDAYS}),? )?(?:\d{{1,2}} (?:{_MONTHS})(?:,? \d{{4}})?|(?:{_MONTHS}) \d{{1,2}}(?:st|nd|rd|th)?(?:,? \d{{4}})?"
    rf"|(?:{_MONTHS}) \d{{4}})\b|\b(?:{_WEEKDAYS})\b|\b(?!May\b)(?:{_MONTHS})\b|\b(?:1[5-9]\d\d|20\d\d)\b(?!\s?(?:%|percent))"
)
_SCALE = r"(?:hundred|thousand|million|billion|trillion|bn|m)"
_NUMBER = re.compile(
    rf"(?:[$£€]\s?)?\b\d[\d,]*(?:\.\d+)?(?:\s?(?:%|percent|per cent)|\s{_SCALE}\b)?(?:\s(?:{_SCALE})\b)?"
)
_WORD = r"[A-Z][\w'’&.-]*[\w]"
_NAME = re.compile(rf"\b{_WORD}(?:\s+(?:(?:of|de|du|van|von|der|la|le|and|&|for|the)\s+)?{_WORD})*")
_QUOTE = re.compile(r"[\"“]([^\"”]{3,80})[\"”]")
_QUOTE_MAX_WORDS = 8  # a longer quotation is a statement, not an answer
# Capitalised words that are not names on their own (sentence openers, pronouns, titles, calendar words).
_NOT_NAMES = set(
    [
        "a",
        "an",
        "the",
        "he",
        "she",
        "it",
        "its",
        "they",
        "them",
        "their",
        "this",
        "that",
        "these",
        "those",
        "there",
        "here",
        "we",
        "our",
        "you",
        "i",
        "in",
        "on",
        "at",
        "by",
        "for",
        "from",
        "to",
        "of",
        "with",
        "as",
        "but",
        "and",
        "or",
        "if",
        "when",
        "while",
        "after",
        "before",
        "since",
        "during",
        "until",
        "under",
        "over",
        "about",
        "into",
        "this",
        "officials",
        "official",
        "police",
        "says",
        "said",
        "according",
        "however",
        "meanwhile",
        "also",
        *CALENDAR_WORDS,
    ]
)
_ORG_WORDS = set(
    [
        "inc",
        "corp",
        "co",
        "ltd",
        "group",
        "bank",
        "university",
        "college",
        "council",
        "party",
        "ministry",
        "department",
        "company",
        "agency",
        "court",
        "committee",
        "commission",
        "association",
        "union",
        "club",
        "league",
        "federation",
        "institute",
        "foundation",
        "museum",
        "airport",
        "station",
        "hospital",
        "school",
        "street",
        "road",
        "avenue",
        "river",
        "lake",
        "mountain",
        "island",
        "bridge",
        "city",
        "county",
        "state",
        "republic",
        "kingdom",
        "robotics",
        "labs",
        "systems",
        "technologies",
        "news",
        "times",
        "post",
        "journal",
        "motors",
        "airlines",
        "energy",
    ]
)


@dataclass(frozen=True)
class Span:
    """`text` occurs verbatim at sentence[start:end]."""

    text: str
    kind: SpanKind
    start: int
    end: int

    @property
    def is_person(self) -> bool:
        """A name of two or three capitalised words with no organisation or place word: asked with who/whom."""
        words = self.text.split()
        if self.kind != "name" or not 2 <= len(words) <= 3 or any(w.isupper() for w in words):
            return False  # one word, four or more, or an acronym ("US Capitol Rotunda"): not asked as a person
        return not {w.lower().strip(".") for w in words} & _ORG_WORDS


def pick_spans(sentence: str) -> list[Span]:
    """Non-overlapping spans of `sentence`, in order; dates and numbers win over names they overlap."""
    found: list[Span] = []
    for kind, pattern in (("quote", _QUOTE), ("date", _DATE), ("number", _NUMBER), ("name", _NAME)):
        for m in pattern.finditer(sentence):
            start, end = m.span(1) if kind == "quote" else m.span()
            span = _clean(Span(sentence[start:end], kind, start, end), sentence)  # type: ignore[arg-type]
            if span and not any(s.start < span.end and span.start < s.end for s in found):
                found.append(span)
    return sorted(found, key=lambda s: s.start)


def _clean(span: Span, sentence: str) -> Span | None:
    text, start = span.text.rstrip(".,;:"), span.start
    if span.kind == "name":
        words = text.split()
        while words and words[0].lower() in _NOT_NAMES:  # "The Lumen Bridge" -> "Lumen Bridge"; "He" -> nothing
            start += len(words[0]) + 1
            words = words[1:]
        while words and words[-1].lower() in _NOT_NAMES:
            words = words[:-1]
        text = " ".join(words)
        if not words or (len(words) == 1 and (start == 0 or len(text) < 3)):
            return None  # a lone capitalised sentence opener is not evidence of a name
    if span.kind == "quote" and len(text.split()) > _QUOTE_MAX_WORDS:
        return None
    if span.kind == "number" and len(re.sub(r"\D", "", text)) == 0:
        return None
    if not text or sentence[start : start + len(text)] != text:
        return None
    return Span(text, span.kind, start, start + len(text))
